"""Training engines: `loop` (the one training loop and its `Trainer` hooks), `vae`, `diffusion` and `controlnet`
(the trainers), `embed` (latents for the diffusion model), `common` (config, AMP, torch.distributed helpers, RNG
states, the --out / --resume checks)."""

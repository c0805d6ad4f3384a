"""Training engines: `embed` (latents for the diffusion model), `diffusion` (the diffusion UNet), `common` (config,
devices/AMP, torch.distributed, checkpoints and resume). VAE and ControlNet training are not written yet."""

"""`maisi train vae|diffusion|controlnet`: train MAISI networks; diffusion and controlnet learn from `maisi data embed`
latents.

Runs in one process, or under `torchrun --nproc_per_node N -m maisi_cli train …` (NCCL on GPUs, gloo on the CPU).
No torch at import time: the engine is imported inside the command.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import typer

from maisi_cli.cli import render

app = typer.Typer(help="Train MAISI networks: the VAE, the diffusion UNet, the ControlNet (released checkpoint "
                       "layouts).",
                  no_args_is_help=True)


@contextlib.contextmanager
def train_progress(output: render.Output) -> Iterator:
    """Engine events → on a TTY one bar per epoch with the loss and the rate; off a TTY one JSON line per epoch on
    stderr; nothing with --quiet."""
    if output.quiet:
        yield lambda event: None
        return
    console = render.stderr_console()
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} it/s"), TimeElapsedColumn(),
                      console=console) as bars:
            tasks: dict[int, int] = {}
            started: dict[int, float] = {}

            def on_event(event: dict) -> None:
                epoch = event["epoch"]
                if epoch not in tasks:
                    tasks[epoch] = bars.add_task(f"epoch {epoch}/{event['epochs']}", total=event.get("steps"),
                                                 loss=float("nan"), rate=0.0)
                    started[epoch] = time.perf_counter()
                if event["event"] == "step":
                    rate = event["step"] / max(time.perf_counter() - started[epoch], 1e-9)
                    bars.update(tasks[epoch], completed=event["step"], total=event["steps"], loss=event["loss"],
                                rate=rate)
                else:
                    bars.update(tasks[epoch], loss=event["loss"])

            yield on_event
        return

    def log_event(event: dict) -> None:
        if event["event"] == "epoch":
            line = {k: event[k] for k in ("event", "epoch", "epochs", "loss")}
            line["seconds"] = round(event["seconds"], 3)
            line["samples_per_s"] = round(event["samples"] / max(event["seconds"], 1e-9), 3)
            sys.stderr.write(json.dumps(line) + "\n")
            sys.stderr.flush()

    yield log_event


def run_trainer(output: render.Output, config_class, config_file: Optional[Path], flags: dict, train,
                describe) -> None:
    """Build the trainer's config (file + flags), train with progress, and print one summary from rank 0 only:
    `describe(summary)` for people, the summary itself with --json."""
    import os

    from maisi_cli.engine.train.common import build_config

    settings = build_config(config_class, config_file, flags)
    with train_progress(output) as on_event:
        summary = train(settings, on_event)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if output.json:
        render.print_json(summary)
    else:
        render.info(describe(summary), output)


@app.command("diffusion")
def diffusion_command(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="Embeddings datalist (embeddings.json from "
                                        "`maisi data embed`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for diff_unet.pt and train_state.pt."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name or spec .json (default: rflow-ct)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="rflow or ddpm (default: the model's)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs in all (a resumed run counts the done ones)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default 1e-4), decayed to 0."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Latents per step per process (default 1)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON or TOML file of these options; flags "
                                          "override it."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the run in --out."),
    init: Optional[Path] = typer.Option(None, "--init", help="Fine-tune from this diffusion UNet checkpoint "
                                        "(its scale factor is kept)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision: fp16 on CUDA (default on "
                                       "there), bf16 on the CPU (default off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the run (default 0)."),
    json_flag: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Train the diffusion UNet of a model on pre-computed latents."""
    from maisi_cli.engine.train.diffusion import DiffusionTrainConfig, train_diffusion
    from maisi_cli.errors import UsageError

    output = render.output_of(ctx.obj, json_flag)
    if scheduler is not None and scheduler not in ("rflow", "ddpm"):
        raise UsageError(f"--scheduler: '{scheduler}' is not a scheduler; use rflow or ddpm")
    flags = {"data": data, "out": out, "model": model, "scheduler": scheduler, "epochs": epochs, "lr": lr,
             "batch_size": batch_size, "resume": resume, "init": init, "device": device, "amp": amp, "seed": seed}
    run_trainer(output, DiffusionTrainConfig, config, flags, train_diffusion, lambda summary: (
        f"trained {summary['model']} diffusion UNet ({summary['scheduler']}) for epochs "
        f"{summary['start_epoch'] + 1}..{summary['epochs']}: loss {summary['loss']:.4f}, scale factor "
        f"{summary['scale_factor']:.4f} ({summary['scale_factor_source']}); wrote {summary['checkpoint']}"))


@app.command("controlnet")
def controlnet_command(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="Datalist {\"training\": [{\"image\": LATENT, "
                                        "\"label\": LABEL_MAP}, …]}, paths relative to it: the embeddings.json of "
                                        "`maisi data embed` run on a datalist with labels (it lists each label); "
                                        "LABEL_MAP is the integer mask (0-255) of the CT the latent came from."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for controlnet.pt and train_state.pt."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name or spec .json (default: rflow-ct)."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Folder holding the model's released "
                                               "diffusion UNet (frozen; its scale factor is used) under its "
                                               "repository name (default: MAISI_WEIGHTS_DIR, then the caches)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs in all (a resumed run counts the done ones)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-5), decayed to 0."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Latents per step per process (default 1)."),
    weighted_label: Optional[list[int]] = typer.Option(None, "--weighted-label", help="Label id whose latent voxels "
                                                       "weigh --weighted-loss in the L1 loss; repeat for several."),
    weighted_loss: Optional[float] = typer.Option(None, "--weighted-loss", help="Weight of --weighted-label voxels "
                                                  "(default 100)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON or TOML file of these options; flags "
                                          "override it."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the run in --out."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this ControlNet checkpoint instead of the "
                                        "UNet's weights."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision: fp16 on CUDA (default on "
                                       "there), bf16 on the CPU (default off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the run (default 0)."),
    json_flag: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Train a model's ControlNet (initialised from its frozen diffusion UNet) on latents + label maps."""

    from maisi_cli.engine.train.controlnet import ControlNetTrainConfig, train_controlnet

    output = render.output_of(ctx.obj, json_flag)
    flags = {"data": data, "out": out, "model": model, "weights_dir": weights_dir, "epochs": epochs, "lr": lr,
             "batch_size": batch_size, "weighted_label": weighted_label or None, "weighted_loss": weighted_loss,
             "resume": resume, "init": init, "device": device, "amp": amp, "seed": seed}
    run_trainer(output, ControlNetTrainConfig, config, flags, train_controlnet, lambda summary: (
        f"trained {summary['model']} ControlNet ({summary['scheduler']}) for epochs "
        f"{summary['start_epoch'] + 1}..{summary['epochs']}: loss {summary['loss']:.4f}; wrote "
        f"{summary['checkpoint']}"))


@app.command("vae")
def vae_command(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="Datalist of CT images ({\"training\": [{\"image\": …, "
                                        "\"fold\": k}]}, e.g. from `maisi data phantoms`); fold == val fold (0) "
                                        "validates."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for autoencoder.pt, train_state.pt and "
                                       "validation.json."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name or spec .json (default: rflow-ct)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs in all (a resumed run counts the done ones)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate of both networks (default 1e-4; "
                                       "×0.01 before epoch 10, ×0.1 before 20)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Patches per step per process (default 1)."),
    patch_size: Optional[str] = typer.Option(None, "--patch-size", help="Training patch, N or XxYxZ (default 64)."),
    kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="KL weight (default 1e-7)."),
    latent_sampling: Optional[bool] = typer.Option(None, "--latent-sampling/--no-latent-sampling", help="Decode a "
                                                   "sample of the latent (default, the reference) or its mean."),
    perceptual_weight: Optional[float] = typer.Option(None, "--perceptual-weight", help="Perceptual weight "
                                                      "(default 0.3; 0 skips it)."),
    perceptual_network: Optional[str] = typer.Option(None, "--perceptual-network", help="MONAI PerceptualLoss "
                                                     "network (default squeeze; resnet50 with --perceptual-weights)."),
    perceptual_weights: Optional[Path] = typer.Option(None, "--perceptual-weights", help="Local ResNet-50 weights "
                                                      "for the perceptual loss (offline)."),
    adversarial_weight: Optional[float] = typer.Option(None, "--adversarial-weight", help="Adversarial weight "
                                                       "(default 0.1; 0 trains no discriminator)."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate every N epochs (default 10; the "
                                            "first and last epoch always)."),
    val_fold: Optional[int] = typer.Option(None, "--val-fold", help="Items with this fold validate (default 0)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON or TOML file of these options and of "
                                          "warmup, random_aug, recon_loss (l1|l2), lr_decay (none|cosine), "
                                          "bright_weight, bright_threshold, bright_margin, "
                                          "discriminator_layers, val_window; flags override it."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the run in --out."),
    init: Optional[Path] = typer.Option(None, "--init", help="Fine-tune from this autoencoder state dict."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision: fp16 on CUDA (default on "
                                       "there), bf16 on the CPU (default off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the run (default 0)."),
    json_flag: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Train a model's VAE (L1 + KL + perceptual + patch-adversarial) on CT images."""

    from maisi_cli.engine.train.vae import VaeTrainConfig, train_vae

    output = render.output_of(ctx.obj, json_flag)
    flags = {"data": data, "out": out, "model": model, "epochs": epochs, "lr": lr, "batch_size": batch_size,
             "patch_size": patch_size, "kl_weight": kl_weight, "latent_sampling": latent_sampling,
             "perceptual_weight": perceptual_weight,
             "perceptual_network": perceptual_network, "perceptual_weights": perceptual_weights,
             "adversarial_weight": adversarial_weight, "val_every": val_every, "val_fold": val_fold,
             "resume": resume, "init": init, "device": device, "amp": amp, "seed": seed}
    run_trainer(output, VaeTrainConfig, config, flags, train_vae, lambda summary: (
        f"trained {summary['model']} VAE for epochs {summary['start_epoch'] + 1}..{summary['epochs']}: "
        f"loss {summary['loss']:.4f}"
        + (f", val loss {summary['val']['val_loss']:.4f}" if summary["val"] else "")
        + f"; wrote {summary['checkpoint']}"))


def embed_command(
    ctx: typer.Context,
    datalist: Path = typer.Argument(..., help="Datalist JSON {\"training\": [{\"image\": PATH, [\"label\": PATH], "
                                    "[\"modality\": \"ct\"]}, …]}; paths relative to its folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <stem>_emb.nii.gz, their .json sidecars and "
                             "embeddings.json."),
    model: str = typer.Option("rflow-ct", "--model", help="Model name or spec .json whose VAE encodes."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Folder holding the weight files under "
                                               "their repository names (default: MAISI_WEIGHTS_DIR, then the "
                                               "caches)."),
    mean: bool = typer.Option(False, "--mean/--sample", help="Encode the mean z_mu instead of a sample "
                              "z_mu + z_sigma*eps (the reference samples)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled encodings (file k uses a seed derived from it)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_flag: bool = typer.Option(False, "--json", help="Print a summary as one JSON document."),
) -> None:
    """Encode CT images into VAE latents for `maisi train diffusion` (existing outputs are skipped)."""
    from maisi_cli.engine.runtime import resolve_device
    from maisi_cli.engine.train.embed import embed_datalist
    from maisi_cli.models import get_model

    output = render.output_of(ctx.obj, json_flag)
    spec = get_model(model)
    with render.progress(output) as on_progress:
        summary = embed_datalist(spec, datalist, out, weights_dir=weights_dir, device=resolve_device(device),
                                 mean=mean, seed=seed, on_progress=on_progress)
    if output.json:
        render.print_json(summary)
    else:
        render.info(f"{len(summary['written'])} latent(s) written, {len(summary['skipped'])} already there; "
                    f"datalist {summary['datalist']}", output)

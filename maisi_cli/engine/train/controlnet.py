"""ControlNet training on pre-computed latents + label maps (reference-training-fid-trt.md §4, checklist §11.6).

Data (`--data`): a datalist {"training": [{"image": LATENT, "label": LABEL_MAP, …}, …]}, paths relative to the file.
`image` is a latent written by `maisi data embed` (channels last, with its `.json` sidecar for spacing, regions,
modality); `label` is the integer label map (0–255) of the CT that latent was encoded from, at image resolution. The
`embeddings.json` that `maisi data embed` writes lists `label` for every datalist item that had one, so it is the
`--data` here as it is. The label is reoriented to RAS (as `embed` does with the image) and, when its grid is not the
latent grid × the VAE factor (embed resizes images to the model's size multiple), nearest-resized to it.

Networks: the model's diffusion UNet loaded from its released checkpoint (`--weights-dir` / store / HF cache), with
its `scale_factor` (latents × scale_factor), FROZEN (requires_grad False, eval). The ControlNet is built from the
spec and initialised from the UNet by `monai.networks.utils.copy_model_state` (name + shape match), then, with
`--init`, from a ControlNet checkpoint (strict). Only the ControlNet trains: AdamW (reference lr 1e-5, weight decay
0.01) + PolynomialLR(power 2) stepped per iteration.

Step: t, x_t = add_noise and the target exactly as `maisi train diffusion` (its functions are reused: RFlow
velocity x0 − noise, DDPM noise); ControlNet(x_t, t, 8 bit planes of the label, class label) → residuals;
frozen UNet(x_t, t, spacing ×100, class label, regions ×100, residuals). Loss L1 (fp32); with `--weighted-label`,
voxels of the latent grid whose nearest-downsampled label is one of those ids weigh `--weighted-loss` on every
latent channel (reference `weighted_loss > 1` branch), loss = mean(|out − target| · w).

MONAI's `DiffusionModelUNetMaisi.forward` adds the ControlNet residuals IN PLACE into its own activations
(`down_block_res_sample += residual`, `h += mid_residual`). Those activations are also inputs of later layers, so
whenever autograd saved them (any UNet parameter or input requiring grad) backward fails with "modified by an inplace
operation". A frozen UNet only escapes by accident. `unet_with_residuals` runs the same forward with out-of-place
additions, so gradients reach the ControlNet whatever requires grad in the UNet. It keeps MONAI's aliasing effect
(the last level's output is also its last skip, so the middle block sees it with the residual added), so its numbers
equal MONAI's forward — the one the released weights and `maisi generate` use (tested).

Outputs in `--out`: `controlnet.pt` in the released layout (`controlnet_state_dict`, `epoch`, `loss`) — use it as
`models/controlnet_3d_<model>.pt` in a `--weights-dir` for `maisi generate` — and `train_state.pt` (optimiser,
GradScaler, LR schedule, epoch, RNG) for `--resume`; both written by rank 0 after every epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.utils import copy_model_state
from monai.transforms import EnsureChannelFirst, LoadImage, Orientation, Resize
from pydantic import Field

from maisi_cli.engine.networks import build_network
from maisi_cli.engine.progress import ProgressCallback
from maisi_cli.engine.sampling import label_bit_planes
from maisi_cli.engine.train.common import TrainConfig, TrainingError
from maisi_cli.engine.train.diffusion import (LatentDataset, LatentTrainer, build_training_scheduler, collate,
                                              conditions_of, training_target)
from maisi_cli.engine.train.loop import RunResult, TrainingParts, TrainingRun, distributed_loader, run_training
from maisi_cli.engine.weights import WeightFile, load_into, locate_weight, save_released_checkpoint
from maisi_cli.io.datalists import read_datalist

CHECKPOINT = "controlnet.pt"
STATE = "train_state.pt"


class ControlNetTrainConfig(TrainConfig):
    data: Path
    model: str = "rflow-ct"
    weights_dir: Path | None = None
    lr: float = Field(1e-5, gt=0)
    weighted_label: list[int] = Field(default_factory=list)
    weighted_loss: float = Field(100.0, gt=0)
    init: Path | None = None


# --- data ---------------------------------------------------------------------------------------------------------
def read_controlnet_datalist(path: Path) -> list[dict[str, Any]]:
    """The training items with `image` (latent) and `label` (label map) made absolute, relative to the file."""
    items = read_datalist(path, empty_error=TrainingError)
    resolved = []
    for number, item in enumerate(items):
        label = item.get("label")
        if not isinstance(label, str) or not label:
            raise TrainingError(f"--data: '{path}' training item {number} ('{item['image']}') has no \"label\" path; "
                                f"ControlNet training needs the label map of every latent (list a \"label\" per "
                                f"image for `maisi data embed`)")
        label_path = (path.parent / label).resolve()
        if not label_path.is_file():
            raise TrainingError(f"--data: label '{label_path}' (training item {number}) does not exist")
        resolved.append({**item, "label": str(label_path)})
    return resolved


def load_label(path: Path, grid: tuple[int, int, int]) -> torch.Tensor:
    """(1, X, Y, Z) uint8 label map in RAS on `grid` (nearest-resized when it is on another one)."""
    try:
        volume = Orientation(axcodes="RAS", labels=None)(EnsureChannelFirst()(LoadImage(image_only=True)(str(path))))
    except Exception as error:  # noqa: BLE001 — MONAI wraps reader errors in RuntimeError
        raise TrainingError(f"--data: label '{path}' is not a readable image "
                            f"({str(error).splitlines()[0][:120]})") from None
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise TrainingError(f"--data: label '{path}' has shape {tuple(volume.shape)}; a 3-D label map is needed")
    if tuple(volume.shape[1:]) != tuple(grid):
        volume = Resize(spatial_size=grid, mode="nearest")(volume)
    labels = torch.as_tensor(np.asarray(volume)).round().to(torch.int64)
    if labels.min() < 0 or labels.max() > 255:
        raise TrainingError(f"--data: label '{path}' has values outside 0..255 ({int(labels.min())}.."
                            f"{int(labels.max())}); the ControlNet condition holds 8 bits")
    return labels.to(torch.uint8)


class LabelledLatentDataset(torch.utils.data.Dataset):
    """LatentDataset items plus "label": (1, x·f, y·f, z·f) uint8, f = the VAE factor."""

    def __init__(self, items: list[dict[str, Any]], need_regions: bool, vae_factor: int):
        self.latents = LatentDataset(items, need_regions=need_regions)
        self.vae_factor = vae_factor

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.latents[index]
        grid = tuple(int(s) * self.vae_factor for s in sample["latent"].shape[1:])
        sample["label"] = load_label(Path(self.latents.items[index]["label"]), grid)  # type: ignore[arg-type]
        return sample


# --- the forward and the loss ---------------------------------------------------------------------------------------
def unet_with_residuals(unet: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
                        down_residuals: list[torch.Tensor], mid_residual: torch.Tensor,
                        **conditions: torch.Tensor) -> torch.Tensor:
    """`DiffusionModelUNetMaisi.forward` with the ControlNet residuals added out of place (MONAI adds them in place
    into activations autograd may have saved; see the module docstring). Same numbers as MONAI's forward."""
    emb = unet._get_time_and_class_embedding(x, timesteps, conditions.get("class_labels"))
    emb = unet._get_input_embeddings(emb, conditions.get("top_region_index_tensor"),
                                     conditions.get("bottom_region_index_tensor"), conditions.get("spacing_tensor"))
    h = unet.conv_in(x)
    skips: list[torch.Tensor] = [h]
    for block in unet.down_blocks:
        h, res_samples = block(hidden_states=h, temb=emb, context=None)
        skips.extend(res_samples)
    if len(skips) != len(down_residuals):
        raise TrainingError(f"the ControlNet gives {len(down_residuals)} down residuals, the UNet has {len(skips)} "
                            f"skip connections; the model's controlnet_def does not match its diffusion_unet_def")
    # MONAI's in-place add also changes every alias of a skip tensor: a tensor listed twice gets both residuals, and
    # the last level's output `h` is its last skip, so the middle block sees h + residual. Kept, out of place.
    added: dict[int, torch.Tensor] = {}
    for skip, residual in zip(skips, down_residuals):
        added[id(skip)] = added.get(id(skip), skip) + residual
    h = added.get(id(h), h)
    skips = [added[id(skip)] for skip in skips]
    h = unet.middle_block(h, emb, None) + mid_residual
    h = unet._apply_up_blocks(h, emb, None, skips)
    return unet.out(h)


def loss_weights(labels: torch.Tensor, latent_shape: torch.Size, weighted_labels: list[int],
                 weight: float) -> torch.Tensor | None:
    """(B, C, x, y, z) weights: `weight` where the label, nearest-downsampled to the latent grid, is one of
    `weighted_labels`, 1 elsewhere (reference §4.5); None when no label is weighted (plain L1)."""
    if not weighted_labels or weight == 1.0:
        return None
    small = torch.nn.functional.interpolate(labels.float(), size=tuple(latent_shape[2:]), mode="nearest")
    roi = torch.isin(small.long(), torch.tensor(weighted_labels, device=labels.device))
    weights = torch.ones(latent_shape, dtype=torch.float32, device=labels.device)
    weights[roi.expand(latent_shape)] = float(weight)
    return weights


def controlnet_loss(controlnet: torch.nn.Module, unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor,
                    noise: torch.Tensor, timesteps: torch.Tensor, label_planes: torch.Tensor,
                    unet_conditions: dict[str, torch.Tensor], controlnet_conditions: dict[str, torch.Tensor],
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) L1 between the ControlNet-steered UNet's output at x_t and the diffusion trainer's target (fp32)."""
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    down, mid = controlnet(x=noisy, timesteps=timesteps, controlnet_cond=label_planes, **controlnet_conditions)
    output = unet_with_residuals(unet, noisy, timesteps, down, mid, **unet_conditions)
    error = (output.float() - training_target(scheduler, latents, noise).float()).abs()
    return error.mean() if weights is None else (error * weights).mean()


# --- the run ------------------------------------------------------------------------------------------------------
def train_controlnet(config: ControlNetTrainConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train (or resume) the ControlNet of `config.model` against its frozen UNet; returns a summary."""
    return run_training(ControlNetTrainer(config), on_progress)


def frozen_unet(run: TrainingRun, weights_dir: Path | None) -> tuple[torch.nn.Module, WeightFile, torch.Tensor]:
    """(the model's released diffusion UNet in eval mode without gradients, its file, its scale factor)."""
    weight = locate_weight(run.spec, "diffusion_unet", weights_dir)
    unet = build_network(run.spec, "diffusion_unet", run.device)
    scale_factor = load_into(unet, weight, run.spec)["scale_factor"]
    unet = unet.to(run.device).eval()
    for parameter in unet.parameters():
        parameter.requires_grad_(False)
    return unet, weight, scale_factor


def controlnet_from_unet(run: TrainingRun, unet: torch.nn.Module) -> torch.nn.Module:
    """The spec's ControlNet with the UNet's weights wherever name and shape match (`copy_model_state`)."""
    controlnet = build_network(run.spec, "controlnet", run.device)
    # MONAI logs "'dst' model updated: …" at INFO on stdout, which would break `--json` (one per rank): silenced.
    monai_logger = logging.getLogger("monai.networks.utils")
    level = monai_logger.level
    monai_logger.setLevel(logging.WARNING)
    try:
        copy_model_state(controlnet, unet.state_dict())
    finally:
        monai_logger.setLevel(level)
    return controlnet


class ControlNetTrainer(LatentTrainer):
    kind, component, checkpoint_name = "controlnet", "controlnet", CHECKPOINT
    config: ControlNetTrainConfig

    def check(self) -> None:
        if self.config.init is not None and not self.config.init.is_file():
            raise TrainingError(f"--init: '{self.config.init}' does not exist; give a ControlNet checkpoint")

    def build(self, run: TrainingRun) -> TrainingParts:
        config, spec = self.config, run.spec
        self.run = run
        items = read_controlnet_datalist(config.data)
        self.unet, self.unet_weight, self.scale_factor = frozen_unet(run, config.weights_dir)
        self.read_conditioning(self.unet)
        controlnet = controlnet_from_unet(run, self.unet)
        self.controlnet_modality = getattr(controlnet, "num_class_embeds", None) is not None
        if config.resume:
            load_into(controlnet, WeightFile("controlnet", CHECKPOINT, run.checkpoint, "path"), spec)
        elif config.init is not None:
            load_into(controlnet, WeightFile("controlnet", config.init.name, config.init, "path"), spec)
        self.controlnet = self.trained = controlnet.to(run.device).train()
        self.scheduler = build_training_scheduler(spec, None)

        dataset = LabelledLatentDataset(items, need_regions=self.uses_regions, vae_factor=spec.vae_downsample)
        sampler, loader = distributed_loader(dataset, config, run.runtime, collate_fn=collate)
        optimisation = self.decaying_optimisation(run, self.controlnet, torch.optim.AdamW, len(dataset))
        return TrainingParts(loader, sampler, [optimisation], len(dataset))

    def step_inputs(self, batch: dict[str, Any], latents: torch.Tensor) -> dict[str, Any]:
        device = self.run.device
        labels = batch["label"].to(device)
        controlnet_conditions = {}
        if self.controlnet_modality:
            controlnet_conditions["class_labels"] = conditions_of(batch, True, False, device)["class_labels"]
        return {"label_planes": labels, "controlnet_conditions": controlnet_conditions,
                "unet_conditions": conditions_of(batch, self.uses_modality, self.uses_regions, device),
                "weights": loss_weights(labels, latents.shape, self.config.weighted_label, self.config.weighted_loss)}

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             inputs: dict[str, Any]) -> torch.Tensor:
        return controlnet_loss(self.model, self.unet, self.scheduler, latents, noise, timesteps,
                               label_bit_planes(inputs["label_planes"]), inputs["unet_conditions"],
                               inputs["controlnet_conditions"], inputs["weights"])

    def save(self, epoch: int, metrics: dict[str, float], validation: dict[str, Any] | None) -> None:
        save_released_checkpoint(self.controlnet, "controlnet", self.run.checkpoint, epoch=epoch,
                                 loss=metrics["loss"])

    def summary(self, result: RunResult) -> dict[str, Any]:
        config = self.config
        return {**self.base_summary(result), "unet": str(self.unet_weight.path),
                "scale_factor": float(self.scale_factor),
                "initialised_from": str(config.init) if config.init else ("resume" if config.resume
                                                                          else "diffusion_unet"),
                "weighted_labels": list(config.weighted_label),
                "weighted_loss": config.weighted_loss if config.weighted_label else 1.0,
                **self.run_summary(result), **self.process_summary(result)}

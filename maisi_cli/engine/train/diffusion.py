"""Diffusion UNet training on pre-computed latents (reference-training-fid-trt.md §3).

RFlow: t = `RFlowScheduler.sample_timesteps` (uniform, resolution-shifted), x_t = `add_noise`, target x0 − noise.
DDPM: t = randint(0, T), x_t = `add_noise`, target = noise (epsilon prediction).
Conditions: spacing ×100, the modality class label (models with `num_class_embeds`), region one-hots ×100 (models
with region inputs). Loss L1 (mean, fp32). Adam + PolynomialLR(power 2) stepped per iteration.

Scale factor: 1/std of the first batch's latents, averaged over ranks, computed ONCE at the start of a fresh run. It
is kept on `--resume` (read back from `diff_unet.pt`) and when `--init` fine-tunes a released checkpoint (taken from
it). The reference recomputes it on every run, fine-tuning included (§3.4), so a fine-tuned UNet would be trained in
a latent scale other than the one its weights learnt and that generation divides by — fixed here on purpose.

Outputs in `--out`: `diff_unet.pt` in the released layout (`unet_state_dict`, `scale_factor`, `epoch`, `loss`,
`num_train_timesteps`), loadable by `maisi generate` as the model's diffusion_unet, and `train_state.pt`
(optimiser, GradScaler, LR schedule, epoch, RNG) for `--resume`. Both are written by rank 0 after every epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler

from maisi_cli.engine.networks import build_network, build_scheduler, resolve_definition
from maisi_cli.engine.progress import ProgressCallback
from maisi_cli.engine.runtime import Runtime
from maisi_cli.engine.train.common import TrainConfig, TrainingError, all_reduce, make_scaler, wrap_ddp
from maisi_cli.engine.train.loop import (Optimisation, RunResult, Trainer, TrainingParts, TrainingRun,
                                         distributed_loader, optimizer_steps, run_training)
from maisi_cli.engine.weights import WeightFile, load_into, save_released_checkpoint
from maisi_cli.io.datalists import read_datalist
from maisi_cli.io.provenance import read_json
from maisi_cli.labels import modality_id

CHECKPOINT = "diff_unet.pt"
STATE = "train_state.pt"

# Scheduler definitions used when `--scheduler` differs from the model's own (the reference network defs).
RFLOW_DEFAULT = {"_target_": "monai.networks.schedulers.rectified_flow.RFlowScheduler", "num_train_timesteps": 1000,
                 "use_discrete_timesteps": False, "use_timestep_transform": True, "sample_method": "uniform",
                 "scale": 1.4}
DDPM_DEFAULT = {"_target_": "monai.networks.schedulers.ddpm.DDPMScheduler", "num_train_timesteps": 1000,
                "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta", "clip_sample": False}


class DiffusionTrainConfig(TrainConfig):
    data: Path
    model: str = "rflow-ct"
    scheduler: Literal["rflow", "ddpm"] | None = None  # None: the model's
    init: Path | None = None


# --- data ---------------------------------------------------------------------------------------------------------
class LatentDataset(torch.utils.data.Dataset):
    """Items of an embeddings datalist → {"latent": (C, x, y, z), "spacing": (3,), regions (4,) when present,
    "modality": str}. Fields missing from the item are read from the `<latent>.json` sidecar."""

    def __init__(self, items: list[dict[str, Any]], need_regions: bool):
        self.items = []
        for item in items:
            merged = {**(read_json(Path(item["image"] + ".json")) or {}), **item}
            if "spacing" not in merged:
                raise TrainingError(f"--data: '{item['image']}' has no spacing (neither in the datalist nor in its "
                                    f"sidecar .json); re-create it with `maisi data embed`")
            if need_regions and not ("top_region_index" in merged and "bottom_region_index" in merged):
                raise TrainingError(f"--data: '{item['image']}' has no top/bottom_region_index, which this model's "
                                    f"UNet needs; list a \"label\" per image for `maisi data embed`")
            self.items.append(merged)
        self.need_regions = need_regions

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        path = Path(item["image"])
        if not path.is_file():
            raise TrainingError(f"--data: latent '{path}' does not exist; run `maisi data embed` first")
        array = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        if array.ndim != 4:
            raise TrainingError(f"--data: latent '{path}' has shape {array.shape}; expected (x, y, z, channels)")
        sample = {"latent": torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))),
                  "spacing": torch.tensor(item["spacing"], dtype=torch.float32),
                  "modality": str(item.get("modality", "ct"))}
        if self.need_regions:
            sample["top_region_index"] = torch.tensor(item["top_region_index"], dtype=torch.float32)
            sample["bottom_region_index"] = torch.tensor(item["bottom_region_index"], dtype=torch.float32)
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    shapes = {tuple(s["latent"].shape) for s in samples}
    if len(shapes) > 1:
        raise TrainingError(f"--batch-size: latents of one batch must share a shape, got {sorted(shapes)}; use "
                            f"--batch-size 1 or latents of one size")
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key != "modality"}
    batch["modality"] = [s["modality"] for s in samples]
    return batch


# --- the loss -----------------------------------------------------------------------------------------------------
def is_rflow(scheduler: Any) -> bool:
    return isinstance(scheduler, RFlowScheduler)


def sample_timesteps(scheduler: Any, latents: torch.Tensor) -> torch.Tensor:
    if is_rflow(scheduler):
        return scheduler.sample_timesteps(latents)
    return torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), device=latents.device).long()


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """RFlow predicts the velocity x0 − noise; DDPM (epsilon prediction) the noise."""
    if is_rflow(scheduler):
        return latents - noise
    if getattr(scheduler, "prediction_type", "epsilon") != "epsilon":
        raise TrainingError("--scheduler: only epsilon prediction is supported for DDPM training")
    return noise


def diffusion_loss(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 between the UNet's output at x_t = add_noise(latents, noise, t) and the scheduler's target (fp32)."""
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    output = unet(x=noisy, timesteps=timesteps, **conditions)
    return torch.nn.functional.l1_loss(output.float(), training_target(scheduler, latents, noise).float())


def conditions_of(batch: dict[str, Any], uses_modality: bool, uses_regions: bool,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """UNet keyword inputs: spacing ×100, class labels (modality ids), region one-hots ×100."""
    conditions = {"spacing_tensor": batch["spacing"].to(device) * 1e2}
    if uses_modality:
        conditions["class_labels"] = torch.tensor([modality_id(m) for m in batch["modality"]], dtype=torch.long,
                                                  device=device)
    if uses_regions:
        conditions["top_region_index_tensor"] = batch["top_region_index"].to(device) * 1e2
        conditions["bottom_region_index_tensor"] = batch["bottom_region_index"].to(device) * 1e2
    return conditions


def build_training_scheduler(spec: Any, choice: str | None) -> Any:
    if choice is None or choice == spec.scheduler_kind:
        return build_scheduler(spec)
    cls, kwargs = resolve_definition(spec.network, RFLOW_DEFAULT if choice == "rflow" else DDPM_DEFAULT)
    return cls(**kwargs)


# --- the run ------------------------------------------------------------------------------------------------------
def first_batch_scale_factor(dataset: LatentDataset, indices: list[int], batch_size: int,
                             runtime: Runtime) -> torch.Tensor:
    """1/std of the first batch this rank trains on, averaged over ranks (reference `calculate_scale_factor`).
    Reads the dataset directly, so no DataLoader iterator touches the RNG."""
    batch = collate([dataset[i] for i in indices[:batch_size]])
    scale = (1.0 / torch.std(batch["latent"])).reshape(()).to(runtime.device)
    return all_reduce(scale, runtime, average=True).cpu()


def train_diffusion(config: DiffusionTrainConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train (or resume/fine-tune) the UNet of `config.model`; returns a summary. Call under torchrun for DDP."""
    return run_training(DiffusionTrainer(config), on_progress)


class LatentTrainer(Trainer):
    """What diffusion and ControlNet training share: latents × the scale factor, the scheduler's noise and
    timesteps, one optimiser + PolynomialLR(power 2) stepped per iteration, the released checkpoint's epoch/loss."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.trained: torch.nn.Module | None = None  # the network the optimiser trains (set by `build`)
        self.scale_factor = torch.ones(())
        self.scheduler: Any = None
        self.optimisation: Optimisation | None = None

    def read_conditioning(self, unet: torch.nn.Module) -> None:
        """Which conditions the UNet takes, read from the plain module: DDP does not forward these attributes
        (a reference bug, §5/§11.1)."""
        self.uses_modality = getattr(unet, "num_class_embeds", None) is not None
        self.uses_regions = bool(getattr(unet, "include_top_region_index_input", False))

    def wrap(self, runtime: Runtime) -> None:
        self.model = wrap_ddp(self.trained, runtime)
        self.scale = self.scale_factor.to(runtime.device)

    def begin_epoch(self, epoch: int) -> None:
        self.model.train()

    def decaying_optimisation(self, run: TrainingRun, network: torch.nn.Module,
                              optimizer_class: type[torch.optim.Optimizer], samples: int) -> Optimisation:
        """`optimizer_class` over `network`'s parameters at --lr, decayed to 0 over the run's steps."""
        config = self.config
        optimizer = optimizer_class(network.parameters(), lr=config.lr)
        total_steps = optimizer_steps(samples, config.batch_size, run.runtime.world_size, config.epochs)
        schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=2.0)
        self.optimisation = Optimisation(optimizer, schedule, make_scaler(run.device, *run.amp))
        return self.optimisation

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        latents = batch["latent"].to(self.run.device) * self.scale
        inputs = self.step_inputs(batch, latents)
        self.optimisation.zero_grad()
        with self.run.autocast():
            noise = torch.randn_like(latents)
            timesteps = sample_timesteps(self.scheduler, latents)
            loss = self.loss(latents, noise, timesteps, inputs)
        self.optimisation.step(loss)
        return {"loss": float(loss.item())}

    def step_inputs(self, batch: dict[str, Any], latents: torch.Tensor) -> dict[str, Any]:
        """What the loss needs of `batch` besides the latents (drawn before the noise)."""
        raise NotImplementedError

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             inputs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def base_summary(self, result: RunResult) -> dict[str, Any]:
        return {"checkpoint": str(result.run.checkpoint), "train_state": str(result.run.state),
                "model": result.run.spec.name, "scheduler": "rflow" if is_rflow(self.scheduler) else "ddpm"}

    @staticmethod
    def run_summary(result: RunResult) -> dict[str, Any]:
        return {"epochs": result.run.config.epochs, "start_epoch": result.start_epoch,
                "loss": result.metrics["loss"]}

    @staticmethod
    def process_summary(result: RunResult) -> dict[str, Any]:
        return {"samples": result.samples, "world_size": result.run.runtime.world_size,
                "device": str(result.run.device), "amp": result.run.amp[0]}


class DiffusionTrainer(LatentTrainer):
    kind, component, checkpoint_name = "diffusion", "diffusion_unet", CHECKPOINT
    config: DiffusionTrainConfig

    def build(self, run: TrainingRun) -> TrainingParts:
        config, device, spec = self.config, run.device, run.spec
        self.run = run
        unet = build_network(spec, "diffusion_unet", device).to(device)
        self.read_conditioning(unet)
        self.scheduler = build_training_scheduler(spec, config.scheduler)

        dataset = LatentDataset(read_datalist(config.data, empty_error=TrainingError), need_regions=self.uses_regions)
        sampler, loader = distributed_loader(dataset, config, run.runtime, collate_fn=collate)
        self.scale_factor, self.scale_source = self.initial_weights(unet, dataset, sampler, run)
        self.unet = self.trained = unet.to(device).train()
        optimisation = self.decaying_optimisation(run, self.unet, torch.optim.Adam, len(dataset))
        return TrainingParts(loader, sampler, [optimisation], len(dataset))

    def initial_weights(self, unet: torch.nn.Module, dataset: LatentDataset, sampler: Any,
                        run: TrainingRun) -> tuple[torch.Tensor, str]:
        """Load --resume's or --init's weights and keep their scale factor, or measure it on the first batch."""
        config = self.config
        if config.resume:
            weight = WeightFile("diffusion_unet", CHECKPOINT, run.checkpoint, "path")
            return load_into(unet, weight, run.spec)["scale_factor"], f"kept from {run.checkpoint}"
        if config.init is not None:
            if not config.init.is_file():
                raise TrainingError(f"--init: '{config.init}' does not exist; give a diffusion UNet checkpoint")
            weight = WeightFile("diffusion_unet", config.init.name, config.init, "path")
            return load_into(unet, weight, run.spec)["scale_factor"], f"kept from {config.init}"
        sampler.set_epoch(0)
        scale_factor = first_batch_scale_factor(dataset, list(iter(sampler)), config.batch_size, run.runtime)
        if not torch.isfinite(scale_factor):
            raise TrainingError("--data: the first batch's latents have zero or non-finite spread; check the latents")
        return scale_factor, "first batch"

    def step_inputs(self, batch: dict[str, Any], latents: torch.Tensor) -> dict[str, Any]:
        return conditions_of(batch, self.uses_modality, self.uses_regions, self.run.device)

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             inputs: dict[str, Any]) -> torch.Tensor:
        return diffusion_loss(self.model, self.scheduler, latents, noise, timesteps, inputs)

    def save(self, epoch: int, metrics: dict[str, float], validation: dict[str, Any] | None) -> None:
        save_released_checkpoint(self.unet, "diffusion_unet", self.run.checkpoint,
                                 scale_factor=float(self.scale_factor), epoch=epoch, loss=metrics["loss"],
                                 num_train_timesteps=int(self.scheduler.num_train_timesteps))

    def summary(self, result: RunResult) -> dict[str, Any]:
        return {**self.base_summary(result), **self.run_summary(result),
                "scale_factor": float(self.scale_factor), "scale_factor_source": self.scale_source,
                **self.process_summary(result)}

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

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from maisi_cli.engine.train.common import (
    Runtime,
    TrainConfig,
    TrainingError,
    TrainProgress,
    all_reduce,
    amp_settings,
    autocast,
    barrier,
    epoch_loss,
    make_scaler,
    optimizer_step,
    optimizer_steps,
    read_datalist,
    restore_training_state,
    run_identity,
    save_atomic,
    seed_everything,
    setup_runtime,
    start_or_resume,
    step_event,
    teardown_runtime,
    training_state,
    wrap_ddp,
)

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
        from maisi_cli.io.provenance import read_json

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
        import nibabel as nib

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
    from monai.networks.schedulers import RFlowScheduler

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
    from maisi_cli.labels import modality_id

    conditions = {"spacing_tensor": batch["spacing"].to(device) * 1e2}
    if uses_modality:
        conditions["class_labels"] = torch.tensor([modality_id(m) for m in batch["modality"]], dtype=torch.long,
                                                  device=device)
    if uses_regions:
        conditions["top_region_index_tensor"] = batch["top_region_index"].to(device) * 1e2
        conditions["bottom_region_index_tensor"] = batch["bottom_region_index"].to(device) * 1e2
    return conditions


def build_training_scheduler(spec: Any, choice: str | None) -> Any:
    from maisi_cli.engine.networks import build_scheduler, resolve_definition

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


def train_diffusion(config: DiffusionTrainConfig, on_progress: TrainProgress | None = None) -> dict[str, Any]:
    """Train (or resume/fine-tune) the UNet of `config.model`; returns a summary. Call under torchrun for DDP."""
    runtime = setup_runtime(config.device)
    try:
        return _train(config, runtime, on_progress)
    finally:
        teardown_runtime(runtime)


def _train(config: DiffusionTrainConfig, runtime: Runtime, on_progress: TrainProgress | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.weights import WeightFile, load_into, save_released_checkpoint
    from maisi_cli.models import get_model

    device = runtime.device
    report = on_progress if (on_progress is not None and runtime.is_main) else (lambda event: None)
    spec = get_model(config.model)
    out = config.out
    checkpoint_path, state_path = out / CHECKPOINT, out / STATE
    identity = run_identity("diffusion", spec, "diffusion_unet")
    resume_state = start_or_resume(config, checkpoint_path, state_path, identity)
    amp_enabled, amp_dtype = amp_settings(config.amp, config.amp_dtype, device)
    seed_everything(config.seed + runtime.rank)

    unet = build_network(spec, "diffusion_unet", device).to(device)
    # Read the conditioning flags from the plain module, before any DDP wrapping (reference bug, §5/§11.1).
    uses_modality = getattr(unet, "num_class_embeds", None) is not None
    uses_regions = bool(getattr(unet, "include_top_region_index_input", False))
    scheduler = build_training_scheduler(spec, config.scheduler)

    items = read_datalist(config.data)
    dataset = LatentDataset(items, need_regions=uses_regions)
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=config.num_workers)

    start_epoch = 0
    scale_source = "first batch"
    if config.resume:
        weight = WeightFile("diffusion_unet", CHECKPOINT, checkpoint_path, "path")
        scale_factor = load_into(unet, weight, spec)["scale_factor"]
        scale_source = f"kept from {checkpoint_path}"
    elif config.init is not None:
        if not config.init.is_file():
            raise TrainingError(f"--init: '{config.init}' does not exist; give a diffusion UNet checkpoint")
        weight = WeightFile("diffusion_unet", config.init.name, config.init, "path")
        scale_factor = load_into(unet, weight, spec)["scale_factor"]
        scale_source = f"kept from {config.init}"
    else:
        sampler.set_epoch(0)
        scale_factor = first_batch_scale_factor(dataset, list(iter(sampler)), config.batch_size, runtime)
        if not torch.isfinite(scale_factor):
            raise TrainingError("--data: the first batch's latents have zero or non-finite spread; check the latents")
    unet = unet.to(device).train()

    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
    total_steps = optimizer_steps(len(dataset), config.batch_size, runtime.world_size, config.epochs)
    lr_schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=2.0)
    scaler = make_scaler(device, amp_enabled, amp_dtype)
    if config.resume:
        start_epoch = restore_training_state(resume_state, optimizer, scaler,
                                             lr_schedule, state_path)
        # Each rank restores rank 0's RNG (only rank 0 saves); offset by rank so ranks keep drawing apart.
        if runtime.rank:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + runtime.rank)

    model = wrap_ddp(unet, runtime)
    scale = scale_factor.to(device)
    last_loss = float("nan")
    steps_per_epoch = len(loader)
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, batches
        for step, batch in enumerate(loader, 1):
            latents = batch["latent"].to(device) * scale
            conditions = conditions_of(batch, uses_modality, uses_regions, device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp_enabled, amp_dtype):
                noise = torch.randn_like(latents)
                timesteps = sample_timesteps(scheduler, latents)
                loss = diffusion_loss(model, scheduler, latents, noise, timesteps, conditions)
            optimizer_step(loss, optimizer, scaler, lr_schedule)
            totals += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
            report(step_event(epoch, config.epochs, step, steps_per_epoch, loss, lr_schedule))
        last_loss = epoch_loss(totals, runtime, epoch)
        if runtime.is_main:
            save_released_checkpoint(unet, "diffusion_unet", checkpoint_path, scale_factor=float(scale_factor),
                                     epoch=epoch + 1, loss=last_loss,
                                     num_train_timesteps=int(scheduler.num_train_timesteps))
            save_atomic(training_state(epoch + 1, optimizer, scaler, lr_schedule, identity=identity), state_path)
        barrier(runtime)
        report({"event": "epoch", "epoch": epoch + 1, "epochs": config.epochs, "loss": last_loss,
                "seconds": time.perf_counter() - started, "samples": len(dataset)})
    return {
        "checkpoint": str(checkpoint_path),
        "train_state": str(state_path),
        "model": spec.name,
        "scheduler": "rflow" if is_rflow(scheduler) else "ddpm",
        "epochs": config.epochs,
        "start_epoch": start_epoch,
        "loss": last_loss,
        "scale_factor": float(scale_factor),
        "scale_factor_source": scale_source,
        "samples": len(dataset),
        "world_size": runtime.world_size,
        "device": str(device),
        "amp": amp_enabled,
    }

"""The training loop every `maisi train …` trainer runs; a `Trainer` supplies what differs (its data, networks and
optimisers, one optimisation step, validation, its checkpoint files and summary).

The loop owns: the torchrun process group, the checks of --out against --resume/--init, AMP, seeding, the resume of
the trained network's optimiser / GradScaler / LR schedule / RNG (ranks > 0 then draw apart), DDP wrapping, the
DistributedSampler's epoch, the per-step and per-epoch LR-schedule steps, the epoch's mean losses over all ranks
(a non-finite mean stops the run), the validation cadence, rank-0 saving of `train_state.pt` after the trainer's
checkpoint, and the progress events (rank 0 only):

    ProgressEvent("train", step, steps per epoch, "epoch e/E", metrics={"loss", "lr", "seconds"},
                  details={"epoch": e, "epochs": E})                                          after every step
    ProgressEvent("validate", 1, 1, "epoch e/E", metrics=the validation's numbers)       when it validated
    ProgressEvent("epoch", e, E, "epoch e/E", metrics=mean losses, seconds, samples[, validation numbers])

`lr` is the learning rate the step used (schedules step after the event); `seconds` the step's own time (its batch's
loading included). Rank 0 also keeps the run's record in --out, rewritten after each epoch: metrics.jsonl (every step
and epoch) and progress.png (the loss curves per epoch; engine/train/metrics.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler

from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.runtime import Runtime, barrier, setup_runtime, teardown_runtime
from maisi_cli.engine.train.common import (TrainConfig, TrainingError, all_reduce, amp_settings, autocast, rng_state,
                                           run_identity, save_atomic, seed_everything, set_rng_state, start_or_resume)
from maisi_cli.engine.train.metrics import MetricsLog
from maisi_cli.models import ModelSpec, get_model

STATE = "train_state.pt"


@dataclass
class Optimisation:
    """One optimiser with its GradScaler and LR schedule, stepped per optimiser step (`per_step`) or per epoch."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    per_step: bool = True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor) -> None:
        """Backward through the (possibly disabled) GradScaler and one optimiser step."""
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def learning_rate(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def state_dict(self, suffix: str = "") -> dict[str, Any]:
        return {f"optimizer{suffix}": self.optimizer.state_dict(), f"scaler{suffix}": self.scaler.state_dict(),
                f"lr_schedule{suffix}": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any], suffix: str = "") -> None:
        self.optimizer.load_state_dict(state[f"optimizer{suffix}"])
        if state.get(f"scaler{suffix}"):  # a disabled scaler saves {}, which an enabled one refuses
            self.scaler.load_state_dict(state[f"scaler{suffix}"])
        self.schedule.load_state_dict(state[f"lr_schedule{suffix}"])


@dataclass
class TrainingRun:
    """What a trainer's hooks know of the run: its settings, model, process, AMP and files."""

    config: TrainConfig
    spec: ModelSpec
    runtime: Runtime
    amp: tuple[bool, torch.dtype]  # (enabled, dtype)
    checkpoint: Path
    state: Path

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, *self.amp)


@dataclass
class TrainingParts:
    """What `Trainer.build` returns: the loader of this rank's batches and its sampler, the optimisations (the first
    is the trained network's: `train_state.pt` holds it under optimizer / scaler / lr_schedule) and the number of
    training items."""

    loader: Iterable[Any]
    sampler: DistributedSampler
    optimisations: list[Optimisation]
    samples: int


@dataclass
class RunResult:
    """What the loop hands to `Trainer.summary`."""

    run: TrainingRun
    start_epoch: int
    samples: int
    metrics: dict[str, float] = field(default_factory=lambda: {"loss": float("nan")})  # the last epoch's means


class Trainer:
    """The hooks of one kind of training, over its config (a TrainConfig that also names the `model`).
    `run_training` calls them in this order: `check`, `build`, `restore` (on --resume), `wrap`, then per epoch
    `begin_epoch`, `train_step` per batch, `validate` (every `validation_every` epochs, the first and the last;
    never when it is None), `save` and `state_extras` (rank 0); last `summary`."""

    kind: str  # recorded in train_state.pt; --resume refuses a state of another kind
    component: str  # the trained network (its definition's hash is recorded too)
    checkpoint_name: str  # the released-layout checkpoint in --out
    validation_every: int | None = None

    def __init__(self, config: TrainConfig):
        self.config = config

    def check(self) -> None:
        """Refuse settings before anything is built (after the --out / --resume checks)."""

    def build(self, run: TrainingRun) -> TrainingParts:
        """Data, networks and optimisers, in the order that fixes what the seeded RNG draws."""
        raise NotImplementedError

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """--resume: what `train_state.pt` holds beyond the trained network's optimisation and the RNG."""

    def wrap(self, runtime: Runtime) -> None:
        """Wrap the trained modules for DDP (after any resume)."""

    def begin_epoch(self, epoch: int) -> None:
        """Before the epoch's first batch (0-based `epoch`)."""

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step on `batch`; its losses, "loss" first (the same keys every step)."""
        raise NotImplementedError

    def validate(self, epoch: int) -> dict[str, float]:
        """The validation's numbers after epoch `epoch` (0-based), the same on every rank."""
        raise NotImplementedError

    def save(self, epoch: int, metrics: dict[str, float], validation: dict[str, Any] | None) -> None:
        """Rank 0, after epoch `epoch` (1-based): the checkpoint(s), before train_state.pt."""
        raise NotImplementedError

    def state_extras(self) -> dict[str, Any]:
        """What train_state.pt holds beyond epoch, the trained network's optimisation, RNG and identity."""
        return {}

    def summary(self, result: RunResult) -> dict[str, Any]:
        raise NotImplementedError


def distributed_loader(dataset: torch.utils.data.Dataset, config: TrainConfig, runtime: Runtime,
                       loader_class: type = torch.utils.data.DataLoader,
                       **options: Any) -> tuple[DistributedSampler, Iterable[Any]]:
    """(sampler, loader): this rank's shuffled share of `dataset` in batches of --batch-size (the sampler pads to
    ceil(items / world size) per rank)."""
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    loader = loader_class(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                          **options)
    return sampler, loader


def optimizer_steps(samples: int, batch_size: int, world_size: int, epochs: int) -> int:
    """Optimiser steps over the run: DistributedSampler pads to ceil(samples/world) per rank."""
    per_rank = math.ceil(samples / world_size)
    return epochs * math.ceil(per_rank / batch_size)


# --- the run ------------------------------------------------------------------------------------------------------
def run_training(trainer: Trainer, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train with `trainer`'s hooks, in this process or as one rank under torchrun; returns its summary."""
    runtime = setup_runtime(trainer.config.device)
    try:
        return _train(trainer, runtime, on_progress if (on_progress is not None and runtime.is_main) else no_progress)
    finally:
        teardown_runtime(runtime)


def _train(trainer: Trainer, runtime: Runtime, report: ProgressCallback) -> dict[str, Any]:
    config = trainer.config
    spec = get_model(config.model)
    checkpoint, state_path = config.out / trainer.checkpoint_name, config.out / STATE
    identity = run_identity(trainer.kind, spec, trainer.component)
    resume_state = start_or_resume(config, checkpoint, state_path, identity)
    trainer.check()
    amp = amp_settings(config.amp, config.amp_dtype, runtime.device)
    seed_everything(config.seed + runtime.rank)
    run = TrainingRun(config, spec, runtime, amp, checkpoint, state_path)
    parts = trainer.build(run)
    result = RunResult(run, start_epoch=0, samples=parts.samples)
    if resume_state is not None:
        result.start_epoch = _resume(trainer, parts, resume_state, run)
    trainer.wrap(runtime)
    log = MetricsLog(config.out, result.start_epoch, f"maisi train {trainer.kind}") if runtime.is_main else None
    for epoch in range(result.start_epoch, config.epochs):
        result.metrics = _epoch(trainer, parts, run, epoch, identity, report, log)
    return trainer.summary(result)


def _resume(trainer: Trainer, parts: TrainingParts, state: dict[str, Any], run: TrainingRun) -> int:
    """Restore the trained network's optimisation, the RNG and the trainer's extras; the number of finished
    epochs. Each rank restores rank 0's RNG (only rank 0 saves); ranks > 0 are then offset so they draw apart."""
    try:
        parts.optimisations[0].load_state_dict(state)
        set_rng_state(state["rng"])
        finished = int(state["epoch"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise TrainingError(f"--resume: '{run.state}' does not fit this run ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:120] if str(error) else ''}); start a new --out or drop "
                            f"--resume") from None
    trainer.restore(state, run.state)
    if run.runtime.rank:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + run.runtime.rank)
    return finished


def _epoch(trainer: Trainer, parts: TrainingParts, run: TrainingRun, epoch: int, identity: dict[str, str],
           report: ProgressCallback, log: MetricsLog | None = None) -> dict[str, float]:
    """One epoch (0-based): train, average, validate when due, save, record (rank 0's `log`), report; the epoch's
    mean losses."""
    config, runtime = run.config, run.runtime
    subject = f"epoch {epoch + 1}/{config.epochs}"
    parts.sampler.set_epoch(epoch)
    trainer.begin_epoch(epoch)
    started = time.perf_counter()
    sums = LossSums(run.device)
    steps = len(parts.loader)  # type: ignore[arg-type]
    step_started, lr = started, parts.optimisations[0].learning_rate()
    for step, batch in enumerate(parts.loader, 1):
        losses = trainer.train_step(batch)
        sums.add(losses)
        lr, now = parts.optimisations[0].learning_rate(), time.perf_counter()
        if log is not None:
            log.step(epoch + 1, step, losses, lr, now - step_started)
        report(ProgressEvent("train", step, steps, subject,
                             metrics={"loss": losses["loss"], "lr": lr, "seconds": now - step_started},
                             details={"epoch": epoch + 1, "epochs": config.epochs}))
        step_started = now
        _step_schedules(parts.optimisations, per_step=True)
    _step_schedules(parts.optimisations, per_step=False)
    metrics = sums.means(runtime, epoch)
    validation = None
    if trainer.validation_every and (epoch % trainer.validation_every == 0 or epoch == config.epochs - 1):
        validation = trainer.validate(epoch)
        report(ProgressEvent("validate", 1, 1, subject, metrics=validation))
    if runtime.is_main:
        trainer.save(epoch + 1, metrics, validation)
        state = {"epoch": epoch + 1, **parts.optimisations[0].state_dict(), "rng": rng_state(), "identity": identity,
                 **trainer.state_extras()}
        save_atomic(state, run.state)
    seconds = time.perf_counter() - started
    if log is not None:  # after train_state.pt: a resume keeps the records of the epochs it holds
        log.epoch(epoch + 1, config.epochs, metrics, lr, seconds, parts.samples, validation)  # lr: the epoch's last
        log.write()
    barrier(runtime)
    report(ProgressEvent("epoch", epoch + 1, config.epochs, subject,
                         metrics={**metrics, "seconds": seconds, "samples": parts.samples, **(validation or {})}))
    return metrics


def _step_schedules(optimisations: list[Optimisation], per_step: bool) -> None:
    for optimisation in optimisations:
        if optimisation.per_step == per_step:
            optimisation.schedule.step()


class LossSums:
    """An epoch's per-loss sums over this rank's steps, and the step count; averaged over every rank at the end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.sums = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, losses: dict[str, float]) -> None:
        if not self.names:
            self.names = list(losses)
            self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=self.device)
        self.sums += torch.tensor([*(losses[name] for name in self.names), 1.0], dtype=torch.float64,
                                  device=self.device)

    def means(self, runtime: Runtime, epoch: int) -> dict[str, float]:
        """Means over every rank's steps; a non-finite mean loss stops the run (0-based `epoch`)."""
        all_reduce(self.sums, runtime)
        steps = max(float(self.sums[-1]), 1.0)
        means = {name: float(self.sums[index]) / steps for index, name in enumerate(self.names)}
        loss = means.get("loss", float("nan"))
        if not math.isfinite(loss):
            raise TrainingError(f"training diverged: the loss of epoch {epoch + 1} is {loss}; lower --lr or use "
                                f"--no-amp")
        return means

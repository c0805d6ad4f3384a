"""engine/train/loop.py: the one training loop, driven by a toy trainer (a linear layer on six random items)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from maisi_cli.engine.progress import ProgressEvent
from maisi_cli.engine.train.common import TrainConfig, TrainingError, make_scaler, save_atomic
from maisi_cli.engine.train.loop import (Optimisation, RunResult, Trainer, TrainingParts, TrainingRun,
                                         distributed_loader, run_training)
from tests.helpers import Killed, kill_after_first_epoch, tiny_spec_document

ITEMS = 6


class ToyConfig(TrainConfig):
    model: str
    init: Path | None = None
    val_every: int = 2
    poison: bool = False  # every loss is NaN


class ToyTrainer(Trainer):
    kind, component, checkpoint_name = "toy", "autoencoder", "toy.pt"
    config: ToyConfig

    def build(self, run: TrainingRun) -> TrainingParts:
        self.run = run
        self.validation_every = self.config.val_every
        self.network = torch.nn.Linear(3, 1)  # drawn from the loop's seeded RNG
        if self.config.resume:
            self.network.load_state_dict(torch.load(run.checkpoint, weights_only=True))
        dataset = torch.utils.data.TensorDataset(torch.arange(ITEMS * 3.0).reshape(ITEMS, 3) / 10,
                                                 torch.arange(ITEMS * 1.0).reshape(ITEMS, 1))
        sampler, loader = distributed_loader(dataset, self.config, run.runtime)
        optimizer = torch.optim.SGD(self.network.parameters(), lr=self.config.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # halves every step
        self.optimisation = Optimisation(optimizer, schedule, make_scaler(run.device, *run.amp))
        self.validated: list[int] = []
        return TrainingParts(loader, sampler, [self.optimisation], ITEMS)

    def train_step(self, batch: Any) -> dict[str, float]:
        inputs, targets = batch
        self.optimisation.zero_grad()
        with self.run.autocast():
            loss = torch.nn.functional.mse_loss(self.network(inputs), targets)
            if self.config.poison:
                loss = loss * float("nan")
        self.optimisation.step(loss)
        return {"loss": loss.item(), "twice": 2 * loss.item()}

    def validate(self, epoch: int) -> dict[str, float]:
        self.validated.append(epoch)
        return {"val_loss": 10.0 + epoch}

    def save(self, epoch: int, metrics: dict[str, float], validation: dict[str, Any] | None) -> None:
        save_atomic(self.network.state_dict(), self.run.checkpoint)

    def state_extras(self) -> dict[str, Any]:
        return {"validated": list(self.validated)}

    def restore(self, state: dict[str, Any], path: Path) -> None:
        self.validated = list(state["validated"])

    def summary(self, result: RunResult) -> dict[str, Any]:
        return {"start_epoch": result.start_epoch, "samples": result.samples, **result.metrics,
                "validated": self.validated}


@pytest.fixture
def spec(tmp_path: Path) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_spec_document()))
    return str(path)


def toy(tmp_path: Path, spec: str, out: str = "run", **options: Any) -> ToyTrainer:
    values = {"out": tmp_path / out, "model": spec, "device": "cpu", "epochs": 3, "batch_size": 2, "lr": 0.08}
    return ToyTrainer(ToyConfig(**{**values, **options}))


def test_events_name_the_epoch_and_carry_loss_lr_validation_and_epoch_means(tmp_path, spec):
    events: list[ProgressEvent] = []
    summary = run_training(toy(tmp_path, spec), events.append)

    steps = [e for e in events if e.stage == "train"]
    assert [(e.subject, e.done, e.total) for e in steps] == [
        (f"epoch {epoch}/3", step, 3) for epoch in (1, 2, 3) for step in (1, 2, 3)]
    # The LR each step used: the schedule halves it after the event, 9 steps in all.
    assert [e.metrics["lr"] for e in steps] == pytest.approx([0.08 * 0.5**k for k in range(9)])
    # Validation on the first epoch, every 2nd after it and the last: epochs 1 and 3 (0-based 0 and 2).
    assert [(e.subject, e.metrics["val_loss"]) for e in events if e.stage == "validate"] == [
        ("epoch 1/3", 10.0), ("epoch 3/3", 12.0)]
    ends = [e for e in events if e.stage == "epoch"]
    assert [(e.done, e.total, e.subject) for e in ends] == [(k, 3, f"epoch {k}/3") for k in (1, 2, 3)]
    for end in ends:
        losses = [e.metrics["loss"] for e in steps if e.subject == end.subject]
        assert end.metrics["loss"] == pytest.approx(sum(losses) / 3)
        assert end.metrics["twice"] == pytest.approx(2 * end.metrics["loss"])
        assert end.metrics["samples"] == ITEMS and end.metrics["seconds"] >= 0
    assert "val_loss" in ends[0].metrics and "val_loss" not in ends[1].metrics
    # The order: each epoch's steps, its validation, then its end.
    assert [e.stage for e in events[:5]] == ["train", "train", "train", "validate", "epoch"]
    assert summary["loss"] == ends[-1].metrics["loss"] and summary["start_epoch"] == 0

    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert list(state)[:6] == ["epoch", "optimizer", "scaler", "lr_schedule", "rng", "identity"]
    assert state["epoch"] == 3 and state["identity"]["trainer"] == "toy" and state["validated"] == [0, 2]


def test_a_killed_run_resumes_to_the_same_weights_losses_and_schedule(tmp_path, spec):
    straight = run_training(toy(tmp_path, spec, out="straight"))
    with pytest.raises(Killed):
        run_training(toy(tmp_path, spec, out="split"), kill_after_first_epoch)
    assert torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)["epoch"] == 1
    events: list[ProgressEvent] = []
    resumed = run_training(toy(tmp_path, spec, out="split", resume=True), events.append)

    assert resumed["start_epoch"] == 1 and resumed["validated"] == straight["validated"] == [0, 2]
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-6)
    rates = [e.metrics["lr"] for e in events if e.stage == "train"]
    assert rates == pytest.approx([0.08 * 0.5**k for k in range(3, 9)])  # the schedule went on where it stopped
    a = torch.load(tmp_path / "straight" / "toy.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "toy.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_run_already_at_its_last_epoch_trains_nothing(tmp_path, spec):
    run_training(toy(tmp_path, spec, epochs=1))
    events: list[ProgressEvent] = []
    summary = run_training(toy(tmp_path, spec, epochs=1, resume=True), events.append)
    assert events == [] and summary["start_epoch"] == 1 and math.isnan(summary["loss"])


def test_a_non_finite_epoch_loss_stops_the_run_before_anything_is_saved(tmp_path, spec):
    with pytest.raises(TrainingError, match=r"^training diverged: the loss of epoch 1 is nan; lower --lr or use "
                                            r"--no-amp$"):
        run_training(toy(tmp_path, spec, poison=True))
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_out_and_resume_are_checked_with_the_trainers_identity(tmp_path, spec):
    run_training(toy(tmp_path, spec, epochs=1))
    with pytest.raises(TrainingError, match="already holds a training run"):
        run_training(toy(tmp_path, spec, epochs=2))

    class OtherToy(ToyTrainer):
        kind = "other"

    with pytest.raises(TrainingError, match="was written for trainer 'toy', this run is trainer 'other'"):
        run_training(OtherToy(toy(tmp_path, spec, epochs=2, resume=True).config))

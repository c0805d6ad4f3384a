"""A training run's own record in --out, rewritten atomically after every epoch (rank 0):

- `metrics.jsonl`: one JSON object a line, per optimiser step
  `{"kind": "step", "epoch", "step" (counted over the run), "epoch_step", "losses": {...}, "lr", "seconds"}`
  and per epoch `{"kind": "epoch", "epoch", "epochs", "losses": the epoch's means, "lr", "seconds", "samples",
  "val": the validation's numbers or null}` (epochs 1-based, as the progress bar shows them);
- `progress.png`: the loss curves per epoch (training means solid, validation dashed), the seconds per epoch and the
  learning rate, as nnU-Net's progress.png.

A resumed run keeps the records of the epochs its train_state.pt holds and continues them; records of an epoch that
was not saved (a run killed between the two writes) are dropped. matplotlib is imported only to draw (Agg canvas, no
pyplot, so no global backend is touched).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from maisi_cli.io.files import write_atomic

METRICS = "metrics.jsonl"
PLOT = "progress.png"


def numbers(values: dict[str, Any] | None) -> dict[str, float | None]:
    """The numeric entries of a metrics dict (a validation's dict also holds an epoch count and lists); a
    non-finite one as None (JSON has no NaN)."""
    return {key: float(value) if math.isfinite(value) else None for key, value in (values or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}


def read_records(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """The records of epochs 1..`up_to_epoch` in an existing metrics.jsonl (none when it is missing or unreadable;
    a malformed line ends the reading: the lines before it stand)."""
    records: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= up_to_epoch:
            records.append(record)
    return records


class MetricsLog:
    """The records of one run into `out`: `step` after each optimiser step, `epoch` when an epoch ends, `write`
    after the epoch is saved. `finished_epochs`: the epochs a resumed run starts after (0 for a new run)."""

    def __init__(self, out: Path, finished_epochs: int = 0, title: str = "training"):
        self.out = Path(out)
        self.title = title
        self.records = read_records(self.out / METRICS, finished_epochs) if finished_epochs else []
        self.steps = sum(record.get("kind") == "step" for record in self.records)

    def step(self, epoch: int, epoch_step: int, losses: dict[str, float], lr: float, seconds: float) -> None:
        self.steps += 1
        self.records.append({"kind": "step", "epoch": epoch, "step": self.steps, "epoch_step": epoch_step,
                             "losses": numbers(losses), "lr": lr, "seconds": round(seconds, 6)})

    def epoch(self, epoch: int, epochs: int, losses: dict[str, float], lr: float, seconds: float, samples: int,
              validation: dict[str, Any] | None) -> None:
        self.records.append({"kind": "epoch", "epoch": epoch, "epochs": epochs, "losses": numbers(losses), "lr": lr,
                             "seconds": round(seconds, 6), "samples": samples,
                             "val": numbers(validation) if validation is not None else None})

    def write(self) -> None:
        """metrics.jsonl, then progress.png, each through a temporary file renamed into place."""
        self.out.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(record) + "\n" for record in self.records)
        write_atomic(self.out / METRICS, text.encode())
        write_atomic(self.out / PLOT, progress_png(self.records, self.title))


def progress_png(records: list[dict[str, Any]], title: str) -> bytes:
    """Three panels over the epochs: losses (training means, validation dashed; a log scale when all are
    positive), seconds per epoch, learning rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [record for record in records if record.get("kind") == "epoch"]
    x = [record["epoch"] for record in epochs]
    figure = Figure(figsize=(9, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    losses_axis, seconds_axis, lr_axis = figure.subplots(3, 1, sharex=True)
    last = epochs[-1] if epochs else None
    figure.suptitle(f"{title}: epoch {last['epoch']} of {last['epochs']}" if last else title)
    values: list[float] = []
    for key in sorted({key for record in epochs for key in record["losses"]}):
        points = [(record["epoch"], record["losses"].get(key)) for record in epochs]
        points = [(e, v) for e, v in points if v is not None and math.isfinite(v)]
        if points:
            losses_axis.plot(*zip(*points), marker="o", markersize=3, label=f"train {key}")
            values += [v for _, v in points]
    # the validation's losses ("val_…"), not its counts or scale factor
    for key in sorted({key for record in epochs for key in (record.get("val") or {}) if key.startswith("val_")}):
        points = [(record["epoch"], record["val"].get(key)) for record in epochs if record.get("val")]
        points = [(e, v) for e, v in points if v is not None and math.isfinite(v)]
        if points:
            losses_axis.plot(*zip(*points), linestyle="--", marker="s", markersize=3,
                             label=f"val {key.removeprefix('val_')}")
            values += [v for _, v in points]
    if values and all(v > 0 for v in values):
        losses_axis.set_yscale("log")
    losses_axis.set_ylabel("loss (epoch mean)")
    if losses_axis.lines:
        losses_axis.legend(fontsize="small", loc="upper right")
    losses_axis.grid(True, alpha=0.3)
    seconds_axis.plot(x, [record["seconds"] for record in epochs], marker="o", markersize=3, color="tab:gray")
    seconds_axis.set_ylabel("seconds per epoch")
    seconds_axis.grid(True, alpha=0.3)
    lr_axis.plot(x, [record["lr"] for record in epochs], marker="o", markersize=3, color="tab:green")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("epoch")
    lr_axis.grid(True, alpha=0.3)
    if x:
        lr_axis.set_xlim(min(x) - 0.5, max(x) + 0.5)
        lr_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

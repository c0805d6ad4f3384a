"""One progress event for every long task: generation, training, FID, downloads, exports.

The engine reports `ProgressEvent`s through a callback; the CLI (cli/render.py) and the Python API's users decide
how to show them. A renderer reads the fields (`stage`, `sample`, `finished`, `metrics`) and never parses text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Stage = Literal[
    "load",  # loading and hashing networks
    "mask",  # making a condition mask (the mask generator's denoising)
    "denoise",  # the diffusion loop
    "decode",  # the VAE decode (one event per sliding window)
    "write",  # a sample's files are on disk
    "download", "hash", "import",  # weights and data files (engine/hub.py)
    "export",  # ONNX / TensorRT graphs
    "embed",  # `maisi train embed`: images to latents
    "train", "validate",  # one training step / one validation pass
    "epoch",  # a training epoch ended
    "features",  # FID feature extraction
    "index",  # `maisi data masks index`: reading the masks of a folder
    "phantoms",  # `maisi data phantoms`: drawing phantom label maps
]


@dataclass(frozen=True)
class ProgressEvent:
    """`done` of `total` units of `stage` are finished. `subject` names what the units belong to (a component, a
    file, a network); `sample` and `attempt` place a generation event; `metrics` carries numbers a stage reports
    (a training loss, a learning rate, a step's seconds)."""

    stage: Stage
    done: int
    total: int
    subject: str = ""
    sample: int | None = None
    attempt: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    case: str = ""  # the manifest case a generation event belongs to (`generate --manifest`)
    # What a finished unit produced beyond numbers, for a result line: a sample's "write" gives {"seed", "seconds",
    # "qc": {"passed", "failed"} or None, "attempts"}
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def label(self) -> str:
        """A short human name: "sample 0003 denoise", "sample 0003 retry 1 decode", "download models/x.pt", "ct_042
        sample 0000 denoise" (a manifest's case)."""
        where = f"{self.case} " if self.case else ""
        if self.sample is not None:
            where += f"sample {self.sample:04d}" + (f" retry {self.attempt}" if self.attempt else "")
        parts = [p for p in (where.strip(), self.stage, self.subject) if p]
        return " ".join(parts)


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The callback when nobody listens."""


class ProgressClock:
    """Elapsed times and estimates from a run's events, for renderers (bars, heartbeats) and API users.

    A stage starts when the event before its first one came (so a stage's first step counts from there) and its
    estimate is known from its first finished unit: seconds per unit so far × units left. A generation sample starts
    with its first event; its making ends when the next sample starts or its "write" event comes (a background
    writer may report it later). The run's estimate for `samples` samples: the mean making time of the samples made,
    or, before any is made, the current sample's finished stages plus its current stage's estimate.
    `label_of`: what makes one stage (the event's label by default); `now`: the clock (time.monotonic), replaceable
    in tests."""

    def __init__(self, samples: int | None = None, now: Callable[[], float] | None = None,
                 label_of: Callable[[ProgressEvent], str] | None = None):
        import time

        self.now = now or time.monotonic
        self.label_of = label_of or (lambda event: event.label)
        self.samples = samples
        self.started = self.now()
        self.last_at = self.started  # when the latest event came
        self.event: ProgressEvent | None = None
        self.stage_label: str | None = None
        self.stage_started = self.started
        self.current: tuple[str, int] | None = None  # (case, index) of the sample being made
        self.current_started = self.started
        self.current_stages = 0.0  # seconds of the current sample's finished stages
        self.made: list[float] = []  # making seconds of the samples made
        self.ended: set[tuple[str, int]] = set()  # (case, index) of the samples whose making ended
        self.written = 0

    def update(self, event: ProgressEvent) -> None:
        now = self.now()
        sample = (event.case, event.sample) if event.sample is not None else None
        if sample is not None and event.stage != "write" and sample != self.current:
            if self.current is not None and self.current not in self.ended:
                self._end_current(self.last_at)
            self.current, self.current_started, self.current_stages = sample, self.last_at, 0.0
        label = self.label_of(event)
        if label != self.stage_label:
            if self.event is not None and self._sample(self.event) == self.current == sample:
                self.current_stages += self.last_at - self.stage_started
            self.stage_label, self.stage_started = label, self.last_at
        if event.stage == "write" and event.finished and sample is not None:
            self.written += 1
            if sample == self.current and sample not in self.ended:
                self._end_current(now)
        self.event, self.last_at = event, now

    @staticmethod
    def _sample(event: ProgressEvent) -> tuple[str, int] | None:
        return (event.case, event.sample) if event.sample is not None else None

    def _end_current(self, at: float) -> None:
        self.ended.add(self.current)  # type: ignore[arg-type]
        self.made.append(at - self.current_started)

    # --- estimates -------------------------------------------------------------------------------------------------
    def stage_left(self) -> float | None:
        """Seconds left in the current stage, from its finished units (None before the first one)."""
        event = self.event
        if event is None or event.done <= 0 or event.total <= 0 or event.finished:
            return None if event is None or not event.finished else 0.0
        per_unit = (self.last_at - self.stage_started) / event.done
        return max(0.0, per_unit * (event.total - event.done) - (self.now() - self.last_at))

    def sample_estimate(self) -> float | None:
        """Seconds to make one sample: the mean of those made, else the current sample's estimate."""
        if self.made:
            return sum(self.made) / len(self.made)
        event = self.event
        if event is None or self.current is None or self._sample(event) != self.current or event.done <= 0 \
                or event.total <= 0:
            return None
        stage_total = (self.last_at - self.stage_started) / event.done * event.total
        return self.current_stages + stage_total

    def samples_made(self) -> float:
        """Samples made, the current one counted by its fraction so far."""
        made = len(self.made)
        if self.current is not None and self.current not in self.ended:
            estimate = self.sample_estimate()
            if estimate:
                made += min((self.now() - self.current_started) / estimate, 0.99)
        return made

    def run_left(self) -> float | None:
        """Seconds left to make the run's samples (None until an estimate exists)."""
        if not self.samples:
            return None
        estimate = self.sample_estimate()
        if estimate is None:
            return None
        return max(0.0, (self.samples - self.samples_made()) * estimate)

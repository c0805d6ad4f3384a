"""One progress event for every long task: generation, training, FID, downloads, exports.

The engine reports `ProgressEvent`s through a callback; the CLI (cli/render.py) and the Python API's users decide
how to show them. A renderer reads the fields (`stage`, `sample`, `finished`, `metrics`) and never parses text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

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
    (a training loss, a learning rate)."""

    stage: Stage
    done: int
    total: int
    subject: str = ""
    sample: int | None = None
    attempt: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    case: str = ""  # the manifest case a generation event belongs to (`generate --manifest`)

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

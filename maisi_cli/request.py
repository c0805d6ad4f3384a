"""The request model of `maisi generate`, shared by the CLI and the engine (pydantic: imported when a command runs,
not when the CLI only builds its command tree for --help or shell completion)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from maisi_cli.config import FloatTriple, Triple, format_triple, spacing_problem
from maisi_cli.errors import UsageError

Precision = Literal["fp32", "fp16", "bf16"]
LabelMode = Literal["full", "requested"]
Backend = Literal["torch", "onnx", "trt"]
OutputFormat = Literal["nifti", "nii", "nrrd", "dicom"]


class GenerateRequest(BaseModel):
    """Everything `maisi generate` was asked for, after parsing; model and profile are still names."""

    model_config = ConfigDict(frozen=True)

    model: str = "rflow-ct"
    profile: str = "auto"
    size: Triple | None = None
    spacing: FloatTriple | None = None
    num_samples: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    steps: int | None = Field(None, ge=1)
    mask: Path | None = None
    mask_labels: str = "maisi"  # `--mask-labels`: the label scheme of --mask (maisi_cli/label_schemes.py)
    body_from: str | None = None  # `--body-from`: a CT's path, or "labels": how to add the body label to --mask
    anatomy: tuple[str, ...] = ()
    anatomy_sizes: tuple[tuple[str, float], ...] = ()  # `--anatomy NAME:SIZE`: generate the mask
    body_regions: tuple[str, ...] = ()
    mask_database: Path | None = None
    allow_outside_database: bool = False  # `--allow-outside-database`: entries may lie outside the mask folder
    mask_steps: int | None = Field(None, ge=1)
    augment: bool = True
    label_mode: LabelMode = "full"
    out: Path = Path("maisi-out")
    output_format: OutputFormat = "nifti"  # `--format`: the files of each pair (maisi_cli/engine/outputs.py)
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    device: str = "auto"
    precision: Precision | None = None
    allow_any_size: bool = False
    weights_dir: Path | None = None
    backend: Backend = "torch"  # `--backend`: PyTorch, onnxruntime or TensorRT (engine/backends.py)
    onnx_dir: Path | None = None  # `--onnx-dir`: a `maisi export onnx` folder (default: MAISI_HOME/onnx)
    guidance: float | None = Field(None, ge=0)  # `--guidance S`: classifier-free guidance, on above 0; 0 = off

    @field_validator("spacing")
    @classmethod
    def _spacing_in_range(cls, spacing: FloatTriple | None) -> FloatTriple | None:
        """The same bounds as `--spacing` for a request built in code (a UsageError is not wrapped by pydantic)."""
        problem = None if spacing is None else spacing_problem(spacing)
        if problem:
            raise UsageError(f"--spacing: {format_triple(spacing)} is not a spacing; {problem}")
        return spacing

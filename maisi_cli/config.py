"""Parsing of `512x512x512` / `1.0x1.0x1.0` strings and the other small settings the CLI and the engine share.

No torch and no pydantic here: the CLI imports this module to answer `--help` and shell completion quickly (the
request model, which needs pydantic, is maisi_cli/request.py).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from maisi_cli.errors import UsageError

Triple = tuple[int, int, int]
FloatTriple = tuple[float, float, float]


_SEPARATORS = re.compile(r"\s*[x,×]\s*")


def parse_size(text: str, field: str = "--size") -> Triple:
    """`512x512x128` or `512` (cube) → (512, 512, 128)."""
    parts = [p for p in _SEPARATORS.split(text.strip().lower()) if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"{field}: '{text}' is not a size; write three whole numbers like 256x256x128") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v <= 0 for v in values):
        raise UsageError(f"{field}: '{text}' is not a size; write three positive whole numbers like 256x256x128")
    return (values[0], values[1], values[2])


# Any spacing maisi accepts, whatever the model (10 µm micro-CT to 10 cm): finite and within this range, so that a
# grid's extent and a mask's resampling stay countable. A model's own rules (ModelSpec.check_request) are tighter;
# --allow-any-size lifts those, never this range.
SPACING_RANGE_MM = (0.01, 100.0)


def spacing_problem(values: tuple[float, ...]) -> str | None:
    """Why `values` is not a usable spacing (None when it is): three finite numbers in SPACING_RANGE_MM."""
    low, high = SPACING_RANGE_MM
    if len(values) != 3:
        return f"give three numbers in mm within [{low:g}, {high:g}], like 1.0x1.0x2.5"
    if not all(math.isfinite(v) and low <= v <= high for v in values):
        return f"write three finite numbers in mm within [{low:g}, {high:g}], like 1.0x1.0x2.5"
    return None


def parse_spacing(text: str, field: str = "--spacing") -> FloatTriple:
    """`0.75x0.75x1.0` or `1.5` (isotropic) → millimetres per voxel, each within SPACING_RANGE_MM."""
    parts = [p for p in _SEPARATORS.split(text.strip().lower()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"{field}: '{text}' is not a spacing; write three numbers in mm like 1.0x1.0x2.5") from None
    if len(values) == 1:
        values = values * 3
    problem = spacing_problem(tuple(values))
    if problem:
        raise UsageError(f"{field}: '{text}' is not a spacing; {problem}")
    return (values[0], values[1], values[2])


def parse_shard(text: str | None) -> tuple[int, int]:
    """`I/N` → (I, N); None reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, else (0, 1)."""
    if text is None:
        task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
        task_count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task_id is None or task_count is None:
            return (0, 1)
        text, field = f"{task_id}/{task_count}", "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    else:
        field = "--shard"
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"{field}: '{text}' is not a shard; write I/N with 0 <= I < N, e.g. 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise UsageError(f"{field}: '{text}' needs 0 <= I < N, e.g. 0/4")
    return (index, count)


def parse_anatomy(values: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, float], ...]]:
    """`--anatomy NAME` (must be in the mask) and `--anatomy NAME:SIZE` (generate the mask with that size) →
    (names, (name, size) pairs). The two kinds cannot be mixed."""
    names: list[str] = []
    sizes: list[tuple[str, float]] = []
    for value in values:
        name, colon, size = value.rpartition(":")
        if not colon:
            names.append(value.strip())
            continue
        try:
            sizes.append((name.strip(), float(size)))
        except ValueError:
            raise UsageError(f"--anatomy: '{value}' — SIZE must be a number in [0, 1] or -1, e.g. liver:0.7") from None
    if names and sizes:
        raise UsageError("--anatomy: give either names (they must be in the mask) or NAME:SIZE pairs (the mask is "
                         "generated), not both")
    return tuple(names), tuple(sizes)


def format_triple(values: tuple) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def maisi_home() -> Path:
    """maisi's own cache (locks, hashes, unpacked databases, engines): MAISI_HOME, default ~/.cache/maisi."""
    return Path(os.environ.get("MAISI_HOME") or Path.home() / ".cache" / "maisi").expanduser()

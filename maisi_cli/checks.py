"""The checks of the Python API that need no networks: `qc` (organ HU medians against the statistics) and `preview`
(three planes with label contours). numpy, nibabel and PIL only, so `maisi qc` and `maisi preview` start without
importing torch; `maisi_cli.api` re-exports them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maisi_cli.engine.preview import Preview, load_volumes, make_preview, parse_slice, parse_window, render_preview
from maisi_cli.engine.qc import QCReport, check_quality, load_statistics
from maisi_cli.engine.weights import locate_weight
from maisi_cli.errors import UsageError
from maisi_cli.io.nifti import read_nifti
from maisi_cli.models import get_model

PathLike = str | os.PathLike


def _volume(value: Any, field_name: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(value, (str, os.PathLike)):
        return read_nifti(Path(value), field=field_name, what=what)
    if hasattr(value, "dataobj") and hasattr(value, "affine"):
        return np.asarray(value.dataobj), np.asarray(value.affine)
    return np.asarray(value), None


def qc(image: Any, mask: Any, stats: PathLike | None = None, model: str | None = None) -> QCReport:
    """Organ HU medians of a CT (a NIfTI path, a nibabel image or an array in HU) under its full label map, against
    the statistics: `stats` (a JSON file), else the `model`'s own when it ships some, else the packaged ones of
    the released CT data. `report.passed` says whether every organ is within range."""
    if stats is not None and model is not None:
        raise UsageError("--stats/--model: give one of them (--model uses the model's own statistics)")
    statistics = load_statistics(Path(stats) if stats is not None else model_statistics_file(model))
    image_data, _ = _volume(image, "IMAGE", "CT image")
    mask_data, _ = _volume(mask, "MASK", "label map")
    return check_quality(image_data, mask_data, statistics)


def model_statistics_file(name: str | None) -> Path | None:
    """The organ statistics a model ships (spec `datasets.qc_statistics`), or None for the packaged ones."""
    if name is None:
        return None
    spec = get_model(name)
    return locate_weight(spec, "qc_statistics", None).path if "qc_statistics" in spec.datasets else None


def preview(image: PathLike, mask: PathLike | None = None, out: PathLike | None = None, window: str = "soft-tissue",
            slice_index: str | Sequence[int] | None = None, panel_size: int = 256) -> Preview:
    """The three orthogonal planes of a CT (NIfTI paths) with the label map's organs as contours; `preview.image` is
    a PIL image. With `out`, also written there as a PNG (atomically)."""
    slice_text = slice_index if slice_index is None or isinstance(slice_index, str) else \
        ",".join(str(int(i)) for i in slice_index)
    if out is not None:
        return make_preview(Path(image), Path(mask) if mask else None, Path(out), window=window,
                            slice_text=slice_text, panel_size=panel_size)
    level_width = parse_window(window)
    volume, labels, voxel_mm = load_volumes(Path(image), Path(mask) if mask else None)
    return render_preview(volume, voxel_mm, labels, parse_slice(slice_text, volume.shape), level_width, panel_size)

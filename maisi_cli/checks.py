"""The checks of the Python API that need no networks: `qc` (organ HU medians against the statistics) and `preview`
(three planes with label contours). numpy, nibabel and PIL only, so `maisi qc` and `maisi preview` start without
importing torch; `maisi_cli.api` re-exports them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from maisi_cli.engine.preview import (Preview, load_volumes, make_preview, parse_slice, parse_window, render_preview,
                                      window_name)
from maisi_cli.engine.qc import QCReport, check_quality, load_statistics
from maisi_cli.engine.sample_info import IMAGE_NAME, SampleInfo, info_for_image
from maisi_cli.engine.weights import locate_weight
from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.io.nifti import read_nifti
from maisi_cli.models import get_model

PathLike = str | os.PathLike


def _volume(value: Any, field_name: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(value, (str, os.PathLike)):
        return read_nifti(Path(value), field=field_name, what=what)
    if hasattr(value, "dataobj") and hasattr(value, "affine"):
        return np.asarray(value.dataobj), np.asarray(value.affine)
    return np.asarray(value), None


def qc(image: Any, mask: Any = None, stats: PathLike | None = None, model: str | None = None,
       on_warning: Callable[[str], None] | None = None) -> QCReport:
    """Organ HU medians of a CT (a NIfTI path, a nibabel image or an array in HU) under its full label map, against
    the statistics: `stats` (a JSON file), else the `model`'s own when it ships some, else — for an image `maisi
    generate` wrote — the model its sidecar names, else the packaged ones of the released CT data.
    `report.passed` says whether every organ is within range; `report.statistics_note` whose statistics were
    used. `mask` defaults to the image's label map (named by its sidecar, or <stem>_label.nii.gz beside it)."""
    if stats is not None and model is not None:
        raise UsageError("--stats/--model: give one of them (--model uses the model's own statistics)")
    image_path = Path(image) if isinstance(image, (str, os.PathLike)) else None
    info = info_for_image(image_path) if image_path is not None else None
    if mask is None:
        mask = default_mask(image_path, info)
    named_by = None
    if stats is None and model is None and info is not None and info.model:
        model = sidecar_model(info, on_warning or _warn)
        named_by = info.sidecar.name if model is not None else None
    statistics_file = Path(stats) if stats is not None else model_statistics_file(model)
    note = None
    if model is not None:
        who = f"model {info.model} (named by {named_by})" if named_by and info else f"model {model}"
        note = who if statistics_file is not None else f"packaged: {who} ships no statistics"
    statistics = load_statistics(statistics_file)
    image_data, _ = _volume(image, "IMAGE", "CT image")
    mask_data, _ = _volume(mask, "MASK", "label map")
    return replace(check_quality(image_data, mask_data, statistics), statistics_note=note)


def model_statistics_file(name: str | None) -> Path | None:
    """The organ statistics a model ships (spec `datasets.qc_statistics`), or None for the packaged ones."""
    if name is None:
        return None
    spec = get_model(name)
    return locate_weight(spec, "qc_statistics", None).path if "qc_statistics" in spec.datasets else None


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def default_mask(image: Path | None, info: SampleInfo | None) -> Path:
    """The label map of `image` when MASK is not given: the one its sidecar names, else <stem>_label.nii.gz (or
    .nii) beside it."""
    if info is not None and info.path_of("label") is not None and info.path_of("label").is_file():  # type: ignore
        return info.path_of("label")  # type: ignore[return-value]
    match = IMAGE_NAME.fullmatch(image.name) if image is not None else None
    if match is not None:
        for suffix in (".nii.gz", ".nii"):
            candidate = image.with_name(f"{match.group('stem')}_label{suffix}")  # type: ignore[union-attr]
            if candidate.is_file():
                return candidate
    named = f" (none beside '{image}': no sidecar names one, no <name>_label.nii.gz)" if image is not None else ""
    raise UsageError(f"MASK: give the label map of IMAGE{named}")


def sidecar_model(info: SampleInfo, on_warning: Callable[[str], None]) -> str | None:
    """The model the sidecar names, as `get_model` takes it (its spec file when it was one and is still there), or
    None with a warning when this installation does not know it."""
    candidates = [info.model]
    if info.model_source and info.model_source.endswith(".json") and Path(info.model_source).is_file():
        candidates.insert(0, info.model_source)
    for candidate in candidates:
        try:
            get_model(candidate)  # type: ignore[arg-type]
        except MaisiError:
            continue
        return candidate
    on_warning(f"{info.sidecar.name} names model '{info.model}', which is not installed here; checking against "
               "the packaged statistics (give --model NAME or --stats FILE)")
    return None


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
    return render_preview(volume, voxel_mm, labels, parse_slice(slice_text, volume.shape), level_width, panel_size,
                          window_name(window), info_for_image(Path(image)))

"""Quality check of a generated CT: organ HU medians against per-organ statistics (reference-inference.md §12).

For each organ of the statistics file, the median HU of the image voxels under the organ's labels (in the full,
unfiltered label map) must lie within [low, high], where low = min(sigma_6_low, percentile_0_5) and
high = max(sigma_6_high, percentile_99_5); bone's high is forced to 1000 HU. An organ absent from the mask passes.
Medians are taken over finite voxels; an image with any non-finite voxel (NaN or ±inf) fails on its own reason
(`NON_FINITE` in the failed list, with the count), and an organ whose voxels are all non-finite is "non-finite",
not "absent": a broken image must not pass because nothing in it could be measured.

The statistics file has the format of the packaged `image_median_statistics.json`: organ → {percentile_0_5,
percentile_99_5, sigma_6_low, sigma_6_high, …}. An organ outside the built-in label sets (`ORGAN_LABELS`) may name its
labels with a `"labels": [ids]` entry, which also overrides a built-in set.

No torch, Typer or rich here: `maisi qc` runs without loading torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from maisi_cli.errors import MaskError, StatisticsError
from maisi_cli.resources import load_json

BONE_HIGH_HU = 1000.0
REQUIRED_FIELDS = ("percentile_0_5", "percentile_99_5", "sigma_6_low", "sigma_6_high")
PACKAGED = "packaged image_median_statistics.json"
NON_FINITE = "non-finite"  # the entry of QCReport.failed for an image holding NaN or ±inf

# Labels per organ, as the reference `LDMSampler.__init__::label_int_dict`, with one deliberate difference: the
# reference lists lung as [28, 29, 30, 31, 31] — 31 twice and 32 (right lower lobe) missing, so a right lower lobe
# of any intensity passed. We check all five lobes, 28–32.
ORGAN_LABELS: dict[str, tuple[int, ...]] = {
    "liver": (1,),
    "spleen": (3,),
    "pancreas": (4,),
    "kidney": (5, 14),
    "lung": (28, 29, 30, 31, 32),
    "bone": (*range(33, 57), *range(63, 98), 120, 122, 127),
    "brain": (22,),
}


class QCOptions(BaseModel):
    """What `maisi generate` was asked to do about the quality check."""
    model_config = ConfigDict(frozen=True)

    enabled: bool = True
    strict: bool = False
    max_attempts: int = Field(3, ge=1)
    stats: Path | None = None


@dataclass(frozen=True)
class OrganThreshold:
    organ: str
    labels: tuple[int, ...]
    low: float
    high: float


@dataclass(frozen=True)
class QCStatistics:
    source: str  # the file's path, or PACKAGED
    organs: tuple[OrganThreshold, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source,
                "organs": [{"organ": t.organ, "labels": list(t.labels), "low": t.low, "high": t.high}
                           for t in self.organs]}


@dataclass(frozen=True)
class OrganResult:
    organ: str
    labels: tuple[int, ...]
    median: float | None  # None when the organ is absent
    low: float
    high: float
    voxels: int
    verdict: str  # "pass", "fail", "absent", or "non-finite" (voxels under the organ, none of them finite)

    def describe(self) -> str:
        return f"{self.organ} median {self.median:.1f} HU outside [{self.low:.1f}, {self.high:.1f}]"


@dataclass(frozen=True)
class QCReport:
    organs: tuple[OrganResult, ...]
    statistics: str
    non_finite_voxels: int = 0
    image_voxels: int = 0
    statistics_note: str | None = None  # whose statistics these are, when a model's (e.g. named by the sidecar)

    @property
    def passed(self) -> bool:
        return self.non_finite_voxels == 0 and all(r.verdict != "fail" for r in self.organs)

    @property
    def failed(self) -> list[str]:
        return ([NON_FINITE] if self.non_finite_voxels else []) + [r.organ for r in self.organs if r.verdict == "fail"]

    def summary(self) -> str:
        """One line: the non-finite voxel count and the failed organs with their medians and ranges, or 'passed'."""
        failures = [r.describe() for r in self.organs if r.verdict == "fail"]
        if self.non_finite_voxels:
            failures.insert(0, f"{self.non_finite_voxels} of {self.image_voxels} voxels are non-finite (NaN or inf); "
                               "a CT must hold finite HU values")
        return "; ".join(failures) if failures else "passed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failed": self.failed,
            "statistics": self.statistics,
            **({"statistics_note": self.statistics_note} if self.statistics_note else {}),
            "non_finite_voxels": self.non_finite_voxels,
            "organs": [
                {"organ": r.organ, "median_hu": None if r.median is None else round(r.median, 3),
                 "low": round(r.low, 3), "high": round(r.high, 3), "voxels": r.voxels, "verdict": r.verdict}
                for r in self.organs
            ],
        }


# --- statistics --------------------------------------------------------------------------------------------------
def _number(value: Any, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StatisticsError(f"{where}: '{field}' is {value!r}; it must be a finite number of HU")
    return float(value)


def thresholds_from(document: Any, source: str) -> QCStatistics:
    """Checked thresholds from a parsed statistics document (see the module docstring for the rule)."""
    where = f"--stats '{source}'" if source != PACKAGED else source
    if not isinstance(document, dict) or not document:
        raise StatisticsError(f"{where}: expected a JSON object of organ → statistics, like the packaged "
                              "image_median_statistics.json")
    organs = []
    for organ, entry in document.items():
        if not isinstance(entry, dict):
            raise StatisticsError(f"{where}: organ '{organ}' must map to an object with "
                                  f"{', '.join(REQUIRED_FIELDS)}")
        for field in REQUIRED_FIELDS:
            if field not in entry:
                raise StatisticsError(f"{where}: organ '{organ}' lacks the field '{field}'; each organ needs "
                                      f"{', '.join(REQUIRED_FIELDS)}")
        values = {field: _number(entry[field], f"{where}: organ '{organ}'", field) for field in REQUIRED_FIELDS}
        if "labels" in entry:
            labels = entry["labels"]
            if (not isinstance(labels, list) or not labels
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in labels)):
                raise StatisticsError(f"{where}: organ '{organ}': 'labels' must be a list of label ids in 0..255")
            label_set = tuple(dict.fromkeys(labels))
        elif organ in ORGAN_LABELS:
            label_set = ORGAN_LABELS[organ]
        else:
            raise StatisticsError(f"{where}: organ '{organ}' has no built-in label set "
                                  f"({', '.join(ORGAN_LABELS)}); add \"labels\": [ids] to its entry")
        low = min(values["sigma_6_low"], values["percentile_0_5"])
        high = BONE_HIGH_HU if organ == "bone" else max(values["sigma_6_high"], values["percentile_99_5"])
        organs.append(OrganThreshold(organ, label_set, low, high))
    return QCStatistics(source, tuple(organs))


def load_statistics(path: Path | None = None) -> QCStatistics:
    """Thresholds from a statistics file, or from the packaged one when `path` is None."""
    if path is None:

        return thresholds_from(load_json("image_median_statistics.json"), PACKAGED)
    if not path.is_file():
        raise StatisticsError(f"--stats: '{path}' does not exist; give a JSON file in the format of "
                              "image_median_statistics.json")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise StatisticsError(f"--stats: '{path}' is not a readable JSON file ({reason})") from None
    return thresholds_from(document, str(path))


# --- the check ---------------------------------------------------------------------------------------------------
def label_ids(mask: np.ndarray, field: str = "MASK") -> np.ndarray:
    """Whole-number label ids as a non-negative integer array (float label maps, as the reference writes, are
    accepted when their values are whole numbers)."""
    if np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_:
        return mask
    if not np.issubdtype(mask.dtype, np.floating):
        raise MaskError(f"{field}: holds {mask.dtype} values; a label map of whole numbers is needed")
    if not np.all(np.isfinite(mask)) or not np.array_equal(mask, np.rint(mask)):
        raise MaskError(f"{field}: holds fractional values; a label map of whole-number ids is needed")
    low, high = float(mask.min(initial=0)), float(mask.max(initial=0))
    if low < np.iinfo(np.int32).min or high > np.iinfo(np.int32).max:
        raise MaskError(f"{field}: labels from {low:g} to {high:g} are out of range for label ids")
    return mask.astype(np.uint8 if low >= 0 and high <= 255 else np.int32)


def _organ_selector(labels: np.ndarray, organ_labels: tuple[int, ...]) -> np.ndarray:
    """Boolean array: where `labels` is one of `organ_labels` (a lookup table for small non-negative ids)."""
    high = int(labels.max(initial=0))
    if labels.dtype.kind in "ub" and high < 65536:
        table = np.zeros(high + 1, dtype=bool)
        table[[v for v in organ_labels if v <= high]] = True
        return table[labels]
    return np.isin(labels, np.asarray(organ_labels))


def _finite_median(values: np.ndarray) -> float | None:
    """The median of the finite values, or None when there are none."""
    finite = values[np.isfinite(values)] if values.dtype.kind in "fc" else values
    return float(np.median(finite.astype(np.float64, copy=False))) if finite.size else None


HISTOGRAM_BLOCK = 1 << 22  # voxels per pass of the histogram medians (32 MiB of int64 keys)


def integer_organ_medians(image: np.ndarray, labels: np.ndarray,
                          organs: tuple[OrganThreshold, ...]) -> list[tuple[float | None, int]] | None:
    """Each organ's (median, voxels) of an integer image, from one blocked pass that counts every HU value per
    organ: np.median's value exactly (the mean of the two middle values for an even count), without a gather and a
    sort per organ (at 512³ the QC took longer than writing the pair). None where it does not apply: a float image,
    labels beyond uint8/uint16, or organs sharing a label (each voxel counts for one organ here)."""
    if image.dtype.kind not in "iu" or labels.dtype.kind != "u" or labels.dtype.itemsize > 2 or not image.size:
        return None
    organ_of = np.zeros(int(np.iinfo(labels.dtype).max) + 1, dtype=np.int64)
    for number, organ in enumerate(organs, start=1):
        ids = [i for i in organ.labels if 0 <= i < organ_of.size]
        if np.any(organ_of[ids]):
            return None
        organ_of[ids] = number
    low, high = int(image.min()), int(image.max())
    span = high - low + 1
    if span > 1 << 20:  # a histogram that large is no saving
        return None
    counts = np.zeros((len(organs) + 1) * span, dtype=np.int64)
    # one voxel order for both arrays, without a copy of either
    order = "F" if image.flags.f_contiguous and labels.flags.f_contiguous and not image.flags.c_contiguous else "C"
    flat_image, flat_labels = image.ravel(order), labels.ravel(order)
    for start in range(0, flat_image.size, HISTOGRAM_BLOCK):
        block = slice(start, start + HISTOGRAM_BLOCK)
        keys = organ_of[flat_labels[block]] * span
        keys += flat_image[block]
        keys -= low
        counts += np.bincount(keys, minlength=counts.size)
    counts = counts.reshape(len(organs) + 1, span)
    medians = []
    for row in counts[1:]:
        voxels = int(row.sum())
        if not voxels:
            medians.append((None, 0))
            continue
        cumulative = np.cumsum(row)
        lower = int(np.searchsorted(cumulative, (voxels - 1) // 2 + 1)) + low  # the ((n-1)//2)-th smallest
        upper = int(np.searchsorted(cumulative, voxels // 2 + 1)) + low  # the (n//2)-th smallest
        medians.append(((lower + upper) / 2.0, voxels))
    return medians


def _organ_result(image: np.ndarray, labels: np.ndarray, threshold: OrganThreshold,
                  counted: tuple[float | None, int] | None = None) -> OrganResult:
    """One organ's verdict; `counted`: its (median, voxels) from integer_organ_medians, else read here."""
    if counted is not None:
        median, voxels = counted
    else:
        values = image[_organ_selector(labels, threshold.labels)]
        median, voxels = _finite_median(values), int(values.size)
    if median is None:
        verdict = "non-finite" if voxels else "absent"
    elif median < threshold.low or median > threshold.high:
        verdict = "fail"
    else:
        verdict = "pass"
    return OrganResult(threshold.organ, threshold.labels, median, threshold.low, threshold.high, voxels, verdict)


QUANTILES = (5.0, 25.0, 50.0, 75.0, 95.0)  # the box and whiskers a QC report draws for an organ's HU


def organ_quantiles(image: np.ndarray, mask: np.ndarray, statistics: QCStatistics) -> dict[str, tuple[float, ...]]:
    """Each organ's HU distribution for a QC report: the QUANTILES percentiles of its finite voxels, under the
    same labels the check reads (organs absent from `mask`, or with no finite voxel, are left out). Only the report
    calls it; the check itself (check_quality) reads the medians alone."""
    if image.shape != mask.shape:
        raise MaskError(f"MASK: shape {tuple(mask.shape)} differs from IMAGE shape {tuple(image.shape)}; give the "
                        "label map the image was generated with")
    labels = label_ids(mask)
    found = {}
    for threshold in statistics.organs:
        values = image[_organ_selector(labels, threshold.labels)]
        if values.dtype.kind in "fc":
            values = values[np.isfinite(values)]
        if values.size:
            found[threshold.organ] = tuple(float(v) for v in np.percentile(values.astype(np.float64, copy=False),
                                                                            QUANTILES))
    return found


def check_quality(image: np.ndarray, mask: np.ndarray, statistics: QCStatistics,
                  image_field: str = "IMAGE", mask_field: str = "MASK") -> QCReport:
    """Organ HU medians of `image` (HU, after the body crop) under the full label map `mask`, against
    `statistics`; any non-finite voxel of `image` fails the check. Shapes must match."""
    if image.shape != mask.shape:
        raise MaskError(f"{mask_field}: shape {tuple(mask.shape)} differs from {image_field} shape "
                        f"{tuple(image.shape)}; give the label map the image was generated with")
    labels = label_ids(mask, mask_field)
    non_finite = int(image.size - np.count_nonzero(np.isfinite(image))) if image.dtype.kind in "fc" else 0
    counted = integer_organ_medians(image, labels, statistics.organs) or [None] * len(statistics.organs)
    results = tuple(_organ_result(image, labels, threshold, known)
                    for threshold, known in zip(statistics.organs, counted))
    return QCReport(results, statistics.source, non_finite_voxels=non_finite, image_voxels=int(image.size))

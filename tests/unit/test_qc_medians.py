"""The quality check's organ medians from one histogram pass (engine/qc.integer_organ_medians) equal np.median's
for integer images, so the check's verdicts do not change; where it does not apply the per-organ path runs."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_cli.engine import qc
from maisi_cli.engine.qc import OrganThreshold, QCStatistics, check_quality, integer_organ_medians

ORGANS = (OrganThreshold("liver", (1,), -50.0, 200.0), OrganThreshold("kidney", (5, 14), 0.0, 300.0),
          OrganThreshold("lung", tuple(range(28, 33)), -950.0, -700.0), OrganThreshold("absent", (99,), 0.0, 1.0))


def reference(image, labels, organ):
    values = image[np.isin(labels, organ.labels)].astype(np.float64)
    return (float(np.median(values)) if values.size else None, int(values.size))


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("seed", range(4))
def test_histogram_medians_equal_numpys_for_odd_and_even_counts(seed, order, monkeypatch):
    monkeypatch.setattr(qc, "HISTOGRAM_BLOCK", 97)  # many blocks, a ragged last one
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(4, 23, 3))
    image = np.asarray(rng.integers(-1024, 1500, shape), dtype=np.int16, order=order)
    labels = np.asarray(rng.choice([0, 1, 5, 14, 28, 30, 200], size=shape), dtype=np.uint8, order=order)
    got = integer_organ_medians(image, labels, ORGANS)
    assert got == [reference(image, labels, organ) for organ in ORGANS]


def test_the_check_gives_the_same_report_either_way():
    rng = np.random.default_rng(7)
    image = rng.integers(-1000, 400, (30, 30, 20)).astype(np.int16)
    labels = rng.choice([0, 1, 5, 28], size=image.shape).astype(np.uint8)
    statistics = QCStatistics("test", ORGANS)
    integer = check_quality(image, labels, statistics)
    floating = check_quality(image.astype(np.float32), labels, statistics)  # the per-organ path
    assert integer == floating


def test_organs_sharing_a_label_or_a_float_image_take_the_per_organ_path():
    image = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    labels = np.ones((2, 3, 4), dtype=np.uint8)
    shared = (OrganThreshold("a", (1,), 0, 1), OrganThreshold("b", (1, 2), 0, 1))
    assert integer_organ_medians(image, labels, shared) is None
    assert integer_organ_medians(image.astype(np.float32), labels, ORGANS) is None

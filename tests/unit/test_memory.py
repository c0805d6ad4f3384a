"""The memory planner: README Table 3 reproduced within 10 %, monotonic terms, and decode plans that fit a budget."""

from __future__ import annotations

import pytest

from maisi_cli.engine.memory import (GIB, estimate_peak_memory, parse_memory, plan_decode, unet_parameters,
                                     resolved_definition)
from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.models import get_model
from maisi_cli.profiles import get_profile, make_decode_plan

# README Table 3 (A100 80G): profile, size, config ROI / overlap / TP splits, published peak ("G", read as GiB).
TABLE3 = [
    ("16g", (256, 256, 128), (96, 96, 96), 0.25, 2, 15.0),
    ("16g", (256, 256, 256), (48, 48, 64), 0.6666, 4, 15.4),
    ("16g", (512, 512, 128), (64, 64, 32), 0.5, 2, 15.7),
    ("24g", (256, 256, 256), (64, 64, 64), 0.25, 4, 22.7),
    ("24g", (512, 512, 128), (80, 80, 32), 0.4, 2, 21.0),
    ("24g", (512, 512, 512), (64, 64, 48), 0.4, 2, 22.8),
    ("32g", (512, 512, 512), (80, 80, 48), 0.4, 4, 28.4),
    ("80g", (512, 512, 512), (80, 80, 80), 0.4, 2, 45.3),
    ("80g", (512, 512, 768), (80, 80, 96), 0.4, 4, 49.7),
]


@pytest.fixture(scope="module")
def spec():
    return get_model("rflow-ct")


def _estimate(spec, size, roi, overlap=0.4, tp=2):
    return estimate_peak_memory(spec, size, make_decode_plan(spec.latent_shape(size)[1:], roi, overlap, tp))


@pytest.mark.parametrize("profile,size,roi,overlap,tp,published", TABLE3, ids=[f"{r[0]}-{r[1]}" for r in TABLE3])
def test_table3_peak_memory_within_ten_percent(spec, profile, size, roi, overlap, tp, published):
    estimate = _estimate(spec, size, roi, overlap, tp)
    predicted = estimate.peak_bytes / GIB
    assert abs(predicted - published) / published <= 0.10, (predicted, published)
    assert estimate.peak_stage == "decode"  # the README: the peak is in the VAE decode


def test_profile_table_rows_are_the_table3_settings():
    rows = {(p, s): (r, o, t) for p, s, r, o, t, _ in TABLE3}
    assert rows == {(p.name, e.size): (e.roi, e.overlap, e.tp_splits)
                    for p in map(get_profile, ("16g", "24g", "32g", "80g")) for e in p.decode}


def test_parameter_counts_match_monai(spec):
    """Counted from the layer shapes; MONAI's classes have 180 500 868 and 72 037 072 parameters."""
    assert unet_parameters(resolved_definition(spec, "diffusion_unet")) == pytest.approx(180_500_868, rel=1e-3)
    assert unet_parameters(resolved_definition(spec, "controlnet"), controlnet=True) == pytest.approx(72_037_072,
                                                                                                     rel=1e-3)


def test_peak_grows_with_size(spec):
    sizes = [(256, 256, 128), (256, 256, 256), (384, 384, 256), (512, 512, 256), (512, 512, 512), (512, 512, 768)]
    tiled = [estimate_peak_memory(spec, s, make_decode_plan(spec.latent_shape(s)[1:], (32, 32, 32), 0.4, 2))
             for s in sizes]
    assert all(a.diffusion_bytes < b.diffusion_bytes for a, b in zip(tiled, tiled[1:]))
    assert all(a.peak_bytes <= b.peak_bytes for a, b in zip(tiled, tiled[1:]))


def test_smaller_roi_or_more_splits_lower_the_decode_peak(spec):
    size = (512, 512, 512)
    assert _estimate(spec, size, (64, 64, 48)).decode_bytes < _estimate(spec, size, (80, 80, 80)).decode_bytes
    assert _estimate(spec, size, (80, 80, 80), tp=4).decode_bytes < _estimate(spec, size, (80, 80, 80), tp=2).decode_bytes
    assert _estimate(spec, size, (80, 80, 80), tp=8).decode_bytes < _estimate(spec, size, (80, 80, 80), tp=4).decode_bytes


def test_planner_decodes_whole_when_memory_is_plentiful(spec):
    best = plan_decode(spec, (256, 256, 256), 80 * GIB)
    assert best.plan.mode == "whole" and best.peak_bytes <= 80 * GIB


def test_planner_tiles_under_a_tight_budget(spec):
    budget = 20 * GIB
    best = plan_decode(spec, (512, 512, 512), budget)
    assert best.plan.mode == "sliding" and best.peak_bytes <= budget
    assert best.cost > plan_decode(spec, (512, 512, 512), 80 * GIB).cost  # less memory, slower


def test_planner_at_80g_gives_the_released_plan(spec):
    best = plan_decode(spec, (512, 512, 512), 80 * GIB)
    assert (best.plan.roi, best.plan.tp_splits, best.plan.windows) == ((80, 80, 80), 2, 8)


def test_nothing_fits_names_the_smallest_budget(spec):
    with pytest.raises(MaisiError, match=r"no decode plan .* fits 8\.0 GiB.*give at least \d+\.\d GiB"):
        plan_decode(spec, (512, 512, 512), 8 * GIB)


def test_profiles_plan_missing_sizes_and_keep_table_rows(spec):
    profile = get_profile("24g")
    tabled = profile.decode_plan((128, 128, 128), (512, 512, 512), spec=spec)
    assert (tabled.roi, tabled.tp_splits) == ((64, 64, 48), 2) and "table" in tabled.rule
    planned = profile.decode_plan((96, 96, 64), (384, 384, 256), spec=spec)
    assert "planner" in planned.rule
    assert estimate_peak_memory(spec, (384, 384, 256), planned).peak_bytes <= profile.budget_bytes
    assert "fallback" in profile.decode_plan((96, 96, 64), (384, 384, 256)).rule  # no spec: the old rule


@pytest.mark.parametrize("text,expected", [("24g", 24 * GIB), ("80GiB", 80 * GIB), ("512m", 512 * 1024**2),
                                           ("1.5t", int(1.5 * 1024**4)), ("1000", 1000), ("24gb", 24 * GIB)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "g", "24x", "-1g", "0"])
def test_parse_memory_rejects(text):
    with pytest.raises(UsageError, match="--memory"):
        parse_memory(text)

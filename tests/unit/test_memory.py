"""The memory planner: README Table 3 reproduced within 10 %, monotonic terms, and decode plans that fit a budget."""

from __future__ import annotations

import pytest

from maisi_cli.decode_plan import make_decode_plan, parse_memory, plan_decode
from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.gpu_memory import GIB, estimate_peak_memory, resolved_definition, unet_parameters
from maisi_cli.models import get_model
from maisi_cli.profiles import get_profile

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


# --- host memory -------------------------------------------------------------------------------------------------
def _whole_plan(spec, size):
    latent = spec.latent_shape(size)[1:]
    return make_decode_plan(latent, latent, 0.4, 1)


def test_host_estimate_counts_each_stage_from_the_voxel_counts(spec):
    """On a GPU: the output stage holds the float32 decoded image and the output arrays (11 B a voxel: no float32
    temporaries since output_image converts slab by slab), the condition stage only the 1-byte labels sent to the GPU
    (the planes are made there); the mask stage counts the file as read, its resampling grid and the pad/crop (the
    peak here); the write stage the int16/uint8 arrays and their NIfTI bytes."""
    from maisi_cli.engine.memory import (HOST_RESERVE, OUTPUT_BYTES, PAD_CROP_BYTES, RESAMPLE_BYTES, MaskGrid,
                                         estimate_host_memory)

    size = (512, 512, 512)
    voxels = 512**3
    mask = MaskGrid(shape=(256, 256, 128), itemsize=2, floating=False, resampled=(300, 300, 200))
    host = estimate_host_memory(spec, size, _whole_plan(spec, size), on_gpu=True, dtype_bytes=2, mask=mask)
    assert sum(host.stages["output"].values()) == voxels + 4 * voxels + OUTPUT_BYTES * voxels + HOST_RESERVE
    assert host.peak_stage == "mask" and host.largest_term == "mask pad/crop"
    assert host.stages["condition"]["condition labels (uint8) for the GPU"] == voxels
    masked = host.stages["mask"]
    assert masked["mask as read"] == 256 * 256 * 128 * 2 and "mask label check" not in masked  # integers
    assert masked["mask resampling"] == RESAMPLE_BYTES * 300 * 300 * 200
    assert masked["mask pad/crop"] == PAD_CROP_BYTES * voxels
    assert host.stages["write"]["output arrays"] == 3 * voxels  # int16 image + uint8 labels
    assert host.as_dict()["peak_gib"] == round(host.peak_bytes / GIB, 3)


def test_host_estimate_on_the_cpu_holds_the_networks_and_a_huge_mask_dominates(spec):
    """On the CPU the networks' weights and activations are host memory (the GPU terms without the CUDA overhead);
    a float mask far larger than the output makes the mask stage the peak."""
    from maisi_cli.engine.memory import MaskGrid, estimate_host_memory

    size = (256, 256, 256)
    plan = _whole_plan(spec, size)
    cpu = estimate_host_memory(spec, size, plan, on_gpu=False, dtype_bytes=4)
    gpu = estimate_host_memory(spec, size, plan, on_gpu=True, dtype_bytes=4)
    networks = estimate_peak_memory(spec, size, plan, dtype_bytes=4, overhead_gib=0)
    assert cpu.stages["diffusion"]["activations"] == networks.diffusion_terms["activations"]
    assert "framework overhead" not in cpu.stages["diffusion"] and cpu.peak_bytes > gpu.peak_bytes
    huge = MaskGrid(shape=(2000, 2000, 2000), itemsize=4, floating=True, resampled=None)
    masked = estimate_host_memory(spec, size, plan, on_gpu=True, mask=huge)
    assert masked.peak_stage == "mask" and masked.stages["mask"]["mask label check"] == 6 * 2000**3


@pytest.mark.parametrize("shape,spacing,affine_diagonal", [
    ((10, 11, 12), (0.3, 0.3, 0.3), (1.0, 1.0, 1.0)),
    ((33, 34, 35), (0.7, 0.7, 0.7), (2.0, 2.0, 2.0)),
    ((65, 66, 67), (3.0, 3.0, 3.0), (0.8, 0.8, 0.8)),
    ((20, 30, 40), (1.0, 2.0, 0.5), (-1.5, 1.0, 2.5)),  # a flipped axis
])
def test_resampled_grid_is_the_grid_monai_spacing_makes(shape, spacing, affine_diagonal):
    import numpy as np

    from maisi_cli.engine.masks.user import resampled_grid

    affine = np.diag([*affine_diagonal, 1.0])
    assert resampled_grid(shape, affine, spacing) == _monai_resampled_shape(shape, affine, spacing)


def _monai_resampled_shape(shape, affine, spacing):
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    volume = MetaTensor(torch.zeros(1, *shape), affine=torch.from_numpy(affine))
    return tuple(Spacing(pixdim=spacing, mode="nearest")(Orientation(axcodes="RAS", labels=None)(volume)).shape[1:])


def test_resampled_grid_follows_a_permuted_affine():
    """A voxel axis that points along another RAS axis is resampled with that axis's target spacing."""
    import numpy as np

    from maisi_cli.engine.masks.user import resampled_grid

    affine = np.array([[0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # i→A, j→S, k→R
    assert resampled_grid((11, 21, 31), affine, (1.0, 2.0, 3.0)) == (61, 6, 21)  # 30·2/1, 10·1/2, 20·3/3, +1
    assert _monai_resampled_shape((11, 21, 31), affine, (1.0, 2.0, 3.0)) == (61, 6, 21)


def test_available_host_memory_reads_meminfo_and_caps_it_by_the_cgroup(tmp_path, monkeypatch):
    from maisi_cli.engine import memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    monkeypatch.setattr(memory, "CGROUP_MEMORY", ((str(cgroup), "memory.max", "memory.current", "inactive_file"),))
    assert memory.available_host_memory() == 20000000 * 1024  # no cgroup files: no limit
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    assert memory.available_host_memory() == 20000000 * 1024  # "max": no limit
    (cgroup / "memory.max").write_text(f"{8 * GIB}\n")
    (cgroup / "memory.stat").write_text(f"anon 5\ninactive_file {GIB}\n")
    assert memory.available_host_memory() == 8 * GIB  # 8 GiB limit − 1 GiB used + 1 GiB reclaimable cache


def test_host_check_refuses_with_needed_available_and_fix(monkeypatch):
    from maisi_cli.engine import memory

    monkeypatch.setattr(memory, "available_host_memory", lambda: 2 * GIB)
    memory.check_host_memory(GIB, "--size", "64x64x64 voxels", "ask for a smaller --size")  # fits: no error
    with pytest.raises(UsageError, match=r"--size: 64x64x64 voxels needs about 3\.0 GiB of host memory but 2\.0 GiB "
                                         r"is available; ask for a smaller --size \(or set MAISI_SKIP_MEMORY_CHECK"):
        memory.check_host_memory(3 * GIB, "--size", "64x64x64 voxels", "ask for a smaller --size")
    monkeypatch.setenv("MAISI_SKIP_MEMORY_CHECK", "1")
    memory.check_host_memory(3 * GIB, "--size", "64x64x64 voxels", "ask for a smaller --size")


def test_gpu_check_refuses_a_plan_over_the_device_memory(spec, monkeypatch):
    """On a GPU (faked: mem_get_info's total), the GPU estimate at the run's precision is checked against the
    device's memory, allowing the estimate's error (90 % of it must fit)."""
    from maisi_cli.engine import memory

    size = (512, 512, 512)
    plan = _whole_plan(spec, size)  # the whole 512³ decode: far over any GPU
    peak = memory.estimate_peak_memory(spec, size, plan, dtype_bytes=2).peak_bytes
    monkeypatch.setattr(memory, "available_host_memory", lambda: 1024 * GIB)
    monkeypatch.setattr(memory, "gpu_total_memory", lambda device: int(peak * 0.9) + 1)
    memory.check_generation_memory(spec, size, plan, "cuda:0", "fp16", "80g")  # within the estimate's error
    monkeypatch.setattr(memory, "gpu_total_memory", lambda device: 80 * GIB)
    with pytest.raises(UsageError, match=r"--size: 512x512x512 needs about .* GiB of GPU memory \(decode, fp16, "
                                         r"profile 80g's decode plan\) but cuda:0 has 80\.0 GiB"):
        memory.check_generation_memory(spec, size, plan, "cuda:0", "fp16", "80g")
    monkeypatch.setenv("MAISI_SKIP_MEMORY_CHECK", "1")
    memory.check_generation_memory(spec, size, plan, "cuda:0", "fp16", "80g")


def test_host_estimate_of_several_samples_holds_the_one_being_written(spec):
    """A run of several samples writes each in the background while it makes the next (engine/run.py): every stage
    after the networks' load holds the previous sample's arrays and write buffers; one sample holds none."""
    from maisi_cli.engine.memory import BACKGROUND_WRITE_BYTES, estimate_host_memory

    size = (256, 256, 256)
    plan = _whole_plan(spec, size)
    one = estimate_host_memory(spec, size, plan, on_gpu=True, dtype_bytes=2)
    several = estimate_host_memory(spec, size, plan, on_gpu=True, dtype_bytes=2, samples=3)
    for stage, terms in several.stages.items():
        extra = sum(terms.values()) - sum(one.stages[stage].values())
        assert extra == (0 if stage == "load" else BACKGROUND_WRITE_BYTES * 256**3), stage
    assert several.peak_bytes >= one.peak_bytes

"""Decoding latents to an image: decode plans (reference §7, §14.1; checklist item 6) and the decoder itself."""

from __future__ import annotations

import math

import pytest
import torch

from maisi_cli.decode_plan import (
    cap_tp_splits,
    fallback_roi,
    make_decode_plan,
    window_count,
)
from maisi_cli.engine.decode import LatentDecoder, decode_latents
from maisi_cli.engine.networks import build_network, set_tp_splits
from maisi_cli.profiles import PROFILE_NAMES, get_profile
from tests.helpers import fill_random

# Reference config_infer_*.json decode settings and the patch counts of reference-inference.md §14.1.
# (profile, image size, latent, roi, overlap, tp splits, mode, windows)
REFERENCE_PLANS = [
    ("16g", (256, 256, 128), (64, 64, 32), (96, 96, 96), 0.25, 2, "whole", 1),
    ("16g", (256, 256, 256), (64, 64, 64), (48, 48, 64), 0.6666, 4, "sliding", 4),
    ("16g", (512, 512, 128), (128, 128, 32), (64, 64, 32), 0.5, 2, "sliding", 9),
    ("24g", (256, 256, 256), (64, 64, 64), (64, 64, 64), 0.25, 4, "whole", 1),
    ("24g", (512, 512, 128), (128, 128, 32), (80, 80, 32), 0.4, 2, "sliding", 4),
    ("24g", (512, 512, 512), (128, 128, 128), (64, 64, 48), 0.4, 2, "sliding", 36),
    ("32g", (512, 512, 512), (128, 128, 128), (80, 80, 48), 0.4, 4, "sliding", 16),
    ("80g", (512, 512, 512), (128, 128, 128), (80, 80, 80), 0.4, 2, "sliding", 8),
    ("80g", (512, 512, 768), (128, 128, 192), (80, 80, 96), 0.4, 4, "sliding", 12),
]
PLAN_IDS = [f"{p[0]}-{'x'.join(map(str, p[1]))}" for p in REFERENCE_PLANS]


def _monai_window_count(latent, roi, overlap) -> int:
    """Windows MONAI's sliding_window_inference places (its own scan interval and patch enumeration)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(latent, roi, 3, (overlap,) * 3)
    return len(dense_patch_slices(latent, roi, interval))


# --- plans ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile,size,latent,roi,overlap,tp,mode,windows", REFERENCE_PLANS, ids=PLAN_IDS)
def test_make_decode_plan_reproduces_reference_patch_counts(profile, size, latent, roi, overlap, tp, mode, windows):
    """The reference's decode for each config_infer file: whole or sliding, and its patch count."""
    plan = make_decode_plan(latent, roi, overlap, tp)
    assert plan.mode == mode
    assert plan.windows == windows
    assert plan.overlap == overlap
    assert plan.tp_splits == tp
    assert plan.requested_tp_splits == tp
    assert plan.roi == (latent if mode == "whole" else roi)


@pytest.mark.parametrize("profile,size,latent,roi,overlap,tp,mode,windows", REFERENCE_PLANS, ids=PLAN_IDS)
def test_named_profiles_give_reference_plans(profile, size, latent, roi, overlap, tp, mode, windows):
    """`--profile 16g/24g/32g/80g` decode the reference sizes exactly as the reference config files do."""
    plan = get_profile(profile).decode_plan(latent, size)
    assert (plan.mode, plan.windows, plan.overlap, plan.tp_splits) == (mode, windows, overlap, tp)
    assert plan.roi == (latent if mode == "whole" else roi)
    assert "table" in plan.rule


def test_every_named_profile_loads():
    """All shipped profiles load, and the GPU ones carry their reference tables."""
    for name in PROFILE_NAMES:
        profile = get_profile(name)
        assert profile.name == name
    assert get_profile("cpu").device == "cpu"
    for name in ("16g", "24g", "32g", "80g"):
        assert get_profile(name).device == "cuda" and get_profile(name).decode


def test_whole_or_sliding_is_decided_by_voxel_count():
    """Whole-volume decode when the latent has no more voxels than the ROI, even if an axis is longer (§7)."""
    whole = make_decode_plan((128, 128, 32), (96, 96, 96), 0.25, 1)
    assert whole.mode == "whole" and whole.windows == 1 and whole.roi == (128, 128, 32)
    sliding = make_decode_plan((64, 64, 64), (48, 48, 96), 0.5, 1)
    assert sliding.mode == "sliding"
    assert sliding.roi == (48, 48, 64)  # clipped to the latent
    assert sliding.windows == _monai_window_count((64, 64, 64), (48, 48, 64), 0.5)


@pytest.mark.parametrize("latent,roi,overlap", [
    ((128, 128, 128), (64, 64, 48), 0.4),
    ((64, 64, 64), (48, 48, 64), 0.6666),
    ((128, 128, 192), (80, 80, 96), 0.4),
    ((16, 16, 16), (8, 8, 8), 0.5),
    ((16, 20, 12), (12, 12, 12), 0.25),
    ((33, 17, 9), (16, 16, 8), 0.0),
    ((40, 40, 40), (16, 16, 16), 0.95),
    ((40, 40, 40), (16, 16, 16), 0.7),  # interval int(4.8) = 4, not round() = 5
    ((64, 64, 64), (32, 32, 32), 0.25),
])
def test_window_count_matches_monai(latent, roi, overlap):
    """The window count shown to the user is the number MONAI's sliding window actually runs."""
    assert window_count(latent, roi, overlap) == _monai_window_count(latent, roi, overlap)


def test_cpu_fallback_plans():
    """The cpu profile (no table) decodes small latents whole and slides 32^3 windows over larger ones."""
    cpu = get_profile("cpu")
    small = cpu.decode_plan((16, 16, 16), (64, 64, 64))
    assert small.mode == "whole" and small.tp_splits == 1 and "fallback" in small.rule
    large = cpu.decode_plan((64, 64, 64), (256, 256, 256))
    assert large.mode == "sliding"
    assert large.roi == (32, 32, 32)
    assert large.windows == _monai_window_count((64, 64, 64), (32, 32, 32), 0.25) == 27


def test_tp_splits_capped_on_the_split_axis():
    """TP splits are capped by the decoder's split axis (the VAE's dim_split, second spatial axis by default)."""
    plan = make_decode_plan((16, 24, 16), (16, 24, 16), 0.5, 8)
    assert plan.mode == "whole"
    assert plan.tp_splits == 8  # 24 / 8 = 3 voxels per chunk
    assert plan.requested_tp_splits == 8
    assert make_decode_plan((16, 24, 16), (16, 24, 16), 0.5, 8, split_axis=0).tp_splits == 4
    # In sliding mode the cap applies to the clipped window, not the latent.
    sliding = make_decode_plan((64, 64, 64), (32, 20, 32), 0.5, 8)
    assert sliding.roi[1] == 20 and sliding.tp_splits == 5


@pytest.mark.parametrize("requested,axis,expected", [
    (8, 16, 4), (8, 24, 8), (8, 20, 5), (8, 7, 1), (8, 5, 1), (4, 16, 4), (2, 16, 2), (1, 16, 1), (1, 3, 1),
    (4, 12, 4), (4, 11, 1), (16, 128, 16), (0, 16, 1),
])
def test_cap_tp_splits_values(requested, axis, expected):
    """Largest s ≤ requested that divides the axis with chunks of at least 3 voxels; else 1."""
    assert cap_tp_splits(requested, axis) == expected


def test_cap_tp_splits_rule_exhaustive():
    """For every requested count and axis length, the cap obeys the rule and is the largest value that does."""
    for requested in range(1, 17):
        for axis in range(1, 65):
            s = cap_tp_splits(requested, axis)
            assert 1 <= s <= requested
            valid = [k for k in range(2, requested + 1) if axis % k == 0 and axis // k >= 3]
            assert s == (max(valid) if valid else 1), (requested, axis)


def test_capped_tp_splits_are_exact_in_maisi_convolution():
    """What the cap allows is what MONAI's MaisiConvolution computes exactly (a split conv equals the unsplit one);
    larger split counts than the cap on short axes fail or differ."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    torch.manual_seed(0)
    conv = MaisiConvolution(3, 2, 2, num_splits=1, dim_split=1, print_info=False, kernel_size=3, padding=1,
                            conv_only=True)
    with torch.no_grad():
        for axis in (6, 9, 12, 16, 20, 24):
            x = torch.randn(1, 2, 4, axis, 3)
            conv.num_splits = 1
            reference = conv(x)
            for requested in (2, 4, 8):
                conv.num_splits = cap_tp_splits(requested, axis)
                assert torch.allclose(conv(x), reference, atol=1e-6), (axis, requested)


@pytest.mark.parametrize("latent,budget", [
    ((64, 64, 64), 32768), ((128, 128, 192), 262144), ((128, 128, 32), 147456), ((40, 40, 100), 4096),
    ((20, 128, 128), 65536), ((128, 128, 128), 614400), ((200, 8, 200), 40000),
])
def test_fallback_roi_fits_budget(latent, budget):
    """The fallback window has at most the budget's voxels, each axis a multiple of 16 or the whole latent axis, and
    no axis could grow by another 16 within the budget."""
    roi = fallback_roi(latent, budget)
    assert math.prod(roi) <= budget
    for axis, (r, s) in enumerate(zip(roi, latent)):
        assert r <= s
        assert r % 16 == 0 or r == s
        if r < s:
            grown = list(roi)
            grown[axis] = min(r + 16, s)
            assert math.prod(grown) > budget, (roi, axis)


@pytest.mark.parametrize("latent,budget", [((16, 16, 16), 32768), ((32, 32, 32), 32768), ((64, 64, 32), 147456)])
def test_fallback_roi_whole_latent_when_it_fits(latent, budget):
    """A latent within the budget is decoded in one window of its own size."""
    assert fallback_roi(latent, budget) == latent


def test_fallback_roi_near_cubic():
    """The fallback window grows evenly: 64^3 latent with a 32^3 budget gets a 32^3 window."""
    assert fallback_roi((64, 64, 64), 32768) == (32, 32, 32)
    assert fallback_roi((128, 128, 192), 262144) == (64, 64, 64)


# --- the decoder ---------------------------------------------------------------------------------------------------
class _LocalVAE(torch.nn.Module):
    """A 'VAE' whose output voxel depends on its own latent voxel only (channel mix, then 4x nearest upsampling),
    so Gaussian-blended sliding windows must reproduce the whole decode up to rounding."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset
        self.calls: list[tuple[int, ...]] = []

    def decode_stage_2_outputs(self, z):
        self.calls.append(tuple(z.shape))
        mixed = (z * torch.tensor([0.5, -0.25, 0.125, 1.0]).view(1, 4, 1, 1, 1)).sum(1, keepdim=True)
        return torch.nn.functional.interpolate(mixed, scale_factor=4, mode="nearest") + self.offset


@pytest.fixture(scope="module")
def tiny_vae(tiny_spec):
    """The tiny MAISI VAE with random weights; the last conv's bias at 0.5 centres the output in [0, 1], so the
    comparisons below are not hidden by clipping (with bias ~0 three quarters of the voxels clip to 0)."""
    vae = build_network(tiny_spec, "autoencoder")
    fill_random(vae, 0)
    with torch.no_grad():
        vae.decoder.blocks[-1].conv.conv.bias.fill_(0.5)
    return vae


def _latents(shape, seed=0):
    return torch.randn((1, 4, *shape), generator=torch.Generator().manual_seed(seed))


def test_latent_decoder_divides_by_scale_factor(tiny_vae):
    """Latents are divided by the model's scale factor before the VAE decodes them (reference ReconModel)."""
    set_tp_splits(tiny_vae, 1)
    z = _latents((8, 8, 8))
    with torch.no_grad():
        got = LatentDecoder(tiny_vae, torch.tensor(0.8))(z)
        expected = tiny_vae.decode_stage_2_outputs(z / 0.8)
        unscaled = tiny_vae.decode_stage_2_outputs(z)
    assert got.shape == (1, 1, 32, 32, 32)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, unscaled, atol=1e-3)


def test_latent_decoder_scale_factor_with_stub():
    """z / s exactly, for a float and a tensor scale factor."""
    z = _latents((2, 2, 2))
    for s in (0.8, torch.tensor([1.25])):
        vae = _LocalVAE()
        out = LatentDecoder(vae, s)(z)
        assert torch.allclose(out, _LocalVAE().decode_stage_2_outputs(z / float(s)), rtol=0, atol=1e-6)


def test_whole_decode_calls_decoder_once_on_full_latent():
    """Whole mode decodes the full latent in one call and reports one window."""
    vae = _LocalVAE(offset=0.5)
    plan = make_decode_plan((8, 8, 8), (8, 8, 8), 0.25, 1)
    progress = []
    image = decode_latents(LatentDecoder(vae, 1.0), _latents((8, 8, 8)), plan, on_window=lambda *a: progress.append(a))
    assert vae.calls == [(1, 4, 8, 8, 8)]
    assert progress == [(1, 1)]
    assert image.shape == (1, 1, 32, 32, 32)


def test_sliding_decode_blends_exactly_for_local_decoder():
    """Sliding windows are placed and Gaussian-blended so that a voxel-local decoder gives the whole-volume image;
    each window is the plan's ROI, and there are plan.windows of them."""
    latent = _latents((12, 16, 10), seed=3)
    whole_vae, sliding_vae = _LocalVAE(0.5), _LocalVAE(0.5)
    whole = decode_latents(LatentDecoder(whole_vae, 0.8), latent, make_decode_plan((12, 16, 10), (12, 16, 10), 0, 1))
    plan = make_decode_plan((12, 16, 10), (8, 8, 8), 0.5, 1)
    assert plan.mode == "sliding" and plan.windows == 2 * 3 * 2
    progress = []
    sliding = decode_latents(LatentDecoder(sliding_vae, 0.8), latent, plan,
                             on_window=lambda done, total: progress.append((done, total)))
    assert sliding.shape == whole.shape == (1, 1, 48, 64, 40)
    assert torch.allclose(sliding, whole, rtol=0, atol=1e-5)
    assert sliding_vae.calls == [(1, 4, 8, 8, 8)] * plan.windows
    assert progress == [(k, plan.windows) for k in range(1, plan.windows + 1)]


class _WindowIndicatorVAE(torch.nn.Module):
    """Decodes the first window to 1 everywhere and every later window to 0."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def decode_stage_2_outputs(self, z):
        value = 1.0 if self.calls == 0 else 0.0
        self.calls += 1
        return torch.full((z.shape[0], 1, *(4 * s for s in z.shape[2:])), value)


def test_sliding_decode_uses_reference_gaussian_blending():
    """Overlapping windows are blended with MONAI's Gaussian importance map at sigma 0.125 of the latent ROI,
    nearest-upsampled 4x, as the reference inferer does (not a flat average)."""
    from monai.data.utils import compute_importance_map

    plan = make_decode_plan((16, 8, 8), (8, 8, 8), 0.5, 1)
    assert plan.windows == 3  # windows start at latent x = 0, 4, 8
    image = decode_latents(LatentDecoder(_WindowIndicatorVAE(), 1.0), torch.zeros(1, 4, 16, 8, 8), plan)
    weights = compute_importance_map((8, 8, 8), mode="gaussian", sigma_scale=0.125, device="cpu")[None, None]
    weights = torch.nn.functional.interpolate(weights, (32, 32, 32), mode="nearest")[0, 0]
    # Image x 16..31 is covered by window 0 (its second half) and window 1 (its first half).
    expected = weights[16:32] / (weights[16:32] + weights[0:16])
    assert torch.allclose(image[0, 0, 16:32], expected, rtol=0, atol=1e-5)
    assert float(expected.max() - expected.min()) > 0.3  # a ramp, unlike a flat 0.5
    assert torch.equal(image[0, 0, :16], torch.ones(16, 32, 32))
    assert torch.equal(image[0, 0, 32:], torch.zeros(32, 32, 32))


@pytest.mark.parametrize("mode_roi", [(16, 16, 16), (8, 8, 8)], ids=["whole", "sliding"])
def test_decode_clips_to_unit_range_on_cpu(mode_roi):
    """The decoded image is clipped to [0, 1] (values inside are kept as they are) and returned on the CPU."""
    latent = _latents((16, 16, 16), seed=5) * 2
    raw = LatentDecoder(_LocalVAE(0.5), 1.0)(latent)
    assert float(raw.min()) < 0 and float(raw.max()) > 1
    image = decode_latents(LatentDecoder(_LocalVAE(0.5), 1.0), latent, make_decode_plan((16, 16, 16), mode_roi, 0.5, 1))
    assert image.device.type == "cpu"
    assert image.dtype == torch.float32
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert torch.allclose(image, raw.clamp(0, 1), rtol=0, atol=1e-5)


def test_tiny_vae_sliding_agrees_with_whole(tiny_vae):
    """Decoding the tiny MAISI VAE by sliding window (16^3 latent, 12^3 ROI, overlap 0.5, 8 windows) gives nearly
    the whole-volume image: 4x the latent, in [0, 1], on the CPU, with one progress report per window.

    The two cannot agree exactly (each window sees zero padding at its borders and its own GroupNorm statistics).
    Measured on this input: mean |diff| 0.0074, max |diff| 0.13 (at the volume border), max |diff| 0.053 in the
    interior (2 latent voxels trimmed), Pearson r 0.964. Over 5 latent seeds: mean 0.0065-0.0074, interior max
    0.035-0.053, r 0.964-0.970. A one-latent-voxel misplacement gives mean 0.032 and r 0.41; the image's own mean
    deviation is 0.030. Tolerances: mean < 0.015, interior max < 0.1, r > 0.93.
    """
    latent = _latents((16, 16, 16), seed=0)
    decoder = LatentDecoder(tiny_vae, 0.8)
    whole = decode_latents(decoder, latent, make_decode_plan((16, 16, 16), (16, 16, 16), 0.5, 1))
    plan = make_decode_plan((16, 16, 16), (12, 12, 12), 0.5, 1)
    assert plan.mode == "sliding" and plan.windows == 8
    progress = []
    sliding = decode_latents(decoder, latent, plan, on_window=lambda done, total: progress.append((done, total)))
    assert progress == [(k, 8) for k in range(1, 9)]
    for image in (whole, sliding):
        assert image.shape == (1, 1, 64, 64, 64)
        assert image.device.type == "cpu"
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert float(image.std()) > 0.02  # a real image, not a constant
    diff = (whole - sliding).abs()
    assert float(diff.mean()) < 0.015
    assert float(diff[..., 8:-8, 8:-8, 8:-8].max()) < 0.1
    a, b = whole.flatten() - whole.mean(), sliding.flatten() - sliding.mean()
    assert float((a * b).sum() / (a.norm() * b.norm())) > 0.93


def test_tiny_vae_tp_splits_do_not_change_image(tiny_vae):
    """Tensor-parallel splits (4 on a latent axis of 16, and a requested 8 capped to 5 on an axis of 20) give the
    image of an unsplit decode within 1e-5 (measured at most 1.1e-6: float32 summation order), and decode_latents
    applies the plan's split count to the VAE."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    def splits():
        return {m.num_splits for m in tiny_vae.modules() if isinstance(m, MaisiConvolution)}

    decoder = LatentDecoder(tiny_vae, 0.8)
    for shape, requested, capped in (((16, 16, 16), 4, 4), ((8, 20, 8), 8, 5)):
        latent = _latents(shape, seed=1)
        one = decode_latents(decoder, latent, make_decode_plan(shape, shape, 0.5, 1))
        assert splits() == {1}
        plan = make_decode_plan(shape, shape, 0.5, requested)
        assert plan.tp_splits == capped
        split = decode_latents(decoder, latent, plan)
        assert splits() == {capped}
        assert torch.allclose(one, split, rtol=0, atol=1e-5)


def test_bf16_decode_is_not_quantised_to_the_bf16_grid(tiny_vae):
    """In bf16 the image comes out of an fp32 last convolution: a bf16 output has 8 significant bits, 7.8 HU steps
    in the soft-tissue range once mapped to HU (the cpu profile's demo livers showed medians only on that grid)."""
    set_tp_splits(tiny_vae, 1)
    latents = _latents((8, 8, 8), seed=5)
    plan = make_decode_plan((8, 8, 8), (8, 8, 8), 0.25, 1)
    fp32 = decode_latents(LatentDecoder(tiny_vae, 1.0), latents, plan, precision="fp32")
    bf16 = decode_latents(LatentDecoder(tiny_vae, 1.0), latents, plan, precision="bf16")
    assert bf16.dtype == torch.float32
    on_bf16_grid = bf16 == bf16.to(torch.bfloat16).float()
    assert on_bf16_grid.float().mean() < 0.2  # fp32 values land on the bf16 grid only by chance
    assert (bf16 - fp32).abs().max() < 0.02  # still a bf16 decode up to the last layer, close to fp32
    # the layer is back to what it was: outside a bf16 decode the network is MONAI's own again
    assert "forward" not in vars(tiny_vae.decoder.blocks[-1])


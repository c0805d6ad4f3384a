"""Sampling parity with the reference MAISI sampler (reference-inference.md §5, §6, §15; checklist §16 items 1-5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maisi_cli.engine.networks import build_network, build_scheduler
from maisi_cli.engine.sampling import (
    body_region_condition,
    denoise,
    derive_sample_seed,
    initial_noise,
    label_bit_planes,
    modality_condition,
    rflow_timesteps,
    schedule,
    spacing_condition,
)
from maisi_cli.models import get_model
from tests.helpers import fill_random, phantom_labels

# reference-inference.md §6 table: RFlow timesteps (float16) for N = 30, and Σdt with the int(next_t) truncation.
RFLOW_TABLE = {
    (64, 64, 32): ([1000, 978.5, 957, 934.5, 911.5], [149.875, 101.8125, 51.90625], 1.00984),
    (64, 64, 64): ([1000, 983, 965.5, 947.5, 928.5], [181.875, 125, 64.5], 1.00962),
    (128, 128, 32): ([1000, 986.5, 972.5, 958, 942.5], [218.75, 152.5, 79.9375], 1.00869),
    (128, 128, 128): ([1000, 991.5, 982.5, 973, 963], [307.75, 222.25, 121.1875], 1.00869),
    (128, 128, 192): ([1000, 992.5, 984.5, 976.5, 967.5], [337.25, 246.5, 136.375], 1.00738),
}


@pytest.fixture(scope="module")
def rflow_scheduler():
    return build_scheduler(get_model("rflow-ct"))


@pytest.fixture(scope="module")
def ddpm_scheduler():
    return build_scheduler(get_model("ddpm-ct"))


# --- item 1: timesteps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("latent", list(RFLOW_TABLE), ids=lambda s: "x".join(map(str, s)))
def test_rflow_timesteps_match_reference_table(rflow_scheduler, latent):
    """The 30-step RFlow schedule for each reference latent size is the reference's, value for value, in fp16."""
    first, last, _ = RFLOW_TABLE[latent]
    pairs = rflow_timesteps(rflow_scheduler, 30, latent)
    assert len(pairs) == 30
    t = [p[0] for p in pairs]
    next_t = [p[1] for p in pairs]
    assert all(x.dtype == torch.float16 for x in t + next_t)
    assert [float(x) for x in t[:5]] == first
    assert [float(x) for x in t[-3:]] == last
    # next_t is the list shifted by one with a final 0 (no 0 in the timesteps themselves).
    assert [float(x) for x in next_t] == [float(x) for x in t[1:]] + [0.0]
    assert float(t[-1]) > 0


def test_rflow_timesteps_depend_on_latent_voxel_count(rflow_scheduler):
    """The timestep shift is driven by the latent's voxel count, not its shape (64x64x32 and 32x64x64 agree)."""
    a = [float(t) for t, _ in rflow_timesteps(rflow_scheduler, 30, (64, 64, 32))]
    b = [float(t) for t, _ in rflow_timesteps(rflow_scheduler, 30, (32, 64, 64))]
    c = [float(t) for t, _ in rflow_timesteps(rflow_scheduler, 30, (64, 64, 64))]
    assert a == b
    assert a != c


def test_schedule_dispatches_to_rflow(rflow_scheduler):
    """`schedule` gives the RFlow (t, next_t) pairs for an RFlow model."""
    via_schedule = schedule(rflow_scheduler, 30, (64, 64, 64))
    direct = rflow_timesteps(rflow_scheduler, 30, (64, 64, 64))
    assert [(float(a), float(b)) for a, b in via_schedule] == [(float(a), float(b)) for a, b in direct]


def test_ddpm_schedule_1000_steps(ddpm_scheduler):
    """DDPM with 1000 steps runs t = 999, 998, ..., 0, with no next_t."""
    pairs = schedule(ddpm_scheduler, 1000, (64, 64, 64))
    assert [int(t) for t, _ in pairs] == list(range(999, -1, -1))
    assert all(n is None for _, n in pairs)


def test_ddpm_schedule_30_steps_monai_161(ddpm_scheduler):
    """DDPM with 30 steps follows MONAI 1.6.1 (linspace(999, 0, N).round()), as §6 notes: 999, 965, 930, ..., 34, 0."""
    steps = [int(t) for t, _ in schedule(ddpm_scheduler, 30, (64, 64, 64))]
    assert len(steps) == 30
    assert steps[:3] == [999, 965, 930]
    assert steps[-2:] == [34, 0]
    assert steps == [int(round(x)) for x in np.linspace(999, 0, 30)]
    assert [int(t) for t, _ in schedule(ddpm_scheduler, 3, (64, 64, 64))] == [999, 500, 0]


# --- item 2: the truncated Euler step ------------------------------------------------------------------------------
@pytest.mark.parametrize("latent", list(RFLOW_TABLE), ids=lambda s: "x".join(map(str, s)))
def test_rflow_integration_time_uses_truncated_next_t(rflow_scheduler, latent):
    """Σ (t − int(next_t))/1000 over the schedule is the reference's Σdt (slightly over 1, the released quirk)."""
    pairs = rflow_timesteps(rflow_scheduler, 30, latent)
    total = sum((float(t) - int(n)) / 1000 for t, n in pairs)
    assert total == pytest.approx(RFLOW_TABLE[latent][2], abs=1e-4)


def test_rflow_step_moves_by_truncated_dt(rflow_scheduler):
    """One scheduler step with velocity 1 moves the latent by exactly (t − int(next_t))/1000, for every step."""
    pairs = rflow_timesteps(rflow_scheduler, 30, (64, 64, 64))
    sample = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    velocity = torch.ones_like(sample)
    for t, next_t in pairs:
        dt = (float(t) - int(next_t)) / 1000
        moved, _ = rflow_scheduler.step(velocity, t, sample, next_t)
        assert torch.equal(moved, sample + dt), (float(t), float(next_t))
    # The first step at 64^3 is 0.017, not the exact 0.0165 (§6 quirk).
    t, next_t = pairs[0]
    moved, _ = rflow_scheduler.step(torch.ones(1), t, torch.zeros(1), next_t)
    assert float(moved) == pytest.approx(0.017, abs=1e-7)


class _RecordingControlNet(torch.nn.Module):
    """Stands in for ControlNetMaisi: records its inputs, returns marker residuals."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timesteps, controlnet_cond, **kwargs):
        self.calls.append({"timesteps": timesteps.clone(), "cond": controlnet_cond, **kwargs})
        return ["down-residuals"], "mid-residual"


class _ConstantVelocityUNet(torch.nn.Module):
    """Stands in for the diffusion UNet: predicts a constant, records its inputs."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.value = value
        self.calls = []

    def forward(self, x, timesteps, down_block_additional_residuals=None, mid_block_additional_residual=None,
                **kwargs):
        self.calls.append({"timesteps": timesteps.clone(), "down": down_block_additional_residuals,
                           "mid": mid_block_additional_residual, **kwargs})
        return torch.full_like(x, self.value)


def test_denoise_integrates_velocity_over_truncated_schedule(rflow_scheduler):
    """`denoise` with an RFlow model uses next_t in each step: a constant velocity 1 over the 30-step 64^3 schedule
    moves the latent by Σdt = 1.00962 (not 1.0, which the default 1/N step would give)."""
    pairs = schedule(rflow_scheduler, 30, (64, 64, 64))
    unet, controlnet = _ConstantVelocityUNet(1.0), _RecordingControlNet()
    latents = torch.zeros(1, 4, 2, 2, 2)
    out = denoise(unet, controlnet, rflow_scheduler, latents, torch.zeros(1, 8, 8, 8, 8), pairs, {}, {})
    assert out.shape == latents.shape
    assert torch.allclose(out, torch.full_like(out, 1.00962), atol=1e-4)
    assert float(out.mean()) > 1.005


def test_denoise_passes_conditions_and_fp16_rounded_timesteps(rflow_scheduler):
    """Both networks get each fp16-rounded t as an fp32 (1,) tensor; the modality goes to both, the spacing and the
    ControlNet residuals to the UNet, the bit planes to the ControlNet."""
    pairs = schedule(rflow_scheduler, 30, (64, 64, 64))
    unet, controlnet = _ConstantVelocityUNet(0.0), _RecordingControlNet()
    spacing = spacing_condition((1.5, 1.5, 2.0))
    modality = modality_condition(1)
    cond = torch.ones(1, 8, 8, 8, 8)
    denoise(unet, controlnet, rflow_scheduler, torch.zeros(1, 4, 2, 2, 2), cond, pairs,
            {"spacing_tensor": spacing, "class_labels": modality}, {"class_labels": modality})
    assert len(unet.calls) == len(controlnet.calls) == 30
    expected_t = [float(t) for t, _ in pairs]
    for calls in (unet.calls, controlnet.calls):
        for call, t in zip(calls, expected_t):
            assert call["timesteps"].dtype == torch.float32
            assert call["timesteps"].shape == (1,)
            assert float(call["timesteps"][0]) == t
            assert torch.equal(call["class_labels"], torch.tensor([1]))
    assert all(torch.equal(c["spacing_tensor"], spacing) for c in unet.calls)
    assert all(c["down"] == ["down-residuals"] and c["mid"] == "mid-residual" for c in unet.calls)
    assert all(c["cond"] is cond for c in controlnet.calls)
    assert all("spacing_tensor" not in c for c in controlnet.calls)


def test_denoise_ddpm_noise_comes_from_generator(ddpm_scheduler):
    """DDPM steps draw their noise from the given generator: same seed, same latents; another seed, other latents."""
    pairs = schedule(ddpm_scheduler, 5, (2, 2, 2))

    def run(seed):
        return denoise(_ConstantVelocityUNet(0.0), _RecordingControlNet(), ddpm_scheduler, torch.zeros(1, 4, 2, 2, 2),
                       torch.zeros(1, 8, 8, 8, 8), pairs, {}, {}, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert float(first.abs().max()) > 0


# --- item 3: noise and seeds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 42, 2**31 + 7])
def test_initial_noise_is_reference_cpu_randn(seed):
    """The noise is `torch.manual_seed(S); torch.randn(1, C, x, y, z)` in fp32 on the CPU, bit for bit."""
    noise = initial_noise((4, 16, 16, 8), seed)
    torch.manual_seed(seed)
    expected = torch.randn(1, 4, 16, 16, 8)
    assert noise.shape == (1, 4, 16, 16, 8)
    assert noise.dtype == torch.float32
    assert noise.device.type == "cpu"
    assert torch.equal(noise, expected)


def test_initial_noise_differs_between_seeds_and_ignores_global_rng():
    """Different seeds give different noise; the global RNG state does not change a sample's noise."""
    a = initial_noise((4, 8, 8, 8), 1)
    torch.manual_seed(12345)
    torch.randn(100)
    assert torch.equal(initial_noise((4, 8, 8, 8), 1), a)
    assert not torch.allclose(a, initial_noise((4, 8, 8, 8), 2))


def test_derive_sample_seed_is_deterministic_and_distinct():
    """Per-sample seeds depend on (run seed, index) only, never collide in a small grid, and fit in 63 bits."""
    seeds = {(s, k): derive_sample_seed(s, k) for s in range(20) for k in range(50)}
    assert all(derive_sample_seed(s, k) == v for (s, k), v in seeds.items())
    assert len(set(seeds.values())) == len(seeds)
    assert all(isinstance(v, int) and 0 <= v < 2**63 for v in seeds.values())
    assert derive_sample_seed(0, 1) != derive_sample_seed(1, 0)
    assert derive_sample_seed(2**40, 3) != derive_sample_seed(2**40, 4)


def test_derive_sample_seed_is_stable_across_releases():
    """The same --seed must keep giving the same samples across runs and releases: pinned values."""
    assert derive_sample_seed(0, 0) == PINNED_SEEDS[(0, 0)]
    assert derive_sample_seed(0, 1) == PINNED_SEEDS[(0, 1)]
    assert derive_sample_seed(42, 3) == PINNED_SEEDS[(42, 3)]


# Values of the current derivation (NumPy SeedSequence([seed, index]), top 63 bits); a change here changes every
# user's samples for a given --seed.
PINNED_SEEDS = {(0, 0): 7896617691693857887, (0, 1): 2918264622725855778, (42, 3): 9070686161206165030}


# --- item 4: bit planes ------------------------------------------------------------------------------------------
def test_bit_planes_of_body_label():
    """Label 200 (body) = 0b11001000 sets exactly channels 3, 6 and 7 of the 8 ControlNet planes."""
    planes = label_bit_planes(torch.full((1, 1, 2, 2, 2), 200))
    assert planes.shape == (1, 8, 2, 2, 2)
    assert planes.dtype == torch.float32
    on = [k for k in range(8) if bool((planes[0, k] == 1).all())]
    off = [k for k in range(8) if bool((planes[0, k] == 0).all())]
    assert on == [3, 6, 7]
    assert off == [0, 1, 2, 4, 5]


def test_bit_planes_lsb_first():
    """Label 1 lights channel 0 only (least significant bit first); 128 lights channel 7 only."""
    one = label_bit_planes(torch.ones((1, 1, 1, 1, 1), dtype=torch.uint8))
    assert one.flatten().tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    top = label_bit_planes(torch.full((1, 1, 1, 1, 1), 128))
    assert top.flatten().tolist() == [0, 0, 0, 0, 0, 0, 0, 1]


def test_bit_planes_reconstruct_every_label():
    """Σ 2^k · plane_k gives back every label value 0..255, and the planes are binary."""
    labels = torch.arange(256).reshape(1, 1, 4, 8, 8)
    planes = label_bit_planes(labels)
    assert set(planes.unique().tolist()) == {0.0, 1.0}
    weights = (2 ** torch.arange(8)).view(1, 8, 1, 1, 1).to(torch.float32)
    assert torch.equal((planes * weights).sum(dim=1, keepdim=True).to(torch.int64), labels)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_bit_planes_equal_numpys_unpackbits_for_each_label_dtype(dtype):
    """Planes of a random batch equal numpy's own bit unpacking (little-endian bit order), whatever integer type the
    labels arrive in (the pipeline sends uint8, training int64)."""
    labels = torch.randint(0, 256, (2, 1, 5, 6, 7), generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = np.unpackbits(labels.to(torch.uint8).numpy()[:, 0, ..., None], axis=-1, bitorder="little")
    planes = label_bit_planes(labels)
    assert planes.dtype == torch.float32 and planes.shape == (2, 8, 5, 6, 7)
    assert np.array_equal(planes.numpy(), np.moveaxis(expected, -1, 1).astype(np.float32))


@pytest.mark.parametrize("bad", [-1, 256, 1000])
def test_bit_planes_reject_out_of_range(bad):
    """Labels outside 0..255 cannot be encoded in 8 planes: ValueError instead of a silent wrap."""
    labels = torch.zeros((1, 1, 2, 2, 2), dtype=torch.int64)
    labels[0, 0, 1, 1, 1] = bad
    with pytest.raises(ValueError):
        label_bit_planes(labels)


# --- item 5: conditioning tensors --------------------------------------------------------------------------------
def test_spacing_condition_is_mm_times_100():
    """Spacing (1.5, 1.5, 2.0) mm becomes [[150, 150, 200]] float32, shape (1, 3)."""
    spacing = spacing_condition((1.5, 1.5, 2.0))
    assert spacing.shape == (1, 3)
    assert spacing.dtype == torch.float32
    assert torch.allclose(spacing, torch.tensor([[150.0, 150.0, 200.0]]), rtol=0, atol=1e-4)


def test_modality_condition_ct():
    """CT's modality is the int64 class label tensor([1])."""
    modality = modality_condition(1)
    assert modality.dtype == torch.int64
    assert torch.equal(modality, torch.tensor([1]))


@pytest.mark.parametrize("region,expected", [(0, [100, 0, 0, 0]), (1, [0, 100, 0, 0]), (3, [0, 0, 0, 100])])
def test_body_region_condition_one_hot_times_100(region, expected):
    """A body region index becomes a (1, 4) one-hot ×100 (1 = chest → [[0, 100, 0, 0]])."""
    onehot = body_region_condition(region)
    assert onehot.shape == (1, 4)
    assert onehot.dtype == torch.float32
    assert onehot.tolist() == [expected]


# --- denoise with real (tiny) MAISI networks ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_nets(tiny_spec):
    unet = build_network(tiny_spec, "diffusion_unet")
    controlnet = build_network(tiny_spec, "controlnet")
    fill_random(unet, 1)
    fill_random(controlnet, 2)
    return unet, controlnet, build_scheduler(tiny_spec)


def _tiny_denoise(tiny_nets, labels, on_step=None, modality=1):
    unet, controlnet, scheduler = tiny_nets
    steps = schedule(scheduler, 3, (8, 8, 8))
    noise = initial_noise((4, 8, 8, 8), 7)
    cond = label_bit_planes(torch.from_numpy(labels.astype(np.int64))[None, None])
    class_labels = modality_condition(modality)
    with torch.inference_mode():
        out = denoise(unet, controlnet, scheduler, noise.clone(), cond, steps,
                      {"spacing_tensor": spacing_condition((2.0, 2.0, 2.0)), "class_labels": class_labels},
                      {"class_labels": class_labels}, on_step=on_step)
    return noise, out


def test_denoise_tiny_networks(tiny_nets):
    """A 3-step run of the tiny ControlNet + UNet gives finite latents of the noise's shape, moved away from the
    noise, identical across two runs, and reports progress (1, 3), (2, 3), (3, 3)."""
    labels = phantom_labels((32, 32, 32))
    progress = []
    noise, out = _tiny_denoise(tiny_nets, labels, on_step=lambda done, total: progress.append((done, total)))
    assert out.shape == noise.shape == (1, 4, 8, 8, 8)
    assert torch.isfinite(out).all()
    assert float((out - noise).abs().mean()) > 1e-3
    assert progress == [(1, 3), (2, 3), (3, 3)]
    _, again = _tiny_denoise(tiny_nets, labels)
    assert torch.equal(out, again)


def test_denoise_tiny_networks_follow_mask(tiny_nets):
    """The condition mask reaches the networks: another mask gives other latents. (The tiny random ControlNet's
    residuals are weak: measured max |diff| 2.8e-4 between the phantom and an empty mask, far above float noise.)"""
    labels = phantom_labels((32, 32, 32))
    _, out = _tiny_denoise(tiny_nets, labels)
    _, empty = _tiny_denoise(tiny_nets, np.zeros_like(labels))
    assert float((out - empty).abs().max()) > 2e-5
    assert math.isfinite(float(empty.sum()))


def test_condition_embedded_once_gives_identical_latents(tiny_nets):
    """Embedding the mask once per sample instead of once per step changes nothing, to the bit, and the
    ControlNet gets its own embedding module back afterwards."""
    unet, controlnet, scheduler = tiny_nets
    original = controlnet.controlnet_cond_embedding
    labels = phantom_labels((32, 32, 32))
    cond = label_bit_planes(torch.from_numpy(labels.astype(np.int64))[None, None])
    inputs = {"spacing_tensor": spacing_condition((2.0, 2.0, 2.0)), "class_labels": modality_condition(1)}
    runs = {}
    for once in (True, False):
        with torch.inference_mode():
            runs[once] = denoise(unet, controlnet, scheduler, initial_noise((4, 8, 8, 8), 3), cond,
                                 schedule(scheduler, 3, (8, 8, 8)), inputs, {"class_labels": modality_condition(1)},
                                 embed_condition_once=once)
    assert torch.equal(runs[True], runs[False])
    assert controlnet.controlnet_cond_embedding is original

"""GPU speed levers (maisi_cli/levers.py, engine/levers.py): parsed from a profile's [levers] or MAISI_LEVERS, off by
default, CUDA-only ones dropped with a note on the CPU, recorded in the sidecar, and wired into the networks the
Python API runs (torch.compile replaced by a recording stand-in: a real compile takes minutes)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from maisi_cli.engine import levers as engine_levers
from maisi_cli.engine.levers import LeveredNetwork, cudnn_benchmark
from maisi_cli.engine.sampling import condition_embedded_once
from maisi_cli.errors import UsageError
from maisi_cli.levers import ENV, Levers, parse_levers
from maisi_cli.models import get_model
from maisi_cli.profiles import get_profile, read_profile
from tests.helpers import phantom_labels, write_tiny_model

CPU_PROFILE = get_profile("cpu")


def profile_file(tmp_path, levers: str, base: str = "cpu", precision: str | None = "fp32"):
    """A copy of a built-in profile with this [levers] table (and fp32, so the CPU runs are exact)."""
    text = open(get_profile(base).path).read().split("[levers]")[0]
    if precision:
        text = text.replace('precision = "bf16"', f'precision = "{precision}"')
    path = tmp_path / f"{base}-levers.toml"
    path.write_text(text.replace(f'name = "{base}"', f'name = "{base}-levers"') + "\n[levers]\n" + levers + "\n")
    return path


# --- parsing ---------------------------------------------------------------------------------------------------
def test_levers_parse_from_the_environment_text():
    levers = parse_levers("cudnn_benchmark, compile ,decode_overlap=0.4,decode_plan=planner")
    assert levers.cudnn_benchmark and levers.compile and not levers.channels_last and not levers.cuda_graphs
    assert levers.decode_overlap == 0.4 and levers.decode_plan == "planner"
    assert levers.on() == ["cudnn_benchmark", "compile", "decode_overlap=0.4", "decode_plan=planner"]
    assert parse_levers("off") == Levers() == parse_levers("") and not Levers().any_on


@pytest.mark.parametrize(("text", "names"), [
    ("turbo", ["MAISI_LEVERS", "unknown lever 'turbo'", "cudnn_benchmark"]),
    ("decode_overlap", ["needs a value", "decode_overlap=0.4"]),
    ("decode_overlap=1.5", ["decode_overlap", "less than 1"]),
    ("decode_plan=fastest", ["decode_plan", "'table' or 'planner'"]),
])
def test_bad_lever_text_is_one_clear_line(text, names):
    with pytest.raises(UsageError) as caught:
        parse_levers(text)
    message = str(caught.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_a_profile_with_an_unknown_lever_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"field 'levers.turbo'"):
        read_profile(profile_file(tmp_path, "turbo = true"))


def test_builtin_profiles_have_every_lever_off():
    from maisi_cli.profiles import list_profiles

    assert all(not profile.levers.any_on for profile in list_profiles())


def test_cuda_only_levers_are_dropped_on_the_cpu_with_a_note():
    levers = parse_levers("cudnn_benchmark,cuda_graphs,channels_last")
    applied, notes = levers.for_device("cpu")
    assert applied.on() == ["channels_last"]
    assert notes == ["cudnn_benchmark: needs a CUDA GPU, ignored on cpu", "cuda_graphs: needs a CUDA GPU, ignored on cpu"]
    assert levers.for_device("cuda") == (levers, [])
    exported, notes = parse_levers("compile,cudnn_benchmark").for_device("cuda", "onnx")
    assert exported.on() == ["cudnn_benchmark"] and "ignored with --backend onnx" in notes[0]


# --- decode levers: where the plan is made ------------------------------------------------------------------------
def test_decode_overlap_lever_replaces_the_tables(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    spec = get_model("rflow-ct")
    size, latent = (512, 512, 512), (128, 128, 128)
    table = get_profile("24g").decode_plan(latent, size, spec=spec)
    assert table.overlap == 0.4 and table.windows == 36  # config_infer_24g_512x512x512.json
    profile = read_profile(profile_file(tmp_path, "decode_overlap = 0.6666", base="24g", precision=None))
    wider = profile.decode_plan(latent, size, spec=spec)
    assert wider.roi == table.roi and wider.overlap == 0.6666 and wider.windows > table.windows
    assert "overlap 0.6666 from profile 24g-levers" in wider.rule
    monkeypatch.setenv(ENV, "decode_overlap=0.25")  # the environment replaces the profile's levers
    narrower = profile.decode_plan(latent, size, spec=spec)
    assert narrower.overlap == 0.25 and narrower.windows <= table.windows and "from MAISI_LEVERS" in narrower.rule


def test_planner_lever_plans_a_tabled_size(monkeypatch):
    spec = get_model("rflow-ct")
    monkeypatch.setenv(ENV, "decode_plan=planner")
    planned = get_profile("24g").decode_plan((64, 64, 64), (256, 256, 256), spec=spec)
    assert planned.rule.startswith("24g planner (fits 24 GiB), decode_plan from MAISI_LEVERS")
    monkeypatch.setenv(ENV, "off")
    assert get_profile("24g").decode_plan((64, 64, 64), (256, 256, 256), spec=spec).rule.startswith("24g table")


# --- network levers --------------------------------------------------------------------------------------------------
def test_cudnn_benchmark_is_set_only_inside_and_restored():
    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(True):
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark is before
    with cudnn_benchmark(False):
        assert torch.backends.cudnn.benchmark is before


class _Embedding(torch.nn.Module):
    def forward(self, condition):
        return condition * 2


class _StandInControlNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.controlnet_cond_embedding = _Embedding()

    def forward(self, x, timesteps, controlnet_cond):
        return x + self.controlnet_cond_embedding(controlnet_cond)


def test_a_levered_network_lets_the_condition_embedding_be_cached():
    """condition_embedded_once reads and swaps the ControlNet's embedding through the wrapper."""
    inner = _StandInControlNet()
    wrapped = LeveredNetwork(inner, parse_levers("cudnn_benchmark"), {}, "controlnet")
    condition = torch.ones(1, 1, 2, 2, 2)
    with condition_embedded_once(wrapped, condition):
        assert type(inner.controlnet_cond_embedding).__name__ == "_CachedEmbedding"
        out = wrapped(x=torch.zeros(1, 1, 2, 2, 2), timesteps=torch.zeros(1), controlnet_cond=condition * 0)
    assert torch.equal(out, condition * 2)  # the cached embedding of the first condition, not of the one passed
    assert isinstance(inner.controlnet_cond_embedding, _Embedding)


# --- through the Python API -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("levers-model"), mask_generator=False)


def generate(tiny_model, profile):
    from maisi_cli.api import Generator

    spec_path, weights_dir = tiny_model
    generator = Generator(str(spec_path), profile=str(profile), device="cpu", weights_dir=weights_dir)
    mask = (phantom_labels((32, 32, 32)), np.diag([2.0, 2.0, 2.0, 1.0]))
    sample = generator.generate(mask, size=(32, 32, 32), spacing=(2.0, 2.0, 2.0), steps=2, qc=False)[0]
    return generator, sample


def test_levers_reach_the_networks_the_api_runs_and_the_sidecar(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    compiled = []

    def stand_in_compile(network, **options):  # records what the engine asks torch.compile for, runs eagerly
        compiled.append((type(network).__name__, options))
        return lambda *args, **kwargs: network(*args, **kwargs)

    monkeypatch.setattr(engine_levers.torch, "compile", stand_in_compile)
    plain_generator, plain = generate(tiny_model, profile_file(tmp_path, ""))
    assert plain_generator._loaded.backend == {"name": "torch"}  # all off: no wrapper, no record
    assert not isinstance(plain_generator._loaded.unet, LeveredNetwork) and compiled == []

    levered_profile = profile_file(tmp_path, "compile = true\ncudnn_benchmark = true\ncuda_graphs = true")
    generator, sample = generate(tiny_model, levered_profile)
    record = generator._loaded.backend["levers"]
    assert record["source"] == "profile cpu-levers"
    assert record["on"] == ["compile"]
    assert record["requested"] == ["cudnn_benchmark", "compile", "cuda_graphs"]
    assert record["notes"] == ["cudnn_benchmark: needs a CUDA GPU, ignored on cpu",
                               "cuda_graphs: needs a CUDA GPU, ignored on cpu"]
    assert set(record["compile_s"]) == {"unet", "controlnet"} and min(record["compile_s"].values()) > 0
    assert sorted(name for name, _ in compiled) == ["ControlNetMaisi", "DiffusionModelUNetMaisi"]
    assert all(options == {"mode": "default", "backend": "inductor", "dynamic": False} for _, options in compiled)
    assert json.loads(json.dumps(sample.sidecar))["backend"]["levers"] == record
    # the stand-in runs the same networks eagerly: the same pair
    assert np.array_equal(sample.image, plain.image) and np.array_equal(sample.labels, plain.labels)


def test_channels_last_decoder_decodes_the_same_image(tiny_spec):
    """The channels-last lever converts the decoder's weights and each window's input; the image agrees to float
    rounding (another convolution summation order)."""
    from maisi_cli.decode_plan import make_decode_plan
    from maisi_cli.engine.decode import LatentDecoder, decode_latents
    from maisi_cli.engine.levers import apply_levers
    from maisi_cli.engine.networks import build_network
    from tests.helpers import fill_random

    autoencoder = build_network(tiny_spec, "autoencoder")
    fill_random(autoencoder, 0)
    latents = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = make_decode_plan((8, 8, 8), (4, 8, 8), 0.25, 1)
    plain = decode_latents(LatentDecoder(autoencoder, torch.tensor(1.0)), latents, plan)
    record: dict = {}
    _, _, decoder = apply_levers(parse_levers("channels_last"), record, None, None,
                                 LatentDecoder(autoencoder, torch.tensor(1.0)))
    assert next(p for p in decoder.parameters() if p.dim() == 5).is_contiguous(memory_format=torch.channels_last_3d)
    levered = decode_latents(decoder, latents, plan)
    assert plan.mode == "sliding" and torch.allclose(levered, plain, atol=1e-5)


def test_the_environment_turns_levers_on_for_one_run(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "cuda_graphs")
    generator, sample = generate(tiny_model, profile_file(tmp_path, ""))
    assert sample.sidecar["backend"]["levers"] == {"source": ENV, "on": [], "requested": ["cuda_graphs"],
                                                   "notes": ["cuda_graphs: needs a CUDA GPU, ignored on cpu"]}
    assert not isinstance(generator._loaded.unet, LeveredNetwork)


def test_use_levers_sets_the_override_for_a_block_only(monkeypatch):
    from maisi_cli.levers import effective_levers, use_levers

    monkeypatch.delenv(ENV, raising=False)
    with use_levers("compile,decode_overlap=0.5"):
        levers, source = effective_levers(Levers(), "24g")
        assert source == ENV and levers.compile and levers.decode_overlap == 0.5
    assert effective_levers(Levers(), "24g") == (Levers(), "profile 24g")
    with pytest.raises(UsageError, match="unknown lever 'fast'"):
        with use_levers("fast"):
            pass
    assert ENV not in os.environ

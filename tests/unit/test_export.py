"""ONNX export of the tiny networks (engine/export.py), onnxruntime against PyTorch, the manifest, the ONNX and
TensorRT cache keys, and the one-line errors when an extra is missing."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from maisi_cli.errors import UsageError  # noqa: E402

# onnxruntime CPU vs PyTorch fp32 on the tiny networks: measured ≤ 2e-6 (UNet 1e-7, VAE decoder 1.2e-6); 1e-4 leaves
# room for other CPUs.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_model, tiny_onnx_export):
    """Every component of the tiny model, exported once for the session (tests/conftest.py): (spec, manifest,
    folder, networks, scale factors)."""
    from maisi_cli.engine.export import load_sources
    from maisi_cli.engine.graph_parts import image_components
    from maisi_cli.models import get_model

    spec_path, weights = tiny_model
    spec = get_model(str(spec_path))
    out, _ = tiny_onnx_export
    manifest = json.loads((out / "manifest.json").read_text())
    networks, scales, _ = load_sources(spec, image_components(spec), weights)
    return spec, manifest, out, networks, scales


def test_every_component_exports_and_matches_pytorch(exported, tiny_model):
    spec, manifest, out, _, _ = exported
    _, weights = tiny_model
    assert set(manifest["components"]) == {"unet", "controlnet", "vae-decoder", "mask-unet", "mask-decoder"}
    assert manifest["opset"] == 18 and manifest["model"] == spec.name
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for component, entry in manifest["components"].items():
        for name, weight in entry["weights"].items():
            expected = hashlib.sha256((weights / weight["file"]).read_bytes()).hexdigest()
            assert weight["sha256"] == expected, (component, name)
        for part in entry["parts"]:
            path = out / part["file"]
            assert path.is_file() and part["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert 0 <= part["max_abs_diff"] <= TOLERANCE, (component, part)
            x = next(i for i in part["inputs"] if i["name"] in ("x", "z", "controlnet_cond"))
            assert all(isinstance(d, str) for d in x["shape"][2:]), x  # dynamic spatial axes
            assert isinstance(x["shape"][0], int) and isinstance(x["shape"][1], int)
    assert [p["part"] for p in manifest["components"]["controlnet"]["parts"]] == ["controlnet_embedding", "controlnet"]
    assert "scale_factor" in manifest["components"]["vae-decoder"]
    unet_inputs = [i["name"] for i in manifest["components"]["unet"]["parts"][0]["inputs"]]
    assert unet_inputs[:4] == ["x", "timesteps", "class_labels", "spacing_tensor"] and "mid" in unet_inputs
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder or temporary manifest left


@pytest.mark.parametrize("component", ["unet", "controlnet", "vae-decoder", "mask-unet", "mask-decoder"])
def test_a_second_size_runs_on_the_same_graph(exported, component):
    """Exported at 32³ (latent 8³; mask latent 8³), run at latent 12x8x16 (mask 12³): same files, same tolerance."""
    from maisi_cli.engine.export import graph_specs, run_session, session_for
    from maisi_cli.engine.graph_parts import PARTS, SCALE_OF

    spec, _, out, networks, scales = exported
    latent = (4, 12, 12, 12) if component.startswith("mask") else (4, 12, 8, 16)
    graphs = graph_specs(component, networks, scales.get(SCALE_OF.get(component, "")), latent, spec, seed=5)
    assert [g.part for g in graphs] == list(PARTS[component])
    import torch

    for graph in graphs:
        with torch.no_grad():
            expected = graph.module(*graph.inputs.values())
        expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
        got = run_session(session_for(out / f"{graph.part}.onnx"), graph.inputs)
        assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
        difference = max(float(np.max(np.abs(g - e.numpy()))) for g, e in zip(got, expected))
        assert difference <= TOLERANCE, (graph.part, difference)


def test_onnx_controlnet_embeds_the_condition_once_per_sample(exported):
    """The stand-in exposes `controlnet_cond_embedding`, so the loop's cache applies: one embedding call per
    sample, and the same residuals as MONAI's ControlNet on the raw condition."""
    import torch

    from maisi_cli.engine.backends import OnnxControlNet, OnnxGraph
    from maisi_cli.engine.sampling import condition_embedded_once

    spec, _, out, networks, _ = exported
    stand_in = OnnxControlNet(OnnxGraph(out / "controlnet_embedding.onnx"), OnnxGraph(out / "controlnet.onnx"))
    calls = []
    original = stand_in.controlnet_cond_embedding
    stand_in.controlnet_cond_embedding = lambda cond: calls.append(1) or original(cond)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((1, 4, 8, 8, 8), generator=generator)
    cond = (torch.rand((1, 8, 32, 32, 32), generator=generator) > 0.5).float()
    labels = torch.tensor([1])
    with torch.inference_mode(), condition_embedded_once(stand_in, cond):
        for t in (900.0, 500.0):
            down, mid = stand_in(x=x, timesteps=torch.tensor([t]), controlnet_cond=cond, class_labels=labels)
            want_down, want_mid = networks["controlnet"](x=x, timesteps=torch.tensor([t]), controlnet_cond=cond,
                                                         class_labels=labels)
            assert float((mid - want_mid).abs().max()) <= TOLERANCE
            assert len(down) == len(want_down)
            assert max(float((a - b).abs().max()) for a, b in zip(down, want_down)) <= TOLERANCE
    assert len(calls) == 1


def test_onnx_cache_key_follows_weights_component_and_opset(exported):
    from maisi_cli.engine.export import component_key

    spec = exported[0]
    weights = {"diffusion_unet": "a" * 64, "controlnet": "b" * 64, "autoencoder": "c" * 64}
    key = component_key("unet", weights, spec)
    assert key == component_key("unet", dict(weights), spec)
    assert key != component_key("unet", {**weights, "diffusion_unet": "d" * 64}, spec)
    assert key == component_key("unet", {**weights, "controlnet": "d" * 64}, spec)  # not a source of the UNet
    assert key != component_key("unet", weights, spec, opset=19)
    assert key != component_key("controlnet", weights, spec)
    # the decoder bakes in the diffusion UNet's scale factor: both checkpoints are its sources
    decoder = component_key("vae-decoder", weights, spec)
    assert decoder != component_key("vae-decoder", {**weights, "diffusion_unet": "d" * 64}, spec)


def test_trt_engine_key_changes_with_shape_weights_precision_and_version():
    from maisi_cli.engine.trt import engine_key

    shapes = {"x": [1, 4, 64, 64, 64], "timesteps": [1], "down_block_additional_residuals": [[1, 64, 64, 64, 64]],
              "context": None}
    key = engine_key("a" * 64, "unet", shapes, "fp16", "10.3.0")
    assert len(key) == 64 and key == engine_key("a" * 64, "unet", dict(shapes), "fp16", "10.3.0")
    assert key == engine_key("a" * 64, "unet", {k: v for k, v in shapes.items() if v is not None}, "fp16", "10.3.0")
    assert key != engine_key("a" * 64, "unet", {**shapes, "x": [1, 4, 128, 128, 64]}, "fp16", "10.3.0")
    assert key != engine_key("a" * 64, "unet", {**shapes, "down_block_additional_residuals": [[1, 64, 32, 32, 32]]},
                             "fp16", "10.3.0")
    assert key != engine_key("b" * 64, "unet", shapes, "fp16", "10.3.0")
    assert key != engine_key("a" * 64, "unet", shapes, "fp32", "10.3.0")
    assert key != engine_key("a" * 64, "unet", shapes, "fp16", "10.5.0")
    assert key != engine_key("a" * 64, "controlnet", shapes, "fp16", "10.3.0")


def test_trt_call_shapes_name_positional_and_keyword_inputs():
    import torch

    from maisi_cli.engine.trt import call_shapes

    class Net(torch.nn.Module):
        def forward(self, x, timesteps, residuals=None):
            return x

    shapes = call_shapes(Net(), (torch.zeros(1, 4, 8, 8, 8),), {"timesteps": torch.zeros(1),
                                                                 "residuals": [torch.zeros(1, 2, 4, 4, 4)]})
    assert shapes == {"x": [1, 4, 8, 8, 8], "timesteps": [1], "residuals": [[1, 2, 4, 4, 4]]}


def test_trt_without_tensorrt_is_one_clear_error(monkeypatch):
    from maisi_cli.engine.graph_parts import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError
    with pytest.raises(UsageError) as failure:
        require_tensorrt("--backend trt")
    message = str(failure.value)
    assert message == "--backend trt: TensorRT is not installed; install maisi[trt] on a machine with an NVIDIA GPU"


def test_missing_onnx_extra_names_it(monkeypatch):
    from maisi_cli.engine.graph_parts import require_onnx

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UsageError, match=r"onnxscript is not installed; install the extra: pip install 'maisi\[onnx\]'"):
        require_onnx("--backend onnx")


def test_component_names_are_checked(exported):
    from maisi_cli.engine.graph_parts import parse_components

    spec = exported[0]
    assert parse_components("all", spec) == ("unet", "controlnet", "vae-decoder", "mask-unet", "mask-decoder")
    assert parse_components("unet,vae-decoder,unet", spec) == ("unet", "vae-decoder")
    with pytest.raises(UsageError, match="--component: 'decoder' is not a component"):
        parse_components("decoder", spec)


@pytest.mark.skipif(os.environ.get("MAISI_SLOW") != "1", reason="full-size export: set MAISI_SLOW=1 (minutes, ~5 GB)")
@pytest.mark.slow
def test_full_size_networks_export_and_match(tmp_path):
    """rflow-ct's networks at their real size (random weights in the released layout), exported at 64³."""
    from maisi_cli.engine.export import export_onnx
    from maisi_cli.models import get_model
    from tests.helpers import write_released_weights

    spec = get_model("rflow-ct")
    write_released_weights(spec, tmp_path / "weights")
    manifest = export_onnx(spec, ("unet", "controlnet", "vae-decoder"), tmp_path / "onnx", tmp_path / "weights",
                           size=(64, 64, 64))
    for component, entry in manifest["components"].items():
        for part in entry["parts"]:
            assert part["max_abs_diff"] <= 1e-3, (component, part["part"], part["max_abs_diff"])

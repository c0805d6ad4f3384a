"""`maisi export onnx|trt` and `maisi generate --backend onnx|trt` through the CLI runner on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

runner = CliRunner()
# `--backend onnx` against `--backend torch`, same seed, tiny model, 4 steps: measured max |ΔHU| = 1 (one voxel, the
# int16 rounding of a ~1e-6 float difference).
HU_TOLERANCE = 2


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_export) -> Path:
    """`maisi export onnx --component all` of the tiny model (tests/conftest.py, once for the session)."""
    out, document = tiny_onnx_export
    # stdout is the manifest alone: the exporter's chatter is kept off it
    assert document == {"ok": True, **json.loads((out / "manifest.json").read_text())}
    return out


def generate(tiny_model, mask: Path, out: Path, *extra: str):
    spec, weights = tiny_model
    return runner.invoke(app, ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights), "--mask",
                               str(mask), "--out", str(out), "--no-qc", "--seed", "3", *extra])


def image(out: Path) -> np.ndarray:
    return np.asarray(nib.load(out / "sample_0000_image.nii.gz").dataobj).astype(np.int32)


def test_export_onnx_writes_every_graph_and_the_manifest(onnx_dir):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    files = sorted(p.name for p in onnx_dir.glob("*.onnx"))
    assert files == ["controlnet.onnx", "controlnet_embedding.onnx", "mask_decoder.onnx", "mask_unet.onnx",
                     "unet.onnx", "vae_decoder.onnx"]
    for entry in manifest["components"].values():
        assert entry["latent_shape"][1:] in ([8, 8, 8],)
        for part in entry["parts"]:
            assert part["max_abs_diff"] <= 1e-4 and part["inputs"] and part["outputs"] and part["export_shapes"]
    assert manifest["opset"] == 18 and set(manifest["versions"]) == {"torch", "onnx", "onnxruntime"}


def test_generate_onnx_from_exported_files_matches_torch(tiny_model, mask_file, onnx_dir, tmp_path):
    torch_run = generate(tiny_model, mask_file, tmp_path / "torch", "--precision", "fp32")  # the graphs are fp32
    assert torch_run.exit_code == 0, torch_run.stderr
    onnx_run = generate(tiny_model, mask_file, tmp_path / "onnx", "--backend", "onnx", "--onnx-dir", str(onnx_dir))
    assert onnx_run.exit_code == 0, onnx_run.stderr
    assert json.loads(onnx_run.stdout)["plan"]["backend"] == "onnx"
    difference = np.abs(image(tmp_path / "torch") - image(tmp_path / "onnx"))
    assert difference.max() <= HU_TOLERANCE, difference.max()
    labels = [np.asarray(nib.load(tmp_path / d / "sample_0000_label.nii.gz").dataobj) for d in ("torch", "onnx")]
    np.testing.assert_array_equal(*labels)
    sidecar = json.loads((tmp_path / "onnx" / "sample_0000.json").read_text())
    assert sidecar["backend"]["name"] == "onnx" and sidecar["backend"]["providers"] == ["CPUExecutionProvider"]
    assert set(sidecar["backend"]["files"]) == {"controlnet_embedding", "controlnet", "unet", "vae_decoder"}
    assert json.loads((tmp_path / "torch" / "sample_0000.json").read_text())["backend"] == {"name": "torch"}


def test_generate_onnx_exports_into_maisi_home_on_first_use(tiny_model, mask_file, tmp_path):
    first = generate(tiny_model, mask_file, tmp_path / "a", "--backend", "onnx")
    assert first.exit_code == 0, first.stderr
    assert "export onnx unet" in first.stderr and "export onnx controlnet" in first.stderr
    cache = tmp_path / "maisi-home" / "onnx"
    folders = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    assert folders == ["controlnet", "unet", "vae-decoder"]
    second = generate(tiny_model, mask_file, tmp_path / "b", "--backend", "onnx")
    assert second.exit_code == 0, second.stderr
    assert "export onnx" not in second.stderr  # the cached graphs are reused
    np.testing.assert_array_equal(image(tmp_path / "a"), image(tmp_path / "b"))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--backend", "tpu"], "--backend: 'tpu' is not a backend"),
        (["--onnx-dir", "x"], "--onnx-dir: only with --backend onnx"),
        (["--backend", "onnx", "--precision", "bf16"], "--backend onnx: the exported graphs are fp32"),
        (["--backend", "trt"], "--backend trt: TensorRT is not installed; install maisi[trt] on a machine with an "
                               "NVIDIA GPU"),
        (["--backend", "onnx", "--onnx-dir", "EMPTY"], "holds no readable manifest.json"),
    ],
)
def test_bad_backend_requests_are_one_line_exit_2(tiny_model, mask_file, tmp_path, monkeypatch, args, fragment):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    result = generate(tiny_model, mask_file, tmp_path / "out", *args)
    assert result.exit_code == 2, result.stderr
    assert fragment in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "out" / "sample_0000_image.nii.gz").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["onnx", "--component", "decoder"], "--component: 'decoder' is not a component"),
        (["onnx", "--opset", "17"], "--opset: 17 is not supported"),
        (["onnx", "--size", "abc"], "--size"),
        (["trt"], "maisi export trt: TensorRT is not installed; install maisi[trt]"),
    ],
)
def test_bad_export_requests_are_one_line_exit_2(tiny_model, tmp_path, monkeypatch, args, fragment):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    spec, weights = tiny_model
    result = runner.invoke(app, ["export", args[0], "--model", str(spec), "--weights-dir", str(weights),
                                 *(["--out", str(tmp_path / "out")] if args[0] == "onnx" else []), *args[1:]])
    assert result.exit_code == 2, result.stderr
    assert fragment in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not list((tmp_path / "out").glob("*.onnx")) if (tmp_path / "out").exists() else True

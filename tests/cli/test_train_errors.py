"""Bad training input through the CLI: one line on stderr, exit 1 (2 for a malformed datalist), nothing written or
overwritten in --out."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.models import get_model
from tests.helpers import tiny_spec_document, write_mask, write_released_weights
from tests.unit.test_train_controlnet import write_controlnet_data
from tests.unit.test_train_diffusion import write_latents


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Path]:
    spec_path = tmp_path / "tiny-rflow.json"
    spec_path.write_text(json.dumps(tiny_spec_document("rflow")))
    weights = tmp_path / "weights"
    write_released_weights(get_model(str(spec_path)), weights, scale_factor=0.8)
    return spec_path, weights


def fails(*args, code: int = 1) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def diffusion(data: Path, out: Path, spec: Path, *extra) -> list:
    return ["train", "diffusion", "--data", data, "--out", out, "--model", spec, "--device", "cpu", "--epochs", "1",
            *extra]


def test_datalist_with_a_missing_latent(tmp_path, model):
    data = write_latents(tmp_path / "emb", count=2)
    (tmp_path / "emb" / "case1_emb.nii.gz").unlink()
    line = fails(*diffusion(data, tmp_path / "o", model[0]))
    assert "case1_emb.nii.gz" in line and "does not exist" in line
    assert snapshot(tmp_path / "o") == {}


def test_vae_datalist_with_a_missing_image(tmp_path, model):
    data = tmp_path / "list.json"
    data.write_text(json.dumps({"training": [{"image": "nowhere.nii.gz", "fold": 1}]}))
    line = fails("train", "vae", "--data", data, "--out", tmp_path / "o", "--model", model[0], "--device", "cpu",
                 "--patch-size", "16", "--perceptual-weight", "0", "--adversarial-weight", "0")
    assert "nowhere.nii.gz" in line
    assert not (tmp_path / "o" / "train_state.pt").exists() and not (tmp_path / "o" / "autoencoder.pt").exists()


@pytest.mark.parametrize("document", [{"train": [{"image": "a.nii.gz"}]}, {"training": [{"img": "a.nii.gz"}]}])
def test_datalist_with_wrong_keys(tmp_path, model, document):
    data = tmp_path / "list.json"
    data.write_text(json.dumps(document))
    line = fails(*diffusion(data, tmp_path / "o", model[0]), code=2)
    assert "list.json" in line and '"image"' in line
    assert snapshot(tmp_path / "o") == {}


def test_latents_of_two_shapes_cannot_batch(tmp_path, model):
    data = write_latents(tmp_path / "emb", count=1, shape=(8, 8, 8))
    write_latents(tmp_path / "emb2", count=1, shape=(12, 8, 8))
    shutil.copy(tmp_path / "emb2" / "case0_emb.nii.gz", tmp_path / "emb" / "big_emb.nii.gz")
    shutil.copy(tmp_path / "emb2" / "case0_emb.nii.gz.json", tmp_path / "emb" / "big_emb.nii.gz.json")
    document = json.loads(data.read_text())
    document["training"].append({"image": "big_emb.nii.gz", "spacing": [3.0, 2.0, 2.0]})  # mixed spacings too
    data.write_text(json.dumps(document))
    line = fails(*diffusion(data, tmp_path / "o", model[0], "--batch-size", "2"))
    assert "--batch-size" in line and "(4, 8, 8, 8)" in line and "(4, 12, 8, 8)" in line
    assert snapshot(tmp_path / "o") == {}


def test_controlnet_labels_over_255(tmp_path, model):
    spec_path, weights = model
    data = write_controlnet_data(tmp_path / "emb")
    write_mask(tmp_path / "emb" / "case1_label.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), dtype=np.int16,
               labels=np.full((32, 32, 32), 300, dtype=np.int16))
    line = fails("train", "controlnet", "--data", data, "--out", tmp_path / "o", "--model", spec_path,
                 "--weights-dir", weights, "--device", "cpu", "--batch-size", "2")
    assert "case1_label.nii.gz" in line and "0..255" in line
    assert snapshot(tmp_path / "o") == {}


def test_resume_controlnet_from_a_diffusion_train_state(tmp_path, model):
    spec_path, weights = model
    data = write_controlnet_data(tmp_path / "emb")
    controlnet = ["train", "controlnet", "--data", data, "--out", tmp_path / "cn", "--model", spec_path,
                  "--weights-dir", weights, "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(app, [str(a) for a in ["--quiet", *controlnet[:-1], "--epochs", "1"]]).exit_code == 0
    assert CliRunner().invoke(app, ["--quiet", *map(str, diffusion(data, tmp_path / "diff", spec_path))]).exit_code == 0
    shutil.copy(tmp_path / "diff" / "train_state.pt", tmp_path / "cn" / "train_state.pt")
    before = snapshot(tmp_path / "cn")
    line = fails(*controlnet[:-1], "--epochs", "2", "--resume")
    assert "train_state.pt" in line and "trainer 'diffusion'" in line and "'controlnet'" in line
    assert snapshot(tmp_path / "cn") == before


def test_resume_with_a_spec_of_other_channels(tmp_path, model):
    spec_path = model[0]
    data = write_latents(tmp_path / "emb", count=1)
    assert CliRunner().invoke(app, ["--quiet", *map(str, diffusion(data, tmp_path / "o", spec_path))]).exit_code == 0
    wider = copy.deepcopy(tiny_spec_document("rflow"))
    wider["network"]["diffusion_unet_def"]["num_channels"] = [16, 48]
    wider_path = tmp_path / "wider.json"
    wider_path.write_text(json.dumps(wider))  # same model name, another network
    before = snapshot(tmp_path / "o")
    line = fails(*diffusion(data, tmp_path / "o", wider_path), "--epochs", "2", "--resume")
    assert "train_state.pt" in line and "network definition" in line
    assert snapshot(tmp_path / "o") == before

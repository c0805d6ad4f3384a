"""`maisi train controlnet` through the CLI: embed → train → `maisi generate --mask` with the trained ControlNet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.helpers import write_mask


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return result


def write_ct_datalist(folder: Path, count: int = 2) -> Path:
    """32^3 CT-like images (HU from the phantom labels) with their label maps, as a datalist for `data embed`."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for k in range(count):
        label = write_mask(folder / f"case{k}_label.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
        labels = np.asarray(nib.load(label).dataobj)
        hu = np.where(labels == 0, -1000.0, np.where(labels == 200, 0.0, 60.0 + 10 * k)).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / f"case{k}.nii.gz"))
        items.append({"image": f"case{k}.nii.gz", "label": label.name})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": items}))
    return path


def test_embed_train_controlnet_then_generate_with_it(tiny_model, tmp_path):
    spec_path, tiny_weights = tiny_model
    datalist = write_ct_datalist(tmp_path / "ct")
    invoke("--quiet", "data", "embed", str(datalist), "--out", str(tmp_path / "emb"), "--model", str(spec_path),
           "--weights-dir", str(tiny_weights), "--device", "cpu")
    listed = json.loads((tmp_path / "emb" / "embeddings.json").read_text())["training"]
    assert [item["label"] for item in listed] == ["../ct/case0_label.nii.gz", "../ct/case1_label.nii.gz"]

    result = invoke("--json", "train", "controlnet", "--data", str(tmp_path / "emb" / "embeddings.json"), "--out",
                    str(tmp_path / "run"), "--model", str(spec_path), "--weights-dir", str(tiny_weights),
                    "--device", "cpu", "--epochs", "1", "--lr", "1e-4", "--weighted-label", "1",
                    "--weighted-label", "3", "--weighted-loss", "50")
    summary = json.loads(result.stdout)
    assert summary["weighted_labels"] == [1, 3] and summary["weighted_loss"] == 50.0 and summary["samples"] == 2
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [line["epoch"] for line in lines] == [1]
    checkpoint = torch.load(tmp_path / "run" / "controlnet.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"controlnet_state_dict", "epoch", "loss"}

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    shutil.copy(tmp_path / "run" / "controlnet.pt", weights / "models" / "controlnet_3d_rflow-ct.pt")
    mask = write_mask(tmp_path / "mask.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    invoke("--json", "generate", "--model", str(spec_path), "--weights-dir", str(weights), "--mask", str(mask),
           "--out", str(tmp_path / "gen"), "--no-qc")
    image = nib.load(tmp_path / "gen" / "sample_0000_image.nii.gz")
    assert image.shape == (32, 32, 32) and np.isfinite(np.asarray(image.dataobj)).all()
    provenance = json.dumps(json.loads((tmp_path / "gen" / "sample_0000.json").read_text()))
    assert "controlnet_3d_rflow-ct.pt" in provenance


def test_missing_label_is_one_line(tiny_model, tmp_path):
    spec_path, tiny_weights = tiny_model
    latent = tmp_path / "a_emb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 4), np.float32), np.eye(4)), str(latent))
    (tmp_path / "a_emb.nii.gz.json").write_text(json.dumps({"spacing": [2.0, 2.0, 2.0]}))
    data = tmp_path / "list.json"
    data.write_text(json.dumps({"training": [{"image": latent.name, "label": "nowhere.nii.gz"}]}))
    result = CliRunner().invoke(app, ["train", "controlnet", "--data", str(data), "--out", str(tmp_path / "o"),
                                      "--model", str(spec_path), "--weights-dir", str(tiny_weights), "--device",
                                      "cpu"])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "nowhere.nii.gz" in result.stderr
    assert "does not exist" in result.stderr


def test_empty_datalist_is_one_line(tiny_model, tmp_path):
    spec_path, tiny_weights = tiny_model
    data = tmp_path / "empty.json"
    data.write_text(json.dumps({"training": []}))
    result = CliRunner().invoke(app, ["train", "controlnet", "--data", str(data), "--out", str(tmp_path / "o"),
                                      "--model", str(spec_path), "--weights-dir", str(tiny_weights)])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "empty training split" in result.stderr


def test_config_file_sets_weighted_labels_and_lr_default(tiny_model, tmp_path):
    spec_path, tiny_weights = tiny_model
    config = tmp_path / "cn.toml"
    config.write_text("weighted_label = [129]\nweighted_loss = 10.0\nepochs = 3\n")
    result = CliRunner().invoke(app, ["train", "controlnet", "--config", str(config), "--data",
                                      str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "missing.json" in result.stderr  # the config parsed; the data is read next
    from maisi_cli.engine.train.common import build_config
    from maisi_cli.engine.train.controlnet import ControlNetTrainConfig

    settings = build_config(ControlNetTrainConfig, config, {"data": tmp_path / "d.json", "out": tmp_path / "o",
                                                            "epochs": 1})
    assert settings.weighted_label == [129] and settings.weighted_loss == 10.0 and settings.epochs == 1
    assert settings.lr == 1e-5

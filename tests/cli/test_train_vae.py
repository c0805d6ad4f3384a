"""`maisi data phantoms` → `maisi train vae` → `maisi generate` with the trained autoencoder, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.helpers import write_mask


@pytest.fixture
def phantoms(tmp_path: Path) -> Path:
    result = CliRunner().invoke(app, ["--quiet", "data", "phantoms", "--out", str(tmp_path / "ph"), "--num", "2",
                                      "--size", "32x32x32", "--spacing", "4"])
    assert result.exit_code == 0, result.stderr
    return tmp_path / "ph" / "datalist.json"


def test_trained_autoencoder_generates_through_maisi_generate(tiny_model, tmp_path, phantoms, monkeypatch):
    from maisi_cli.engine.train import vae as trainer  # where the trainer looks fuse_group_norms up

    spec_path, tiny_weights = tiny_model
    fused, fuse = [], trainer.fuse_group_norms
    monkeypatch.setattr(trainer, "fuse_group_norms", lambda vae: fused.append(fuse(vae)) or fused[-1])
    config = tmp_path / "vae.toml"
    config.write_text("discriminator_layers = 2\nwarmup = false\n")  # 16³ patches need a 2-layer discriminator
    result = CliRunner().invoke(app, ["--json", "train", "vae", "--data", str(phantoms), "--out", str(tmp_path / "run"),
                                      "--model", str(spec_path), "--device", "cpu", "--epochs", "1", "--patch-size",
                                      "16", "--perceptual-weight", "0", "--config", str(config), "--lr", "1e-3"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["samples"] == 1 and summary["val_samples"] == 1 and summary["adversarial"]
    assert summary["perceptual"] is None and summary["val"]["epoch"] == 1
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [line["epoch"] for line in lines] == [1]
    assert fused and fused[0] > 0  # trained with torch's fused GroupNorm, not MONAI's per-group loop (bench/README.md)
    trained = torch.load(tmp_path / "run" / "autoencoder.pt", map_location="cpu", weights_only=True)
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    assert set(trained) == set(torch.load(weights / "models" / "autoencoder_v1.pt", weights_only=True))
    shutil.copy(tmp_path / "run" / "autoencoder.pt", weights / "models" / "autoencoder_v1.pt")
    mask = write_mask(tmp_path / "mask.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    result = CliRunner().invoke(app, ["--json", "generate", "--model", str(spec_path), "--weights-dir", str(weights),
                                      "--mask", str(mask), "--out", str(tmp_path / "gen"), "--no-qc"])
    assert result.exit_code == 0, result.stderr
    assert nib.load(tmp_path / "gen" / "sample_0000_image.nii.gz").shape == (32, 32, 32)


def test_perceptual_loss_without_local_weights_is_one_line_exit_1(tmp_path, phantoms):
    """Exit 1, not 2: the command line is valid; what is missing is a resource (lpips/torchvision, a download), as
    with a missing weight file. The message names both ways out."""
    result = CliRunner().invoke(app, ["train", "vae", "--data", str(phantoms), "--out", str(tmp_path / "o"),
                                      "--device", "cpu", "--patch-size", "32"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "--perceptual-weights FILE" in lines[0] and "--perceptual-weight 0" in lines[0]
    assert not (tmp_path / "o" / "train_state.pt").exists()


def test_bad_patch_size_and_unknown_config_key_are_usage_errors(tmp_path, phantoms):
    result = CliRunner().invoke(app, ["train", "vae", "--data", str(phantoms), "--out", str(tmp_path / "o"),
                                      "--patch-size", "15"])
    assert result.exit_code == 2 and "--patch-size" in result.stderr
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"kl_weigth": 1e-6}))
    result = CliRunner().invoke(app, ["train", "vae", "--data", str(phantoms), "--out", str(tmp_path / "o"),
                                      "--config", str(config)])
    assert result.exit_code == 2 and "key 'kl_weigth'" in result.stderr and "did you mean 'kl_weight'" in result.stderr


def test_no_latent_sampling_trains_a_deterministic_autoencoder(tiny_model, tmp_path, phantoms):
    """`--no-latent-sampling` decodes the latent mean: the training forward is then deterministic (no sampling
    noise), the run's validation is reproducible, and the saved file is the plain autoencoder."""
    from maisi_cli.engine.networks import build_network, set_tp_splits
    from maisi_cli.engine.train.vae import MeanLatentAutoencoder, VaeTrainConfig, trained_forward
    from maisi_cli.models import get_model

    spec_path, _ = tiny_model
    autoencoder = build_network(get_model(str(spec_path)), "autoencoder").train()
    set_tp_splits(autoencoder, 1)  # as the trainer
    image = torch.rand(1, 1, 16, 16, 16)
    sampled = trained_forward(autoencoder, VaeTrainConfig(data=phantoms, out=tmp_path, latent_sampling=True))
    mean = trained_forward(autoencoder, VaeTrainConfig(data=phantoms, out=tmp_path, latent_sampling=False))
    assert sampled is autoencoder and isinstance(mean, MeanLatentAutoencoder)
    with torch.no_grad():
        assert torch.equal(mean(image)[0], mean(image)[0])
        assert not torch.equal(sampled(image)[0], sampled(image)[0])  # the reference's forward samples

    runs = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["--json", "train", "vae", "--data", str(phantoms), "--out",
                                          str(tmp_path / name), "--model", str(spec_path), "--device", "cpu",
                                          "--epochs", "1", "--patch-size", "32", "--perceptual-weight", "0",
                                          "--adversarial-weight", "0", "--no-latent-sampling", "--lr", "1e-3"])
        assert result.exit_code == 0, result.stderr
        runs.append(json.loads(result.stdout))
    assert runs[0]["val"]["val_recon_l1"] == runs[1]["val"]["val_recon_l1"]
    saved = torch.load(tmp_path / "a" / "autoencoder.pt", map_location="cpu", weights_only=True)
    assert set(saved) == set(autoencoder.state_dict())  # no "autoencoder." prefix from the wrapper

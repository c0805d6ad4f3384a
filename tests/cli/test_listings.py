"""`maisi models` and `maisi profiles list|show`: tables for people, JSON for scripts."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from maisi_cli.cli.app import app

runner = CliRunner()


def invoke_json(*args: str) -> dict:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_models_json_lists_built_in_models_with_weight_status(tiny_model):
    document = invoke_json("models", "--json")
    by_name = {m["name"]: m for m in document["models"]}
    assert {"rflow-ct", "ddpm-ct"} <= set(by_name)
    rflow = by_name["rflow-ct"]
    assert rflow["aliases"] == ["maisi3d-rflow"] and rflow["steps"] == 30 and rflow["scheduler"] == "rflow"
    assert by_name["ddpm-ct"]["steps"] == 1000 and by_name["ddpm-ct"]["scheduler"] == "ddpm"
    files = {w["file"]: w["path"] for w in rflow["weights"]}
    assert "models/diff_unet_3d_rflow-ct.pt" in files and all(p is None for p in files.values())

    # Files present under --weights-dir are found (the tiny model saved the rflow-ct file names, mask generator
    # included).
    _, weights = tiny_model
    found = invoke_json("--json", "models", "--weights-dir", str(weights))
    rflow = {m["name"]: m for m in found["models"]}["rflow-ct"]
    present = {w["component"] for w in rflow["weights"] if w["path"]}
    assert present == {"autoencoder", "diffusion_unet", "controlnet", "mask_generation_autoencoder",
                       "mask_generation_diffusion"}


def test_models_table():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "rflow-ct" in result.stdout and "maisi3d-ddpm" in result.stdout and "0/5 present" in result.stdout


def test_profiles_list_and_show():
    names = {p["name"] for p in invoke_json("profiles", "list", "--json")["profiles"]}
    assert names == {"16g", "24g", "32g", "80g", "cpu"}
    shown = invoke_json("profiles", "show", "24g", "--json")
    rows = {tuple(e["size"]): e for e in shown["decode"]}
    # the reference config_infer_24g_512x512x512.json
    assert rows[(512, 512, 512)]["roi"] == [64, 64, 48] and rows[(512, 512, 512)]["overlap"] == 0.4
    assert rows[(512, 512, 512)]["tp_splits"] == 2
    table = runner.invoke(app, ["profiles", "show", "16g"])
    assert table.exit_code == 0 and "48x48x64" in table.stdout and "memory planner" in table.stdout


def test_unknown_profile_in_show():
    result = runner.invoke(app, ["profiles", "show", "7g"])
    assert result.exit_code == 2 and "unknown profile '7g'" in result.stderr


def test_profile_path_variable_adds_and_overrides(tmp_path: Path, monkeypatch):
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "site.toml").write_text('name = "48g"\ndevice = "cuda"\nmemory_gb = 48\nprecision = "bf16"\n'
                                      "[fallback]\nmax_roi_latent_voxels = 400000\noverlap = 0.4\ntp_splits = 2\n")
    monkeypatch.setenv("MAISI_PROFILE_PATH", str(folder))
    names = {p["name"] for p in invoke_json("profiles", "list", "--json")["profiles"]}
    assert "48g" in names and "24g" in names
    assert invoke_json("profiles", "show", "48g", "--json")["precision"] == "bf16"

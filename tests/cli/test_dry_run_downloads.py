"""Before a released model's files are downloaded: `generate --dry-run` prints the plan and what a run would
download, with sizes (the spec's, the hub's, or unknown offline); a real run names every missing file in one line
with the one command that fetches them; `weights list` shows the sizes to download."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.cli.test_weights import REPO, FakeHub

runner = CliRunner()
IMAGE_FILES = ("models/autoencoder_v1.pt", "models/diff_unet_3d_rflow-ct.pt", "models/controlnet_3d_rflow-ct.pt")
AUTOENCODER_BYTES = 83_886_080  # what the test spec says of its autoencoder file


@pytest.fixture
def released(tiny_model, tmp_path, monkeypatch) -> Path:
    """A spec of the tiny model as a released one (on REPO) whose files are nowhere here: fresh caches, offline."""
    document = json.loads(tiny_model[0].read_text())
    document["hf_repo"] = REPO
    document["weights"] = {k: v for k, v in document["weights"].items()
                           if k in ("autoencoder", "diffusion_unet", "controlnet")}
    document["datasets"] = {}
    document["file_sizes"] = {"models/autoencoder_v1.pt": AUTOENCODER_BYTES}
    spec = tmp_path / "released.json"
    spec.write_text(json.dumps(document))
    for name in ("MAISI_WEIGHTS_DIR", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAISI_HOME", str(tmp_path / "maisi-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return spec


def generate(spec: Path, mask: Path, out: Path, *extra: str):
    return runner.invoke(app, ["generate", "--model", str(spec), "--mask", str(mask), "--out", str(out),
                               "--device", "cpu", "--allow-any-size", *extra])


def test_dry_run_without_weights_lists_the_downloads_with_sizes(released, mask_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    result = runner.invoke(app, ["--json", "generate", "--dry-run", "--model", str(released), "--mask",
                                 str(mask_file), "--out", str(out), "--device", "cpu", "--allow-any-size"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["weights"] == {}
    assert [(d["file"], d["size"], d["size_source"]) for d in plan["downloads"]] == [
        (IMAGE_FILES[0], AUTOENCODER_BYTES, "spec"), (IMAGE_FILES[1], None, "offline"),
        (IMAGE_FILES[2], None, "offline")]
    assert plan["download_command"] == f"maisi weights download {released}"  # every file of the model
    assert plan["samples"] == [{"index": 0, "seed": plan["samples"][0]["seed"], "status": "to write",
                                "files": ["sample_0000_image.nii.gz", "sample_0000_label.nii.gz", "sample_0000.json"]}]
    assert not out.exists()

    monkeypatch.setenv("COLUMNS", "200")
    table = generate(released, mask_file, out, "--dry-run").stdout
    assert "models/autoencoder_v1.pt, 83.9 MB" in table
    assert "models/diff_unet_3d_rflow-ct.pt, size unknown (offline)" in table
    assert f"3 file(s), 83.9 MB + 2 file(s) of unknown size: maisi weights download {released}" in table


def test_a_run_without_weights_names_every_missing_file_in_one_line(released, mask_file, tmp_path):
    result = generate(released, mask_file, tmp_path / "out")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("maisi: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0] == (f"Error: weights: missing {', '.join(IMAGE_FILES)} (tiny-rflow; not in maisi's store or the "
                        f"Hugging Face cache for {REPO}) — run `maisi weights download {released}`")
    assert not (tmp_path / "out").exists()


def test_dry_run_of_a_database_mask_before_its_files_are_here(released, tmp_path):
    """The candidate database is a download too: the plan says so instead of refusing, and the command fetches
    just what the run needs (not the model's other files)."""
    document = json.loads(released.read_text())
    document["datasets"] = {"mask_database": "datasets/candidate_masks.json", "mask_archive": "datasets/masks.zip",
                            "anatomy_size_conditions": "datasets/all_anatomy_size_conditions.json"}
    released.write_text(json.dumps(document))
    result = runner.invoke(app, ["--json", "generate", "--dry-run", "--model", str(released), "--out",
                                 str(tmp_path / "out"), "--device", "cpu", "--allow-any-size", "--size", "64x64x64",
                                 "--spacing", "2x2x2"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["mask"] == {"type": "database", "database": "datasets/candidate_masks.json",
                            "not downloaded": "datasets/candidate_masks.json, datasets/masks.zip"}
    assert [d["file"] for d in plan["downloads"]] == [*IMAGE_FILES, "datasets/candidate_masks.json",
                                                      "datasets/masks.zip"]
    assert plan["download_command"] == (
        f"maisi weights download {released} --component autoencoder --component diffusion_unet --component "
        "controlnet --component mask_database --component mask_archive")


def test_weights_list_shows_the_sizes_to_download(released, monkeypatch):
    listed = json.loads(runner.invoke(app, ["--json", "weights", "list", str(released)]).stdout)
    files = listed["models"][0]["files"]
    assert [(f["file"], f["present"], f["download_size"], f["size_source"]) for f in files] == [
        (IMAGE_FILES[0], False, AUTOENCODER_BYTES, "spec"), (IMAGE_FILES[1], False, None, "offline"),
        (IMAGE_FILES[2], False, None, "offline")]
    monkeypatch.setenv("COLUMNS", "200")
    table = runner.invoke(app, ["weights", "list", str(released)])
    assert table.exit_code == 0, table.output
    assert "83.9 MB to download" in table.stdout and "size unknown (offline) to download" in table.stdout
    assert "3 file(s) missing: 83.9 MB + 2 of unknown size to download" in table.stdout


def test_sizes_come_from_the_hub_when_online(released, mask_file, tmp_path, monkeypatch):
    """Online, a size the spec does not give is the hub's (its metadata: one HEAD request per file)."""
    files = {name: bytes(1000 + 7 * number) for number, name in enumerate(IMAGE_FILES)}
    hub = FakeHub(files)
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        result = runner.invoke(app, ["--json", "generate", "--dry-run", "--model", str(released), "--mask",
                                     str(mask_file), "--out", str(tmp_path / "out"), "--device", "cpu",
                                     "--allow-any-size"])
        assert result.exit_code == 0, result.output
        downloads = json.loads(result.stdout)["plan"]["downloads"]
        assert [(d["size"], d["size_source"]) for d in downloads] == [
            (AUTOENCODER_BYTES, "spec"), (1007, "hub"), (1014, "hub")]
        assert all(method == "HEAD" for method, *_ in hub.requests)  # nothing downloaded
    finally:
        hub.close()


def test_manifest_dry_run_lists_the_downloads_once(released, mask_file, tmp_path, monkeypatch):
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps([{"mask": str(mask_file)}, {"mask": str(mask_file), "name": "again"}]))
    args = ["generate", "--model", str(released), "--manifest", str(manifest), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--allow-any-size", "--dry-run"]
    result = runner.invoke(app, ["--json", *args])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [d["file"] for d in document["downloads"]] == list(IMAGE_FILES)
    assert document["download_command"] == f"maisi weights download {released}"
    monkeypatch.setenv("COLUMNS", "200")
    table = runner.invoke(app, args).stdout
    assert "to download: autoencoder" in table and f"maisi weights download {released}" in table
    refused = runner.invoke(app, args[:-1])
    assert refused.exit_code == 1 and f"missing {', '.join(IMAGE_FILES)}" in refused.stderr

"""Issue 20 items 1, 2 and 5: files on shared storage are never written through a link; a folder holds one run; a
sample whose files do not match its sidecar is made again; a full disk is one line that says what is complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.cli.test_errors import assert_one_line_error
from tests.helpers import full_disk_when_writing

runner = CliRunner()


def generate(tiny_model, mask: Path, out: Path, *args: str):
    spec, weights = tiny_model
    return runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(weights),
                               "--mask", str(mask), "--out", str(out), "--steps", "2", "--no-qc", *args])


def sample_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("sample_*.nii.gz"))}


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Someone else's file that a link in the output folder points at: it must come through untouched."""
    path = tmp_path / "someone-elses-file.txt"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize("name", [".sample_0000.lock", "sample_0000_image.nii.gz", "sample_0000.json"])
def test_a_link_in_the_output_folder_is_refused_and_nothing_is_written_through_it(tiny_model, mask_file, tmp_path,
                                                                                    victim, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    result = generate(tiny_model, mask_file, out)
    assert_one_line_error(result, 1, name, "symbolic link")
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written


def test_a_folder_in_place_of_an_output_file_is_one_line(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    (out / "sample_0000_label.nii.gz").mkdir(parents=True)
    result = generate(tiny_model, mask_file, out)
    assert_one_line_error(result, 1, "sample_0000_label.nii.gz is a directory", "remove it")
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000_label.nii.gz"]


def test_a_hard_linked_lock_file_is_refused_and_not_truncated(tiny_model, mask_file, tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / ".sample_0000.lock")
    result = generate(tiny_model, mask_file, out)
    assert_one_line_error(result, 1, ".sample_0000.lock", "hard link")
    assert victim.read_text() == "precious\n"


def test_a_rerun_with_other_settings_names_the_setting_and_the_fixes(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    assert generate(tiny_model, mask_file, out).exit_code == 0
    first = sample_files(out)
    record = json.loads((out / "maisi-run.json").read_text())["settings"]
    assert record["--steps"] == 2 and record["--seed"] == 0 and "weights sha256" in record

    for extra, named in ((["--steps", "3"], "--steps 2, and this run has --steps 3"),
                         (["--seed", "7"], "--seed 0, and this run has --seed 7"),
                         (["--spacing", "3"], "--spacing 2x2x2, and this run has --spacing 3x3x3"),
                         (["--steps", "3", "--dry-run"], "--steps 2")):
        result = generate(tiny_model, mask_file, out, *extra, "--allow-any-size")
        assert_one_line_error(result, 2, "--out", named, "another --out", "--overwrite")
        assert sample_files(out) == first

    # --overwrite replaces the run: the record and the sample follow the new settings
    assert generate(tiny_model, mask_file, out, "--steps", "3", "--overwrite").exit_code == 0
    assert json.loads((out / "maisi-run.json").read_text())["settings"]["--steps"] == 3
    assert sample_files(out) != first
    result = runner.invoke(app, ["--json", "generate", "--model", str(tiny_model[0]), "--weights-dir",
                                 str(tiny_model[1]), "--mask", str(mask_file), "--out", str(out), "--steps", "3",
                                 "--no-qc"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == [0]


def test_other_weights_for_a_new_sample_of_the_run_are_refused(tiny_model, mask_file, tmp_path):
    import shutil

    import torch

    spec, weights = tiny_model
    out = tmp_path / "out"
    assert generate(tiny_model, mask_file, out).exit_code == 0
    changed = tmp_path / "changed-weights"
    shutil.copytree(weights, changed)
    target = changed / "models" / "controlnet_3d_rflow-ct.pt"
    checkpoint = torch.load(target, weights_only=True)
    checkpoint["controlnet_state_dict"]["conv_in.conv.bias"] += 0.01
    torch.save(checkpoint, target)
    result = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(changed),
                                 "--mask", str(mask_file), "--out", str(out), "--steps", "2", "--no-qc", "-n", "2"])
    assert_one_line_error(result, 2, "weights sha256", "another --out", "--overwrite")
    assert sorted(sample_files(out)) == ["sample_0000_image.nii.gz", "sample_0000_label.nii.gz"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar"])
def test_a_sample_whose_files_do_not_match_its_sidecar_is_made_again(tiny_model, mask_file, tmp_path, damage):
    out = tmp_path / "out"
    assert generate(tiny_model, mask_file, out).exit_code == 0
    first = sample_files(out)
    image = out / "sample_0000_image.nii.gz"
    if damage == "truncate":
        image.write_bytes(first[image.name][: len(first[image.name]) // 2])
    elif damage == "flip":
        data = bytearray(first[image.name])
        data[-10] ^= 0xFF
        image.write_bytes(bytes(data))
    else:
        (out / "sample_0000.json").write_text("{not json")
    spec, weights = tiny_model
    result = runner.invoke(app, ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                 "--mask", str(mask_file), "--out", str(out), "--steps", "2", "--no-qc"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] == [0] and report["skipped"] == []
    assert "sample 0:" in result.stderr and "generated again" in result.stderr
    assert sample_files(out) == first  # made again, byte for byte


def test_a_full_disk_is_one_line_that_says_what_is_complete(tiny_model, mask_file, tmp_path, monkeypatch):
    full_disk_when_writing(monkeypatch, "sample_0001_image.nii.gz")
    out = tmp_path / "out"
    result = generate(tiny_model, mask_file, out, "-n", "2")
    assert_one_line_error(result, 1, f"no space left writing {out / 'sample_0001_image.nii.gz'}",
                          "1 sample(s) complete", "free space and re-run")
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".partial") or n.endswith(".lock")], names
    assert "sample_0001_image.nii.gz" not in names and "sample_0000.json" in names


def test_write_atomic_refuses_a_link_and_leaves_no_temporary_file(tmp_path, victim):
    from maisi_cli.errors import OutputError
    from maisi_cli.io.files import write_atomic

    link = tmp_path / "out.json"
    link.symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        write_atomic(link, b"new")
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "someone-elses-file.txt"]
    plain = tmp_path / "plain.json"
    digest = write_atomic(plain, b"new")
    import hashlib

    assert plain.read_bytes() == b"new" and digest == hashlib.sha256(b"new").hexdigest()

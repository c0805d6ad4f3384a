"""Bad input: one line naming the field and the fix, the right exit code, and nothing left in --out."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.helpers import write_mask

runner = CliRunner()


def run_generate(out: Path, *args: str):
    # --quiet: errors must still print, and progress lines do not crowd the one error line
    return runner.invoke(app, ["--quiet", "generate", "--out", str(out), *args])


def assert_one_line_error(result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--size", "100x100x100"], ["--size", "multiple of 32"]),
        (["--size", "256x256x96"], ["--size", "z must be one of", "--allow-any-size"]),
        (["--size", "512x256x128"], ["--size", "x and y must be equal"]),
        (["--size", "256x256x256", "--spacing", "0.2"], ["--spacing", "within [0.5, 3]"]),
        (["--size", "256x256x256", "--spacing", "0.8"], ["field of view"]),
        (["--size", "big"], ["--size", "'big' is not a size"]),
        (["--spacing", "1.0x-1x1"], ["--spacing"]),
        (["--model", "no-such-model"], ["--model", "unknown model 'no-such-model'", "rflow-ct"]),
        (["--profile", "48g"], ["--profile", "unknown profile '48g'", "24g"]),
        (["--shard", "3/2"], ["--shard", "0 <= I < N"]),
        (["--device", "cuda:7"], ["--device", "not available"]),
        (["--precision", "fp8"], ["--precision"]),
        (["--label-mode", "some"], ["--label-mode"]),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_one_line_error(run_generate(out, *args), 2, *fragments)
    assert_nothing_written(out)


def test_fp16_on_cpu_is_refused(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    result = run_generate(out, "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask_file),
                          "--precision", "fp16", "--device", "cpu")
    assert_one_line_error(result, 2, "--precision", "fp16 needs a GPU")


def test_missing_weight_file_names_it_and_the_fetch_command(tmp_path, mask_file):
    out = tmp_path / "out"
    result = run_generate(out, "--size", "256x256x256", "--spacing", "1.5", "--mask", str(mask_file),
                          "--weights-dir", str(tmp_path / "empty"))
    assert_one_line_error(result, 1, "models/autoencoder_v1.pt", str(tmp_path / "empty"),
                          "maisi weights download rflow-ct --component autoencoder")
    assert_nothing_written(out)


def test_missing_weights_in_hugging_face_cache(tmp_path, mask_file):
    out = tmp_path / "out"
    result = run_generate(out, "--size", "256x256x256", "--spacing", "1.5", "--mask", str(mask_file))
    assert_one_line_error(result, 1, "models/autoencoder_v1.pt", "Hugging Face cache", "nvidia/NV-Generate-CT",
                          "maisi weights download rflow-ct --component autoencoder")


def test_weights_found_in_hugging_face_cache(tiny_model, mask_file, tmp_path, monkeypatch):
    """Without --weights-dir, files are read in place from the Hugging Face cache layout."""
    spec, weights = tiny_model
    snapshot = tmp_path / "hf-home" / "hub" / "models--example--tiny-maisi" / "snapshots" / ("a" * 40)
    shutil.copytree(weights, snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    out = tmp_path / "out"
    result = runner.invoke(app, ["--json", "generate", "--model", str(spec), "--mask", str(mask_file),
                                 "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert str(snapshot) in result.stdout


def copy_weights(weights: Path, tmp_path: Path) -> Path:
    copied = tmp_path / "weights"
    shutil.copytree(weights, copied)
    return copied


def test_checkpoint_with_wrong_keys_names_file_and_keys(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    weights = copy_weights(weights, tmp_path)
    target = weights / "models" / "controlnet_3d_rflow-ct.pt"
    checkpoint = torch.load(target, weights_only=True)
    state = checkpoint["controlnet_state_dict"]
    state["renamed.weight"] = state.pop("conv_in.conv.weight")
    torch.save(checkpoint, target)
    out = tmp_path / "out"
    result = run_generate(out, "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask_file))
    assert_one_line_error(result, 1, str(target), "tiny-rflow controlnet", "conv_in.conv.weight", "renamed.weight")
    assert_nothing_written(out)


def test_checkpoint_in_wrong_layout(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    weights = copy_weights(weights, tmp_path)
    target = weights / "models" / "diff_unet_3d_rflow-ct.pt"
    torch.save(torch.load(target, weights_only=True)["unet_state_dict"], target)  # bare state dict
    result = run_generate(tmp_path / "out", "--model", str(spec), "--weights-dir", str(weights),
                          "--mask", str(mask_file))
    assert_one_line_error(result, 1, str(target), "'unet_state_dict'")


class Pickled:
    """Not a tensor: weights_only loading must refuse it."""


def test_checkpoint_with_pickled_object_is_refused(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    weights = copy_weights(weights, tmp_path)
    target = weights / "models" / "autoencoder_v1.pt"
    state = torch.load(target, weights_only=True)
    state["extra"] = Pickled()
    torch.save(state, target)
    out = tmp_path / "out"
    result = run_generate(out, "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask_file))
    assert_one_line_error(result, 1, str(target), "weights_only")
    assert_nothing_written(out)


def test_truncated_checkpoint(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    weights = copy_weights(weights, tmp_path)
    target = weights / "models" / "autoencoder_v1.pt"
    target.write_bytes(target.read_bytes()[:1000])
    result = run_generate(tmp_path / "out", "--model", str(spec), "--weights-dir", str(weights),
                          "--mask", str(mask_file))
    assert_one_line_error(result, 1, str(target), "not a readable PyTorch checkpoint")


def test_mask_that_is_not_nifti(tiny_model, tmp_path):
    spec, weights = tiny_model
    mask = tmp_path / "mask.nii.gz"
    mask.write_text("not an image")
    out = tmp_path / "out"
    result = run_generate(out, "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask))
    assert_one_line_error(result, 1, "--mask", "not a readable NIfTI")
    assert_nothing_written(out)


def test_missing_mask_file(tiny_model, tmp_path):
    spec, weights = tiny_model
    result = run_generate(tmp_path / "out", "--model", str(spec), "--weights-dir", str(weights),
                          "--mask", str(tmp_path / "nope.nii.gz"))
    assert_one_line_error(result, 1, "--mask", "does not exist")


def test_mask_with_labels_over_255(tiny_model, tmp_path):
    spec, weights = tiny_model
    labels = np.zeros((32, 32, 32), dtype=np.uint16)
    labels[4:28, 4:28, 4:28] = 200
    labels[10:12, 10:12, 10:12] = 300
    mask = write_mask(tmp_path / "wide.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), dtype=np.uint16, labels=labels)
    out = tmp_path / "out"
    result = run_generate(out, "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask))
    assert_one_line_error(result, 1, "--mask", "0..255")
    assert_nothing_written(out)


def test_mask_with_fractional_labels(tiny_model, tmp_path):
    spec, weights = tiny_model
    labels = np.full((32, 32, 32), 200.0, dtype=np.float32)
    labels[0, 0, 0] = 1.5
    mask = write_mask(tmp_path / "frac.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), dtype=np.float32, labels=labels)
    result = run_generate(tmp_path / "out", "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask))
    assert_one_line_error(result, 1, "--mask", "fractional")


def test_anatomy_missing_from_mask(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    result = run_generate(out, "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask_file),
                          "--anatomy", "pancreas")
    assert_one_line_error(result, 1, "--anatomy", "'pancreas' (label 4)")
    assert_nothing_written(out)


def test_unknown_anatomy_name_suggests(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    result = run_generate(tmp_path / "out", "--model", str(spec), "--weights-dir", str(weights),
                          "--mask", str(mask_file), "--anatomy", "kidney")
    assert_one_line_error(result, 2, "--anatomy", "'right kidney'")


def test_requested_label_mode_needs_anatomy(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    result = run_generate(tmp_path / "out", "--model", str(spec), "--weights-dir", str(weights),
                          "--mask", str(mask_file), "--label-mode", "requested")
    assert_one_line_error(result, 2, "--label-mode requested", "--anatomy")


def test_no_mask_and_no_database(tiny_model, tmp_path):
    """A model that ships no candidate-mask database needs --mask (or --mask-database)."""
    import json

    spec, weights = tiny_model
    document = json.loads(spec.read_text())
    document.pop("datasets")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(document))
    result = run_generate(tmp_path / "out", "--model", str(bare), "--weights-dir", str(weights))
    assert_one_line_error(result, 2, "--mask", "ships no candidate-mask database")


def test_unwritable_output_folder(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_generate(blocker / "out", "--model", str(spec), "--weights-dir", str(weights),
                          "--mask", str(mask_file))
    assert_one_line_error(result, 1, "--out", "cannot write")


def test_model_spec_with_foreign_target_is_refused(tiny_model, mask_file, tmp_path):
    """A model spec is data: a `_target_` outside MONAI's MAISI classes is never imported."""
    import json

    spec, weights = tiny_model
    document = json.loads(spec.read_text())
    document["network"]["controlnet_def"]["_target_"] = "os.system"
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(document))
    result = run_generate(tmp_path / "out", "--model", str(hostile), "--weights-dir", str(weights),
                          "--mask", str(mask_file))
    assert_one_line_error(result, 2, "'os.system'")


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "generate", "--out", str(tmp_path), "--size", "big"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "Error: --size" in result.stderr

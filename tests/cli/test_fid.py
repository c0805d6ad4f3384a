"""`maisi fid`: table and JSON output, one-line errors, and two gloo processes under torchrun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.fid import RadImageNetResNet50
from tests.unit.test_fid import fresh_plugins, write_volumes  # noqa: F401 (fresh_plugins: a fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def fid_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(real folder, synth folder, tiny-width extractor file)."""
    root = tmp_path_factory.mktemp("fid-cli")
    torch.manual_seed(0)
    extractor = root / "tiny.pth"
    torch.save(RadImageNetResNet50(width=8).state_dict(), extractor)
    return write_volumes(root / "real", 3, 1), write_volumes(root / "synth", 2, 2), extractor


def fid_args(real: Path, synth: Path, extractor: Path, *extra: str) -> list[str]:
    return ["fid", str(real), str(synth), "--extractor", str(extractor), "--target-shape", "16x16x16",
            "--device", "cpu", *extra]


def test_json_document(fid_inputs, tmp_path):
    real, synth, extractor = fid_inputs
    result = runner.invoke(app, ["--quiet", *fid_args(real, synth, extractor, "--json", "--planes", "xy,zx",
                                                      "--cache", str(tmp_path / "cache"))])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document["fid"]) == {"xy", "zx", "average"}
    assert document["fid"]["average"] == pytest.approx((document["fid"]["xy"] + document["fid"]["zx"]) / 2)
    assert document["real_volumes"] == 3 and document["synth_volumes"] == 2 and document["computed"] == 10
    again = json.loads(runner.invoke(app, ["--quiet", *fid_args(real, synth, extractor, "--json", "--planes",
                                                                "xy,zx", "--cache", str(tmp_path / "cache"))]).stdout)
    assert again["cached"] == 10 and again["computed"] == 0 and again["fid"] == document["fid"]


def test_table(fid_inputs):
    real, synth, extractor = fid_inputs
    result = runner.invoke(app, ["--quiet", *fid_args(real, synth, extractor, "--center-slices-ratio", "0.5")])
    assert result.exit_code == 0, result.output
    for word in ("XY", "YZ", "ZX", "average", "3 real vs 2 synthetic"):
        assert word in result.stdout


def test_same_set_with_fewer_slices_than_features_is_zero_with_one_warning(fid_inputs):
    """3 volumes of 16 slices a plane against 256 features: it gave a negative FID and said nothing."""
    real, _, extractor = fid_inputs
    result = runner.invoke(app, ["--json", *fid_args(real, real, extractor)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["features"] == 256 and document["real_slices"] == {"xy": 48, "yz": 48, "zx": 48}
    assert all(abs(value) < 1e-6 for value in document["fid"].values()), document["fid"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: FID: fewer slices than the 256 features in plane XY (48 real, 48 synthetic), "
                        "YZ (48 real, 48 synthetic), ZX (48 real, 48 synthetic); the covariances are rank-deficient "
                        "and the FID is unreliable: use more volumes, or keep more slices of each "
                        "(--center-slices-ratio)"], result.stderr


def test_other_sets_with_fewer_slices_than_features_are_not_negative(fid_inputs):
    real, synth, extractor = fid_inputs
    result = runner.invoke(app, ["--json", *fid_args(real, synth, extractor, "--planes", "xy")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fid"]["xy"] > 0
    assert result.stderr.count("Warning: FID: fewer slices than the 256 features in plane XY (48 real, "
                               "32 synthetic)") == 1, result.stderr


@pytest.mark.parametrize("case, expected", [
    ("empty", "holds no NIfTI"),
    ("not-nifti", "is not a folder, a datalist"),
    ("one", "at least 2"),
    ("no-extractor", "RadImageNet-ResNet50_notop.pth"),
    ("bad-planes", "--planes"),
])
def test_errors_are_one_line(fid_inputs, tmp_path, case, expected):
    real, synth, extractor = fid_inputs
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args = fid_args(tmp_path / "empty", synth, extractor)
    elif case == "not-nifti":
        (tmp_path / "scan.png").write_bytes(b"png")
        args = fid_args(real, tmp_path / "scan.png", extractor)
    elif case == "one":
        args = fid_args(real, write_volumes(tmp_path / "one", 1, 3), extractor)
    elif case == "no-extractor":
        args = ["fid", str(real), str(synth)]
    else:
        args = fid_args(real, synth, extractor, "--planes", "xy,ab")
    result = runner.invoke(app, args)
    assert result.exit_code in (1, 2), result.output
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_torchrun_two_processes_match_one(fid_inputs):
    from tests.helpers import run_torchrun

    real, synth, extractor = fid_inputs
    args = fid_args(real, synth, extractor, "--planes", "xy")
    done = run_torchrun(["--json", "--quiet", *args], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads(done.stdout)  # one document: only rank 0 prints
    single = json.loads(runner.invoke(app, ["--json", "--quiet", *args]).stdout)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["fid"]["xy"] == pytest.approx(single["fid"]["xy"], rel=1e-6)
    assert ddp["real_slices"] == single["real_slices"]


def test_datalist_and_file_list_inputs_match_folders(fid_inputs, tmp_path):
    real, synth, extractor = fid_inputs
    datalist = tmp_path / "lists" / "real.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"training": [{"image": str(p)} for p in sorted(real.glob("*.nii.gz"))]}))
    listing = tmp_path / "synth.txt"
    listing.write_text("\n".join(str(p) for p in sorted(synth.glob("*.nii.gz"))) + "\n")
    by_lists = runner.invoke(app, ["--json", "--quiet", *fid_args(datalist, listing, extractor, "--planes", "xy")])
    assert by_lists.exit_code == 0, by_lists.output
    by_folders = runner.invoke(app, ["--json", "--quiet", *fid_args(real, synth, extractor, "--planes", "xy")])
    first, second = json.loads(by_lists.stdout), json.loads(by_folders.stdout)
    assert first["real_volumes"] == 3 and first["synth_volumes"] == 2
    assert first["fid"] == second["fid"]


def test_relative_file_list_and_bad_datalist(fid_inputs, tmp_path):
    real, synth, extractor = fid_inputs
    listing = real.parent / "real-list.txt"
    listing.write_text("real/v0.nii.gz\nreal/v1.nii.gz\n")
    done = runner.invoke(app, ["--json", "--quiet", *fid_args(listing, synth, extractor, "--planes", "xy")])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["real_volumes"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"training": [{"label": "x.nii.gz"}]}')
    result = runner.invoke(app, fid_args(real, bad, extractor))
    assert result.exit_code == 2 and "SYNTH:" in result.stderr and "item 0 has no image path" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.usefixtures("fresh_plugins")
def test_plugin_extractor_by_name(fid_inputs, monkeypatch):
    from tests.unit.test_fid import install_plugins

    real, synth, extractor = fid_inputs
    install_plugins(monkeypatch, toy="tests.unit.test_fid:toy_factory", broken="maisi_no_such_plugin_module:make")
    args = ["fid", str(real), str(synth), "--target-shape", "16x16x16", "--device", "cpu", "--planes", "xy"]
    toy = runner.invoke(app, ["--json", "--quiet", *args, "--extractor-name", "toy"])
    assert toy.exit_code == 0, toy.output
    assert json.loads(toy.stdout)["features"] == 4 and json.loads(toy.stdout)["extractor"] == "toy"
    builtin = runner.invoke(app, ["--json", "--quiet", *args, "--extractor", str(extractor)])
    assert builtin.exit_code == 0, builtin.output  # an installed broken plugin does not matter to the built-in
    broken = runner.invoke(app, [*args, "--extractor-name", "broken"])
    assert broken.exit_code == 1 and "the plugin 'broken'" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1, broken.stderr
    unknown = runner.invoke(app, [*args, "--extractor-name", "nope"])
    assert unknown.exit_code == 2 and "installed: radimagenet-resnet50, broken, toy" in unknown.stderr


def test_nproc_two_processes_match_one(fid_inputs, tmp_path):
    real, synth, extractor = fid_inputs
    args = fid_args(real, synth, extractor, "--planes", "xy,yz")
    spawned = runner.invoke(app, ["--json", "--quiet", *args, "--nproc", "2", "--cache", str(tmp_path / "cache")])
    assert spawned.exit_code == 0, spawned.output
    two = json.loads(spawned.stdout)
    one = json.loads(runner.invoke(app, ["--json", "--quiet", *args]).stdout)
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["computed"] == 10
    for plane in ("xy", "yz", "average"):
        assert two["fid"][plane] == pytest.approx(one["fid"][plane], rel=1e-6)
    assert two["real_slices"] == one["real_slices"] and two["synth_slices"] == one["synth_slices"]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 10  # both processes wrote their files' features


def test_nproc_error_on_one_rank_is_one_line(fid_inputs, tmp_path):
    import shutil

    real, synth, extractor = fid_inputs
    broken = tmp_path / "synth"
    shutil.copytree(synth, broken)
    (broken / "v1.nii.gz").write_bytes(b"not a nifti")  # rank 1 reads v1
    from tests.cli.test_subprocess import run

    result = run(*fid_args(real, broken, extractor, "--planes", "xy", "--nproc", "2"))  # a real process: all stderr
    assert result.returncode == 1, result.stderr
    # one error line (no traceback, not one per rank); progress log lines, a heartbeat included, may come before it
    errors = [line for line in result.stderr.strip().splitlines() if not re.match(r"\[\s*[\d.]+s\] ", line)]
    assert "v1.nii.gz" in result.stderr and len(errors) == 1, result.stderr
    under_torchrun = runner.invoke(app, fid_args(real, synth, extractor, "--nproc", "2"), env={"WORLD_SIZE": "2"})
    assert under_torchrun.exit_code == 2 and "--nproc: already running under torchrun" in under_torchrun.stderr


def test_weights_download_radimagenet_then_fid_without_extractor(fid_inputs, tmp_path, monkeypatch):
    """`maisi weights download radimagenet-resnet50` against a loopback hub that answers like huggingface.co for
    MONAI/checkpoints (serving a tiny-width checkpoint in the published key layout), then `maisi fid` with no
    --extractor finds it in the Hugging Face cache."""
    import os

    from tests.cli import test_weights

    real, synth, extractor = fid_inputs
    monkeypatch.setattr(test_weights, "REPO", "MONAI/checkpoints")
    server = test_weights.FakeHub({"RadImageNet-ResNet50_notop.pth": extractor.read_bytes()})
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MAISI_"))}
        env.update({"HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
                    "MAISI_HOME": str(tmp_path / "maisi-home"), "HF_HUB_DISABLE_XET": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"})
        done = test_weights.maisi(env, "--json", "weights", "download", "radimagenet-resnet50")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["repo"] == "MONAI/checkpoints" and report["files"][0]["status"] == "downloaded"
        assert report["files"][0]["lock"] == "recorded" and "Licence of the radimagenet-resnet50" in done.stderr
        bad = test_weights.maisi(env, "weights", "download", "radimagenet-resnet50", "--component", "x")
        test_weights.one_error_line(bad, 2, "--component: radimagenet-resnet50 is a single file")
    finally:
        server.close()
    lock = json.loads((tmp_path / "maisi-home" / "locks" / "MONAI--checkpoints@main.json").read_text())
    assert "RadImageNet-ResNet50_notop.pth" in lock["files"]
    # the test process has the same HF_HOME and MAISI_HOME (tests/conftest.py), and is offline
    result = runner.invoke(app, ["--json", "--quiet", "fid", str(real), str(synth), "--target-shape", "16x16x16",
                                 "--device", "cpu", "--planes", "xy"])
    assert result.exit_code == 0, result.output
    assert "models--MONAI--checkpoints" in json.loads(result.stdout)["extractor"]
    with_file = runner.invoke(app, ["--json", "--quiet", *fid_args(real, synth, extractor, "--planes", "xy")])
    assert json.loads(with_file.stdout)["fid"] == json.loads(result.stdout)["fid"]

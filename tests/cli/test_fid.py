"""`maisi fid`: table and JSON output, one-line errors, and two gloo processes under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.fid import RadImageNetResNet50
from tests.unit.test_fid import write_volumes

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

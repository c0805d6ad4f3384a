"""`maisi generate --manifest cases.json` (issue 24): many masks in one run equal separate runs of each case byte for
byte, with the networks loaded once; shards split the cases' samples; every case is checked before any network
loads, and a bad one is named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.cli.test_errors import assert_nothing_written, assert_one_line_error
from tests.helpers import phantom_labels, write_mask

runner = CliRunner()
PAIR_FILES = ("sample_0000_image.nii.gz", "sample_0000_label.nii.gz", "sample_0001_image.nii.gz",
              "sample_0001_label.nii.gz")


def run(tiny_model, *args: str, json_output: bool = True):
    spec, weights = tiny_model
    return runner.invoke(app, ["--json"] * json_output + ["generate", "--model", str(spec), "--weights-dir",
                                                          str(weights), "--no-qc", "--steps", "2", *args])


def report_of(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def write_cases(root: Path) -> Path:
    """A manifest of two cases: a 32^3 mask on its own grid, and a 40^3 mask at 1.6 mm given a grid and a seed."""
    masks = root / "masks"
    masks.mkdir()
    write_mask(masks / "alpha.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    flipped = phantom_labels((40, 40, 40))[::-1].copy()
    write_mask(masks / "beta.nii.gz", (40, 40, 40), (1.6, 1.6, 1.6), labels=flipped)
    manifest = root / "cases.json"
    manifest.write_text(json.dumps([
        {"mask": "masks/alpha.nii.gz"},
        {"mask": "masks/beta.nii.gz", "size": [32, 32, 32], "spacing": "2x2x2", "seed": 5, "name": "b"},
    ]))
    return manifest


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    return write_cases(tmp_path)


@pytest.fixture(scope="module")
def whole_run(tiny_model, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(manifest, output folder, JSON report) of one manifest run of both cases, -n 2, seed 3."""
    root = tmp_path_factory.mktemp("manifest")
    manifest = write_cases(root)
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse fixture's MAISI_HOME is per test
        patch.setenv("MAISI_HOME", str(root / "maisi-home"))
        report = report_of(run(tiny_model, "--manifest", str(manifest), "--out", str(root / "out"), "-n", "2",
                               "--seed", "3"))
    return manifest, root / "out", report


def test_a_manifest_run_equals_separate_runs_byte_for_byte_and_loads_the_networks_once(tiny_model, whole_run,
                                                                                         tmp_path):
    cases, out, report = whole_run
    assert report["network_loads"] == 1
    assert [(c["name"], c["written"]) for c in report["cases"]] == [("alpha", [0, 1]), ("b", [0, 1])]
    masks = cases.parent / "masks"
    separate = {
        "alpha": run(tiny_model, "--mask", str(masks / "alpha.nii.gz"), "--out", str(tmp_path / "alone" / "alpha"),
                     "-n", "2", "--seed", "3"),
        "b": run(tiny_model, "--mask", str(masks / "beta.nii.gz"), "--size", "32x32x32", "--spacing", "2",
                 "--seed", "5", "--out", str(tmp_path / "alone" / "b"), "-n", "2"),
    }
    for name, result in separate.items():
        report_of(result)
        for file in (*PAIR_FILES, "maisi-run.json"):
            assert (out / name / file).read_bytes() == (tmp_path / "alone" / name / file).read_bytes(), (name, file)
    # the two cases are different pairs: their seeds and masks reach the outputs
    assert (out / "alpha" / PAIR_FILES[0]).read_bytes() != (out / "b" / PAIR_FILES[0]).read_bytes()

    again = report_of(run(tiny_model, "--manifest", str(cases), "--out", str(out), "-n", "2", "--seed", "3"))
    assert again["network_loads"] == 0  # everything complete: nothing loaded, nothing written
    assert [c["skipped"] for c in again["cases"]] == [[0, 1], [0, 1]] and again["written"] == 0


def test_shards_split_the_cases_samples_and_together_equal_the_whole_run(tiny_model, whole_run, tmp_path):
    cases, whole, _ = whole_run
    sharded = tmp_path / "sharded"
    written = [{c["name"]: c["written"] for c in report_of(run(
        tiny_model, "--manifest", str(cases), "--out", str(sharded), "-n", "2", "--seed", "3", "--shard",
        f"{index}/3"))["cases"]} for index in range(3)]
    # units c*2 + k: shard 0 takes 0 and 3 (alpha 0, b 1), shard 1 takes 1 (alpha 1), shard 2 takes 2 (b 0)
    assert written == [{"alpha": [0], "b": [1]}, {"alpha": [1]}, {"b": [0]}]
    for name in ("alpha", "b"):
        for file in PAIR_FILES:
            assert (whole / name / file).read_bytes() == (sharded / name / file).read_bytes(), (name, file)


def test_dry_run_plans_every_case_without_writing(tiny_model, cases, tmp_path):
    out = tmp_path / "out"
    plan = report_of(run(tiny_model, "--manifest", str(cases), "--out", str(out), "--dry-run"))
    assert plan["dry_run"] is True
    assert [(c["name"], c["plan"]["size"], c["plan"]["seed"]) for c in plan["cases"]] == [
        ("alpha", [32, 32, 32], 0), ("b", [32, 32, 32], 5)]
    assert plan["cases"][1]["out"] == str(out / "b")
    assert not out.exists()


@pytest.mark.parametrize(("entries", "fragments"), [
    ([{"mask": "masks/alpha.nii.gz", "size": "big"}], ["case 0: size:", "256x256x128"]),
    ([{"mask": "masks/alpha.nii.gz", "sead": 3}], ["case 0: sead: not a case field"]),
    ([{"size": [32, 32, 32]}], ["case 0: mask: required"]),
    ([{"mask": "masks/alpha.nii.gz"}, {"mask": "masks/alpha.nii.gz"}], ["case 1: name: 'alpha' is also case 0's"]),
    ([{"mask": "masks/alpha.nii.gz", "name": "../up"}], ["case 0: name:", "not a folder name"]),
    ([{"mask": "masks/alpha.nii.gz", "seed": -1}], ["case 0: seed:"]),
    ({"mask": "masks/alpha.nii.gz"}, ["not a list of cases"]),
    ([], ["lists no cases"]),
])
def test_a_bad_case_is_refused_in_one_line_naming_it_before_anything_runs(tiny_model, cases, tmp_path, entries,
                                                                         fragments):
    cases.write_text(json.dumps(entries))
    out = tmp_path / "out"
    result = run(tiny_model, "--manifest", str(cases), "--out", str(out), json_output=False)
    assert_one_line_error(result, 2, "--manifest", *fragments)
    assert_nothing_written(out)


def test_a_missing_mask_is_named_with_its_case_and_the_first_case_is_not_made(tiny_model, cases, tmp_path):
    cases.write_text(json.dumps([{"mask": "masks/alpha.nii.gz"}, {"mask": "masks/missing.nii.gz"}]))
    out = tmp_path / "out"
    result = run(tiny_model, "--manifest", str(cases), "--out", str(out), json_output=False)
    assert_one_line_error(result, 1, "--manifest", "case 1 ('missing')", "missing.nii.gz' does not exist")
    assert_nothing_written(out)


def test_a_case_whose_mask_lacks_a_named_anatomy_stops_the_run_before_the_first_case_is_made(tiny_model, cases,
                                                                                            tmp_path):
    labels = phantom_labels((32, 32, 32))
    write_mask(cases.parent / "masks" / "no_liver.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0),
               labels=np.where(labels == 1, 200, labels).astype(np.uint8))
    cases.write_text(json.dumps([{"mask": "masks/alpha.nii.gz"}, {"mask": "masks/no_liver.nii.gz"}]))
    out = tmp_path / "out"
    result = run(tiny_model, "--manifest", str(cases), "--out", str(out), "--anatomy", "liver", json_output=False)
    assert_one_line_error(result, 1, "case 1 ('no_liver')", "--anatomy: 'liver'")
    assert_nothing_written(out)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--mask", "x.nii.gz"], "--mask: the manifest gives each case's mask"),
    (["--anatomy", "liver:0.5"], "--anatomy NAME:SIZE"),
    (["--body-from", "ct.nii.gz"], "give each case's CT as its \"body_from\""),
])
def test_options_that_give_the_mask_are_refused_with_a_manifest(tiny_model, cases, tmp_path, extra, fragment):
    result = run(tiny_model, "--manifest", str(cases), "--out", str(tmp_path / "out"), *extra, json_output=False)
    assert_one_line_error(result, 2, fragment)

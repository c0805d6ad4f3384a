"""`maisi qc`, `maisi labels`, and the quality check inside `maisi generate` (retries, sidecar, --strict-qc).

The tiny test networks have random weights, so whether their output meets the packaged statistics is chance. The
generate tests here are deterministic all the same: they use a mask whose organs the statistics do not cover (always
passes), or a statistics file whose liver range the model cannot meet ([5000, 6000] HU: always fails) or cannot miss
([-1001, 1001] HU: always passes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.sampling import derive_sample_seed
from tests.helpers import write_mask

runner = CliRunner()


def write_volume(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def ct_and_labels(tmp_path: Path, liver_hu: float = 60.0, shape=(16, 16, 16)) -> tuple[Path, Path]:
    """A body at 0 HU, a liver at `liver_hu`, lung lobes 28 and 32 at −800 HU."""
    labels = np.full(shape, 200, dtype=np.uint8)
    labels[0] = 0
    image = np.zeros(shape, dtype=np.int16)
    image[0] = -1000
    labels[2:6] = 1
    image[2:6] = liver_hu
    labels[8:10] = 28
    labels[10:12] = 32
    image[8:12] = -800
    return write_volume(tmp_path / "ct.nii.gz", image), write_volume(tmp_path / "labels.nii.gz", labels)


def stats_file(path: Path, low: float, high: float) -> Path:
    """Statistics with one organ, the liver, whose effective range is [low, high]."""
    entry = {"percentile_0_5": low, "percentile_99_5": high, "sigma_6_low": low, "sigma_6_high": high}
    path.write_text(json.dumps({"liver": entry}))
    return path


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --- maisi qc -----------------------------------------------------------------------------------------------------
def test_qc_passes_with_a_table_and_exit_0(tmp_path):
    image, labels = ct_and_labels(tmp_path)
    result = runner.invoke(app, ["qc", str(image), str(labels)])
    assert result.exit_code == 0, result.stderr
    assert "passed" in result.stdout
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 6}
    assert {"liver", "lung", "spleen", "bone"} <= set(rows)
    assert "60.0" in rows["liver"] and "pass" in rows["liver"] and "-21.60" in rows["liver"]
    assert "absent" in rows["spleen"] and "1000.00" in rows["bone"]
    assert result.stderr == ""


def test_qc_json_document(tmp_path):
    image, labels = ct_and_labels(tmp_path)
    result = runner.invoke(app, ["qc", str(image), str(labels), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["passed"] is True and document["failed"] == []
    assert document["image"] == str(image) and document["mask"] == str(labels)
    organs = {o["organ"]: o for o in document["organs"]}
    assert organs["liver"]["median_hu"] == 60.0 and organs["liver"]["voxels"] == 4 * 16 * 16
    # both lobes count, the right lower lobe (32) included
    assert organs["lung"]["voxels"] == 4 * 16 * 16 and organs["lung"]["verdict"] == "pass"
    assert organs["kidney"]["verdict"] == "absent" and organs["kidney"]["median_hu"] is None


def test_qc_failure_exits_3_with_one_line_and_the_table(tmp_path):
    image, labels = ct_and_labels(tmp_path, liver_hu=400.0)
    result = runner.invoke(app, ["qc", str(image), str(labels)])
    assert result.exit_code == 3, result.stderr
    assert "FAILED" in result.stdout and "fail" in result.stdout
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "liver median 400.0 HU outside [-21.6, 162.0]" in lines[0]

    as_json = runner.invoke(app, ["--json", "qc", str(image), str(labels)])
    assert as_json.exit_code == 3
    document = json.loads(as_json.stdout)
    assert document["passed"] is False and document["failed"] == ["liver"]


def test_qc_of_an_all_nan_ct_exits_3_naming_the_non_finite_voxels(tmp_path):
    """It used to print "passed": every organ under NaN read as "absent"."""
    image_path, labels = ct_and_labels(tmp_path)
    image = write_volume(tmp_path / "nan.nii.gz", np.full((16, 16, 16), np.nan, dtype=np.float32))
    result = runner.invoke(app, ["qc", str(image), str(labels)])
    assert result.exit_code == 3, result.stderr
    assert "FAILED" in result.stdout and "4096 non-finite voxels" in result.stdout
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"Error: IMAGE: '{image}' failed the quality check")
    assert "4096 of 4096 voxels are non-finite (NaN or inf)" in lines[0]

    as_json = runner.invoke(app, ["--json", "qc", str(image), str(labels)])
    assert as_json.exit_code == 3
    document = json.loads(as_json.stdout)
    assert document["passed"] is False and document["failed"] == ["non-finite"]
    assert document["non_finite_voxels"] == 4096
    assert {o["organ"]: o["verdict"] for o in document["organs"]}["liver"] == "non-finite"


def test_qc_of_a_ct_with_one_inf_voxel_exits_3(tmp_path):
    image_path, labels = ct_and_labels(tmp_path)
    data = np.asarray(nib.load(str(image_path)).dataobj).astype(np.float32)
    data[3, 3, 3] = np.inf  # in the liver; its median of the finite voxels still passes
    image = write_volume(tmp_path / "inf.nii.gz", data)
    result = runner.invoke(app, ["--json", "qc", str(image), str(labels)])
    assert result.exit_code == 3, result.stderr
    document = json.loads(result.stdout)
    assert document["failed"] == ["non-finite"] and document["non_finite_voxels"] == 1
    assert "1 of 4096 voxels are non-finite" in result.stderr


def test_qc_with_a_statistics_file(tmp_path):
    image, labels = ct_and_labels(tmp_path, liver_hu=400.0)
    wide = stats_file(tmp_path / "wide.json", -1001.0, 1001.0)
    result = runner.invoke(app, ["qc", str(image), str(labels), "--stats", str(wide), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [o["organ"] for o in document["organs"]] == ["liver"] and document["statistics"] == str(wide)

    narrow = stats_file(tmp_path / "narrow.json", 5000.0, 6000.0)
    assert runner.invoke(app, ["qc", str(image), str(labels), "--stats", str(narrow)]).exit_code == 3

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"liver": {"percentile_0_5": 0, "percentile_99_5": 1, "sigma_6_low": 0}}))
    result = runner.invoke(app, ["qc", str(image), str(labels), "--stats", str(broken)])
    assert result.exit_code == 1 and result.stdout == ""
    lines = error_lines(result)
    assert len(lines) == 1 and "'sigma_6_high'" in lines[0] and "--stats" in lines[0]


def test_qc_shape_mismatch_is_one_line_exit_1(tmp_path):
    image, _ = ct_and_labels(tmp_path, shape=(16, 16, 16))
    other = write_volume(tmp_path / "small.nii.gz", np.full((16, 16, 12), 200, dtype=np.uint8))
    result = runner.invoke(app, ["qc", str(image), str(other)])
    assert result.exit_code == 1 and result.stdout == ""
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "(16, 16, 12)" in lines[0] and "(16, 16, 16)" in lines[0]


@pytest.mark.parametrize("which", ["IMAGE", "MASK"])
def test_qc_unreadable_or_missing_files(tmp_path, which):
    image, labels = ct_and_labels(tmp_path)
    junk = tmp_path / "junk.nii.gz"
    junk.write_text("not an image")
    args = [str(junk), str(labels)] if which == "IMAGE" else [str(image), str(junk)]
    result = runner.invoke(app, ["qc", *args])
    assert result.exit_code == 1 and result.stdout == ""
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {which}: ") and "not a readable NIfTI" in lines[0]

    missing = str(tmp_path / "nope.nii.gz")
    args = [missing, str(labels)] if which == "IMAGE" else [str(image), missing]
    result = runner.invoke(app, ["qc", *args])
    assert result.exit_code == 1 and "does not exist" in result.stderr and which in result.stderr


# --- maisi labels -------------------------------------------------------------------------------------------------
def test_labels_table_lists_all_with_body():
    result = runner.invoke(app, ["labels"])
    assert result.exit_code == 0, result.stderr
    assert "right lung lower lobe" in result.stdout and "airway" in result.stdout
    assert "body" in result.stdout and "200" in result.stdout


def test_labels_json_filters_by_name_fragment_in_any_case():
    result = runner.invoke(app, ["labels", "LUNG", "--json"])
    assert result.exit_code == 0, result.stderr
    labels = json.loads(result.stdout)["labels"]
    assert [entry["id"] for entry in labels] == [23, 28, 29, 30, 31, 32]
    assert labels[-1] == {"id": 32, "name": "right lung lower lobe"}

    everything = json.loads(runner.invoke(app, ["--json", "labels"]).stdout)["labels"]
    assert len(everything) == 133 and everything[-1] == {"id": 200, "name": "body"}
    assert [e["id"] for e in everything] == sorted(e["id"] for e in everything)


def test_labels_by_exact_id_and_no_match():
    result = runner.invoke(app, ["labels", "3", "--json"])
    assert json.loads(result.stdout)["labels"] == [{"id": 3, "name": "spleen"}]  # not 13, 23, 30…
    missing = runner.invoke(app, ["labels", "no-such-organ"])
    assert missing.exit_code == 1 and missing.stdout == ""
    assert len(error_lines(missing)) == 1 and "no label matches 'no-such-organ'" in missing.stderr


@pytest.mark.parametrize("command", ["labels", "qc"])
def test_labels_and_qc_do_not_import_torch(tmp_path, command):
    args = ["labels", "kidney"] if command == "labels" else ["qc", *map(str, ct_and_labels(tmp_path))]
    code = (
        "import sys\n"
        f"sys.argv = ['maisi', *{args!r}]\n"
        "from maisi_cli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
        "heavy = sorted(m for m in ('torch', 'monai') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.rstrip().endswith("HEAVY="), done.stderr


# --- maisi generate with the quality check ------------------------------------------------------------------------
def generate(tiny_model, mask: Path, out: Path, *extra: str):
    spec, weights = tiny_model
    return runner.invoke(app, ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights),
                               "--mask", str(mask), "--out", str(out), *extra])


def sidecar(out: Path, index: int = 0) -> dict:
    return json.loads((out / f"sample_{index:04d}.json").read_text())


@pytest.fixture
def uncovered_mask(tmp_path: Path) -> Path:
    """Body and a gallbladder (10): no organ the packaged statistics check is present."""
    labels = np.zeros((32, 32, 32), dtype=np.uint8)
    labels[4:28, 4:28, 4:28] = 200
    labels[12:20, 12:20, 12:20] = 10
    return write_mask(tmp_path / "uncovered.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), labels=labels)


def test_sample_without_checked_organs_passes_on_the_first_seed(tiny_model, uncovered_mask, tmp_path):
    out = tmp_path / "out"
    result = generate(tiny_model, uncovered_mask, out, "--seed", "4")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    expected_seed = derive_sample_seed(4, 0)
    (sample,) = report["samples"]
    assert sample["qc"] == {"passed": True, "failed": []} and report["qc_failed"] == []
    assert sample["attempts"] == [{"attempt": 0, "seed": expected_seed, "passed": True, "failed": []}]
    assert report["plan"]["qc"] == {"enabled": True, "strict": False, "max_attempts": 3,
                                    "statistics": "packaged image_median_statistics.json"}

    document = sidecar(out)
    assert document["qc"]["passed"] is True and document["qc"]["attempt"] == 0
    assert {o["verdict"] for o in document["qc"]["organs"]} == {"absent"}
    assert document["qc_skipped"] is None and document["sample_seed"] == expected_seed
    assert document["timings"]["qc_s"] >= 0 and "retry" not in result.stderr


def test_passing_check_leaves_the_files_of_a_run_without_it(tiny_model, mask_file, tmp_path):
    """Attempt 0 is today's seed: a sample that passes is byte-identical to one made with --no-qc."""
    wide = stats_file(tmp_path / "wide.json", -1001.0, 1001.0)
    checked, unchecked = tmp_path / "checked", tmp_path / "unchecked"
    result = generate(tiny_model, mask_file, checked, "--seed", "9", "--stats", str(wide))
    assert result.exit_code == 0, result.stderr
    assert [len(s["attempts"]) for s in json.loads(result.stdout)["samples"]] == [1]
    assert generate(tiny_model, mask_file, unchecked, "--seed", "9", "--no-qc").exit_code == 0
    for name in ("sample_0000_image.nii.gz", "sample_0000_label.nii.gz"):
        assert (checked / name).read_bytes() == (unchecked / name).read_bytes(), name
    assert sidecar(checked)["qc"]["statistics"] == str(wide)


def test_failing_sample_is_retried_from_new_seeds_and_kept(tiny_model, mask_file, tmp_path):
    narrow = stats_file(tmp_path / "narrow.json", 5000.0, 6000.0)
    out = tmp_path / "out"
    result = generate(tiny_model, mask_file, out, "--seed", "2", "--stats", str(narrow), "--max-attempts", "3")
    assert result.exit_code == 0, result.stderr  # not strict: kept, with a warning
    assert "failed the quality check in all 3 attempt(s)" in result.stderr
    assert "keeping the last attempt" in result.stderr
    assert "sample 0000 retry 2 denoise" in result.stderr
    report = json.loads(result.stdout)
    (sample,) = report["samples"]
    seeds = [a["seed"] for a in sample["attempts"]]
    assert len(seeds) == 3 and len(set(seeds)) == 3 and seeds[0] == derive_sample_seed(2, 0)
    assert all(a["failed"] == ["liver"] and not a["passed"] for a in sample["attempts"])
    assert sample["qc"] == {"passed": False, "failed": ["liver"]} and report["qc_failed"] == [0]
    assert sample["seed"] == seeds[-1] and report["written"] == [0]

    assert (out / "sample_0000_image.nii.gz").is_file() and (out / "sample_0000_label.nii.gz").is_file()
    document = sidecar(out)
    assert document["qc"]["passed"] is False and document["qc"]["failed"] == ["liver"]
    assert document["qc"]["attempt"] == 2 and document["qc"]["max_attempts"] == 3
    assert [a["seed"] for a in document["qc"]["attempts"]] == seeds and document["sample_seed"] == seeds[-1]

    # The report in the sidecar is what `maisi qc` says about the written files.
    again = runner.invoke(app, ["--json", "qc", str(out / "sample_0000_image.nii.gz"),
                                str(out / "sample_0000_label.nii.gz"), "--stats", str(narrow)])
    assert again.exit_code == 3
    assert json.loads(again.stdout)["organs"] == document["qc"]["organs"]


def test_strict_qc_writes_everything_then_exits_3(tiny_model, mask_file, tmp_path):
    narrow = stats_file(tmp_path / "narrow.json", 5000.0, 6000.0)
    out = tmp_path / "out"
    result = generate(tiny_model, mask_file, out, "-n", "2", "--stats", str(narrow), "--max-attempts", "2",
                      "--strict-qc")
    assert result.exit_code == 3, result.stderr
    report = json.loads(result.stdout)  # the report is still the whole of stdout
    assert report["written"] == [0, 1] and report["qc_failed"] == [0, 1]
    assert [len(s["attempts"]) for s in report["samples"]] == [2, 2]
    for k in range(2):
        assert (out / f"sample_{k:04d}_image.nii.gz").is_file()
        assert sidecar(out, k)["qc"]["passed"] is False
    errors = [line for line in error_lines(result) if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0] == error_lines(result)[-1]
    assert "--strict-qc" in errors[0] and "0 (2 attempt(s)), 1 (2 attempt(s))" in errors[0]

    # A re-run finds the samples complete; their recorded failure still fails the strict check.
    rerun = generate(tiny_model, mask_file, out, "-n", "2", "--stats", str(narrow), "--max-attempts", "2",
                     "--strict-qc")
    assert rerun.exit_code == 3
    rerun_report = json.loads(rerun.stdout)
    assert rerun_report["skipped"] == [0, 1] and rerun_report["qc_failed"] == [0, 1]

    wide = stats_file(tmp_path / "wide.json", -1001.0, 1001.0)
    passing = generate(tiny_model, mask_file, tmp_path / "ok", "--stats", str(wide), "--strict-qc")
    assert passing.exit_code == 0, passing.stderr


def test_no_qc_checks_nothing_and_says_why(tiny_model, mask_file, tmp_path):
    narrow = stats_file(tmp_path / "narrow.json", 5000.0, 6000.0)
    out = tmp_path / "out"
    result = generate(tiny_model, mask_file, out, "--no-qc", "--stats", str(narrow))
    assert result.exit_code == 0, result.stderr
    assert "retry" not in result.stderr and "quality check" not in result.stderr
    report = json.loads(result.stdout)
    assert report["samples"][0]["qc"] is None and report["samples"][0]["attempts"] == []
    assert report["plan"]["qc"]["enabled"] is False
    document = sidecar(out)
    assert document["qc"] is None and "--no-qc" in document["qc_skipped"]


def test_qc_option_errors(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    conflict = generate(tiny_model, mask_file, out, "--no-qc", "--strict-qc")
    assert conflict.exit_code == 2 and "--strict-qc" in conflict.stderr
    assert generate(tiny_model, mask_file, out, "--max-attempts", "0").exit_code == 2

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"liver": {"percentile_0_5": 0}}))
    result = generate(tiny_model, mask_file, out, "--stats", str(broken))
    assert result.exit_code == 1 and json.loads(result.stdout)["error"]["type"] == "StatisticsError"  # --json
    assert len(error_lines(result)) == 1 and "'percentile_99_5'" in result.stderr
    assert not out.exists()


def test_dry_run_shows_the_quality_check(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    result = runner.invoke(app, ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask",
                                 str(mask_file), "--out", str(tmp_path / "o"), "--dry-run", "--max-attempts", "5",
                                 "--strict-qc"])
    assert result.exit_code == 0, result.stderr
    assert "up to 5 attempt(s)" in result.stdout and "strict" in result.stdout


def test_organ_lost_when_the_mask_is_resampled_is_warned_by_name(tiny_model, tmp_path):
    """A 1 mm mask to a 2 mm grid: lone voxels at odd indices fall between the nearest-neighbour samples. The
    organ's absence would otherwise read as "absent" in the quality check, with nothing said."""
    from tests.helpers import phantom_labels

    labels = phantom_labels((64, 64, 64))
    labels[33, 33, 33] = 4  # pancreas
    labels[41, 41, 41] = 22  # brain
    mask = write_mask(tmp_path / "fine.nii.gz", (64, 64, 64), (1.0, 1.0, 1.0), labels=labels)
    out = tmp_path / "out"
    result = generate(tiny_model, mask, out, "--size", "32x32x32", "--spacing", "2", "--no-qc")
    assert result.exit_code == 0, result.stderr  # a warning: the other labels still condition the CT
    (line,) = [line for line in result.stderr.splitlines() if "vanish" in line]
    assert "--mask: 'fine.nii.gz' is 64x64x64 at 1x1x1 mm" in line and "32x32x32 at 2x2x2 mm" in line
    assert "label 4 pancreas (1 voxel), label 22 brain (1 voxel) vanish" in line
    assert "give a mask at the target grid or a finer --spacing" in line
    written = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    assert not np.isin(written, [4, 22]).any() and (written == 1).any()


"""`maisi data nnunet` (issue 23, item 5): demo run folders as an nnU-Net v2 raw dataset and a MONAI datalist.

One real demo run per module (2 samples of 64³, 2 steps) is split into two run folders as `maisi generate` would
leave them: run A holds sample 1, whose label map has a label (49) that sample 0's lacks; run B holds sample 0.
nnU-Net's own `verify_dataset_integrity` checks a dataset the command builds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.io.nifti import write_nifti
from maisi_cli.labels import label_dictionary

LIVER, SPLEEN, EXTRA = 1, 3, 49  # EXTRA: in sample 1's label map only (the demo database's masks, by seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run A: sample 1, run B: sample 0) of one demo run."""
    root = tmp_path_factory.mktemp("demo-runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAISI_HOME", str(root / "home"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("MAISI_WEIGHTS_DIR", raising=False)
        done = CliRunner().invoke(app, ["--quiet", "generate", "--model", "demo", "--steps", "2", "--no-qc", "-n", "2",
                                        "--out", str(root / "run_a")])
    assert done.exit_code == 0, done.stderr
    run_b = root / "run_b"
    run_b.mkdir()
    for name in ("sample_0000.json", "sample_0000_image.nii.gz", "sample_0000_label.nii.gz"):
        shutil.move(root / "run_a" / name, run_b / name)
    shutil.copy(root / "run_a" / "maisi-run.json", run_b)
    assert EXTRA in labels_of(root / "run_a" / "sample_0001_label.nii.gz")
    assert EXTRA not in labels_of(run_b / "sample_0000_label.nii.gz")
    return root / "run_a", run_b


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def maisi(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def error_line(stderr: str) -> str:
    """The one error line (progress lines may come before it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr
    return lines[0]


def build(out: Path, *args) -> dict:
    code, stdout, stderr = maisi("--json", "data", "nnunet", *args, "--out", out)
    assert code == 0, stderr
    return json.loads(stdout)


def sidecar(run: Path, index: int) -> dict:
    return json.loads((run / f"sample_{index:04d}.json").read_text())


def source(run: Path, index: int) -> tuple[Path, Path, dict]:
    return run / f"sample_{index:04d}_image.nii.gz", run / f"sample_{index:04d}_label.nii.gz", sidecar(run, index)


def test_layout_dataset_json_and_labels_renumbered_voxel_for_voxel(runs, tmp_path: Path):
    run_a, run_b = runs
    out = tmp_path / "nnUNet_raw" / "Dataset501_MaisiDemo"
    summary = build(out, run_a, run_b, "--datalist", tmp_path / "lists" / "datalist.json")
    assert summary["ok"] and summary["added"] == ["maisi_0000", "maisi_0001"] and summary["num_training"] == 2

    held = set(np.unique(labels_of(run_a / "sample_0001_label.nii.gz"))) | set(np.unique(labels_of(
        run_b / "sample_0000_label.nii.gz")))
    present = sorted(int(i) for i in held - {0, 200})
    names = {ident: name for name, ident in label_dictionary().items()}
    document = json.loads((out / "dataset.json").read_text())
    assert document["channel_names"] == {"0": "CT"} and document["file_ending"] == ".nii.gz"
    assert document["numTraining"] == 2 and "maisi" in document
    assert document["labels"] == {"background": 0, **{names[m]: n for n, m in enumerate(present, 1)}}
    record = json.loads((out / "maisi_labels.json").read_text())
    assert [(e["nnunet"], e["maisi"], e["name"]) for e in record["labels"]] == [
        (n, m, names[m]) for n, m in enumerate(present, 1)]  # all: every organ label, by MAISI id, no body 200

    table = np.zeros(256, dtype=np.uint8)
    table[present] = np.arange(1, len(present) + 1)
    for number, (run, index) in enumerate([(run_a, 1), (run_b, 0)]):
        image, label, side = source(run, index)
        case = f"maisi_{number:04d}"
        assert (out / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == image.read_bytes()
        written = nib.load(out / "labelsTr" / f"{case}.nii.gz")
        assert written.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(written.dataobj), table[labels_of(label)])
        assert np.allclose(written.affine, nib.load(image).affine)
        entry = record["cases"][number]
        assert entry == {"case": case, "run": str(run.resolve()), "sample_index": index,
                         "seed": side["sample_seed"], "model": "demo",
                         "image_sha256": side["files_sha256"]["image"], "label_sha256": side["files_sha256"]["label"]}

    datalist = json.loads((tmp_path / "lists" / "datalist.json").read_text())["training"]
    assert [item["fold"] for item in datalist] == [0, 1]
    for number, item in enumerate(datalist):
        assert (tmp_path / "lists" / item["image"]).resolve() == (out / "imagesTr" / f"maisi_{number:04d}_0000.nii.gz")
        assert (tmp_path / "lists" / item["label"]).resolve() == (out / "labelsTr" / f"maisi_{number:04d}.nii.gz")

    again = tmp_path / "again" / "Dataset501_MaisiDemo"
    build(again, run_a, run_b)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):  # the same runs give the same bytes
        assert path.read_bytes() == (again / path.relative_to(out)).read_bytes(), path.name


def test_adding_appends_readding_adds_nothing_and_nnunet_verifies_it(runs, tmp_path: Path):
    run_a, run_b = runs
    out = tmp_path / "Dataset502_MaisiDemo"
    assert build(out, run_a)["added"] == ["maisi_0000"]
    summary = build(out, run_b)  # all: run B's labels are a subset of the dataset's
    assert summary["added"] == ["maisi_0001"] and summary["num_training"] == 2
    record = json.loads((out / "maisi_labels.json").read_text())
    assert [(c["run"], c["sample_index"]) for c in record["cases"]] == [(str(run_a.resolve()), 1),
                                                                        (str(run_b.resolve()), 0)]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    summary = build(out, run_b, run_a)  # again, both: nothing added, not a byte changed
    assert summary["added"] == [] and summary["already"] == ["maisi_0001", "maisi_0000"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files

    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    except ImportError as error:
        pytest.skip(f"nnunetv2 is not installed ({error}); .ci/run installs it for this check")
    verify_dataset_integrity(str(out), num_processes=1)  # raises (AssertionError/RuntimeError) on any problem


def test_named_labels_keep_those_only_and_another_set_is_refused_with_the_fix(runs, tmp_path: Path):
    run_a, run_b = runs
    out = tmp_path / "Dataset503_LiverSpleen"
    summary = build(out, run_b, "--labels", "Liver,spleen")
    assert [(e["nnunet"], e["maisi"], e["name"]) for e in summary["labels"]] == [(1, LIVER, "liver"),
                                                                                  (2, SPLEEN, "spleen")]
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    held = labels_of(run_b / "sample_0000_label.nii.gz")
    expected = np.where(held == LIVER, 1, np.where(held == SPLEEN, 2, 0))
    assert np.array_equal(labels_of(out / "labelsTr" / "maisi_0000.nii.gz"), expected)
    assert (expected == 1).any() and (expected == 2).any()

    code, _, stderr = maisi("data", "nnunet", run_a, "--out", out, "--labels", "liver")
    assert code == 2 and "give --labels liver,spleen" in error_line(stderr)
    code, _, stderr = maisi("data", "nnunet", run_a, "--out", out)  # all: run A holds labels the dataset lacks
    assert code == 2 and "--labels liver,spleen" in error_line(stderr)
    code, _, stderr = maisi("data", "nnunet", run_a, "--out", out, "--labels", "liver,livr")
    assert code == 2 and "--labels: 'livr' is not in the label dictionary" in error_line(stderr)
    assert len(list((out / "imagesTr").iterdir())) == 1  # nothing added by a refused call


def test_all_refuses_a_label_the_dataset_lacks_and_its_own_list_maps_it_to_background(runs, tmp_path: Path):
    run_a, run_b = runs
    out = tmp_path / "Dataset504_Body"
    summary = build(out, run_b, "--labels", "all,body")
    kept = [e["maisi"] for e in summary["labels"]]
    assert kept[-1] == 200 and EXTRA not in kept and kept[:-1] == sorted(kept[:-1])
    code, _, stderr = maisi("data", "nnunet", run_a, "--out", out)
    name = {ident: name for name, ident in label_dictionary().items()}[EXTRA].replace(" ", "_")
    assert code == 2 and f"the samples hold {name}" in error_line(stderr)
    fix = stderr.split("give --labels ")[1].split()[0]
    summary = build(out, run_a, "--labels", fix)
    assert summary["added"] == ["maisi_0001"]
    written = labels_of(out / "labelsTr" / "maisi_0001.nii.gz")
    held = labels_of(run_a / "sample_0001_label.nii.gz")
    assert not written[held == EXTRA].any() and (written[held == 200] == len(kept)).all()
    assert (written[held == LIVER] == kept.index(LIVER) + 1).all()


def test_a_file_not_matching_its_sidecar_is_refused_before_anything_is_written(runs, tmp_path: Path):
    _, run_b = runs
    copy = tmp_path / "half-copied"
    shutil.copytree(run_b, copy)
    label = copy / "sample_0000_label.nii.gz"
    label.write_bytes(label.read_bytes()[:-100])  # truncated, as by an interrupted copy
    out = tmp_path / "Dataset505_X"
    code, _, stderr = maisi("data", "nnunet", copy, "--out", out)
    assert code == 1 and "sample_0000_label.nii.gz does not match the sha256" in error_line(stderr)
    assert not out.exists()

    code, _, stderr = maisi("data", "nnunet", copy, "--out", tmp_path / "Dataset55_X")
    assert code == 2 and "DatasetNNN_Name" in error_line(stderr)
    (tmp_path / "Dataset505_Other").mkdir()
    code, _, stderr = maisi("data", "nnunet", run_b, "--out", out)
    assert code == 2 and "Dataset505_Other" in error_line(stderr) and not out.exists()


def test_image_only_samples_are_skipped_and_uncompressed_pairs_keep_their_bytes(runs, tmp_path: Path):
    run_a, run_b = runs
    mixed = tmp_path / "mixed"
    shutil.copytree(run_b, mixed)
    side = sidecar(mixed, 0)  # sample 0 as an image-only model writes it: no label file, none recorded
    (mixed / "sample_0000_label.nii.gz").unlink()
    side.update(image_only=True, files={"image": "sample_0000_image.nii.gz"},
                files_sha256={"image": side["files_sha256"]["image"]})
    (mixed / "sample_0000.json").write_text(json.dumps(side))
    # sample 3 written with --format nii (uncompressed), its label the liver alone: --labels liver renumbers no id,
    # so both files are copied as they are, gzipped
    image = mixed / "sample_0003_image.nii"
    image.write_bytes(gzip.decompress((run_a / "sample_0001_image.nii.gz").read_bytes()))
    liver_only = np.where(labels_of(run_a / "sample_0001_label.nii.gz") == LIVER, LIVER, 0).astype(np.uint8)
    label = mixed / "sample_0003_label.nii"
    write_nifti(tmp_path / "liver.nii.gz", liver_only, nib.load(image).affine)
    label.write_bytes(gzip.decompress((tmp_path / "liver.nii.gz").read_bytes()))
    digests = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (image, label)}
    (mixed / "sample_0003.json").write_text(json.dumps({
        **sidecar(run_a, 1), "sample_index": 3, "format": "nii", "files_written": digests,
        "files": {"image": image.name, "label": label.name},
        "files_sha256": {"image": digests[image.name], "label": digests[label.name]}}))
    (mixed / "sample_0004_image.nii.gz").write_bytes(b"")  # a sample still being written: no sidecar yet

    out = tmp_path / "Dataset506_Liver"
    code, stdout, stderr = maisi("data", "nnunet", mixed, "--out", out, "--labels", "liver")
    assert code == 0, stderr
    assert "1 sample(s)" in stderr and "no label map" in stderr and "no sidecar yet" in stderr
    assert "1 case(s) added" in stdout
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["maisi_0000_0000.nii.gz"]
    assert gzip.decompress((out / "imagesTr" / "maisi_0000_0000.nii.gz").read_bytes()) == image.read_bytes()
    assert gzip.decompress((out / "labelsTr" / "maisi_0000.nii.gz").read_bytes()) == label.read_bytes()

    (mixed / "sample_0003.json").write_text(json.dumps({**sidecar(mixed, 3), "format": "nrrd"}))
    code, _, stderr = maisi("data", "nnunet", mixed, "--out", tmp_path / "Dataset507_Nrrd")
    assert code == 1 and "written as nrrd" in error_line(stderr) and "--format nifti" in stderr
    for name in ("sample_0003.json", image.name, label.name):
        (mixed / name).unlink()
    code, _, stderr = maisi("data", "nnunet", mixed, "--out", tmp_path / "Dataset508_None")
    assert code == 2 and "no sample with a label map" in error_line(stderr)

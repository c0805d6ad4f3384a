"""The Python API (`from maisi_cli import Generator`): networks loaded once, arrays equal to the CLI's files, nothing
written until `save`, and `save` writing what `maisi generate` writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import maisi_cli
from maisi_cli.engine import loading
from maisi_cli.errors import MaskError, UsageError
from tests.cli.test_generate import generate, report_of
from tests.helpers import phantom_labels


@pytest.fixture
def counted_builds(monkeypatch) -> list[str]:
    """Every network the engine builds (one per weight file it loads), by component."""
    built: list[str] = []
    real = loading.build_network

    def counting(spec, component, *args, **kwargs):
        built.append(component)
        return real(spec, component, *args, **kwargs)

    monkeypatch.setattr(loading, "build_network", counting)
    return built


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_three_samples_from_one_generator_load_the_networks_once(tiny_model, mask_file, counted_builds):
    spec, weights = tiny_model
    generator = maisi_cli.Generator(model=str(spec), weights_dir=weights)
    assert counted_builds == []  # loaded lazily, at the first sample
    first = generator.generate(mask=mask_file, seed=3, steps=2, num_samples=2, qc=False)
    third = generator.generate(mask=mask_file, seed=3, steps=2, num_samples=3, qc=False)[2]
    assert sorted(counted_builds) == ["autoencoder", "controlnet", "diffusion_unet"] and generator.loads == 1
    assert [s.index for s in first] == [0, 1] and third.index == 2
    assert first[0].seed != first[1].seed != third.seed


def test_arrays_equal_the_cli_files_and_save_writes_the_same_bytes(tiny_model, mask_file, tmp_path, monkeypatch):
    spec, weights = tiny_model
    cli_out = tmp_path / "cli"
    report_of(generate(tiny_model, mask_file, cli_out, "-n", "2", "--seed", "11", "--steps", "3"))

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    samples = maisi_cli.Generator(model=str(spec), weights_dir=weights).generate(
        mask=str(mask_file), seed=11, steps=3, num_samples=2, qc=False)
    assert list(Path.cwd().iterdir()) == []  # generate writes nothing
    api_out = tmp_path / "api"
    for sample in samples:
        stem = f"sample_{sample.index:04d}"
        image = nib.load(cli_out / f"{stem}_image.nii.gz")
        labels = nib.load(cli_out / f"{stem}_label.nii.gz")
        assert sample.image.dtype == np.int16 and sample.labels.dtype == np.uint8
        np.testing.assert_array_equal(sample.image, np.asarray(image.dataobj))
        np.testing.assert_array_equal(sample.labels, np.asarray(labels.dataobj))
        np.testing.assert_array_equal(sample.affine, image.affine)
        assert sample.qc is None and sample.sidecar["sample_seed"] == sample.seed
        assert sample.sidecar["mask_source"]["sha256"] == sha256(mask_file)
        written = sample.save(api_out)
        assert [p.name for p in written] == [f"{stem}_image.nii.gz", f"{stem}_label.nii.gz", f"{stem}.json"]
        for name in (f"{stem}_image.nii.gz", f"{stem}_label.nii.gz"):
            assert sha256(api_out / name) == sha256(cli_out / name), name
        sidecar = json.loads((api_out / f"{stem}.json").read_text())
        cli_sidecar = json.loads((cli_out / f"{stem}.json").read_text())
        assert sidecar["files_sha256"] == cli_sidecar["files_sha256"]
        assert sidecar["run_settings_sha256"] == cli_sidecar["run_settings_sha256"]
    # The folder is a run folder like the CLI's: the same command finds both samples complete.
    assert report_of(generate(tiny_model, mask_file, api_out, "-n", "2", "--seed", "11", "--steps", "3"))[
        "skipped"] == [0, 1]


def test_a_mask_in_memory_gives_the_same_image_as_its_file(tiny_model, mask_file):
    spec, weights = tiny_model
    generator = maisi_cli.Generator(model=str(spec), weights_dir=weights)
    nifti = nib.load(mask_file)
    from_file = generator.generate(mask=mask_file, seed=2, steps=2, qc=False)[0]
    from_array = generator.generate(mask=(np.asarray(nifti.dataobj), nifti.affine), seed=2, steps=2, qc=False)[0]
    from_image = generator.generate(mask=nifti, seed=2, steps=2, qc=False)[0]
    np.testing.assert_array_equal(from_array.image, from_file.image)
    np.testing.assert_array_equal(from_image.labels, from_file.labels)
    assert from_array.sidecar["mask_source"]["type"] == "array" and generator.loads == 1


def test_a_segmenter_map_in_memory_is_converted_and_given_its_body(tiny_model):
    """mask_labels= and body_from= as --mask-labels and --body-from: TotalSegmentator ids (5 = liver) become MAISI's
    (1), the body label is added from the labels, its method and warning are in the sidecar."""
    spec, weights = tiny_model
    maisi = phantom_labels((32, 32, 32))
    ts = np.select([maisi == 1, maisi == 3], [5, 1], 0).astype(np.uint8)  # liver, spleen; no body
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    generator = maisi_cli.Generator(model=str(spec), weights_dir=weights)
    with pytest.raises(UsageError, match="no body label"):
        generator.generate(mask=(ts, affine), mask_labels="totalsegmentator", steps=1, qc=False)
    sample = generator.generate(mask=(ts, affine), mask_labels="totalsegmentator", body_from="labels", steps=1,
                                qc=False)[0]
    np.testing.assert_array_equal(np.where(sample.labels == 200, 0, sample.labels), np.where(ts == 5, 1, ts * 3))
    assert (sample.labels == 200).any() and sample.sidecar["mask_source"]["body"] == {"method": "labels"}
    assert any("--body-from labels" in w for w in sample.sidecar["warnings"])


def test_bad_arguments_fail_with_the_cli_messages(tiny_model, tmp_path):
    spec, weights = tiny_model
    generator = maisi_cli.Generator(model=str(spec), weights_dir=weights)
    with pytest.raises(UsageError, match="--spacing"):
        generator.generate(spacing=(0.0, 1.0, 1.0))
    with pytest.raises(MaskError, match="mask: a 3D label map is needed"):
        generator.generate(mask=(np.zeros((4, 4)), np.eye(4)), qc=False)
    with pytest.raises(MaskError, match="all background"):
        generator.generate(mask=(np.zeros((8, 8, 8), np.uint8), np.eye(4)), qc=False)
    with pytest.raises(UsageError, match="not a model|unknown model|Unknown model|no model"):
        maisi_cli.Generator(model="no-such-model")


def test_save_refuses_a_folder_holding_another_run(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    generator = maisi_cli.Generator(model=str(spec), weights_dir=weights)
    sample = generator.generate(mask=mask_file, seed=1, steps=2, qc=False)[0]
    other = generator.generate(mask=mask_file, seed=2, steps=2, qc=False)[0]
    sample.save(tmp_path / "run")
    with pytest.raises(UsageError, match="--seed 1, and this run has --seed 2"):
        other.save(tmp_path / "run")
    other.save(tmp_path / "run", overwrite=True)
    assert json.loads((tmp_path / "run" / "sample_0000.json").read_text())["seed"] == 2


def test_qc_and_preview_functions(tmp_path):
    labels = phantom_labels((32, 32, 32))
    image = np.where(labels == 0, -1000, 50).astype(np.int16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image_path, label_path = tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), image_path)
    nib.save(nib.Nifti1Image(labels, affine), label_path)
    report = maisi_cli.qc(image_path, label_path)
    assert report.passed is False and report.summary().startswith("lung median 50.0 HU")  # air expected
    assert maisi_cli.qc(image, labels).as_dict() == report.as_dict()  # arrays answer as the files do
    picture = maisi_cli.preview(image_path, label_path)
    assert picture.image.size[0] > 256 and not (tmp_path / "image_preview.png").exists()
    maisi_cli.preview(image_path, label_path, out=tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000

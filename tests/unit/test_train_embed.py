"""`maisi data embed` / engine/train/embed.py: CT → channels-last latents, sidecars, datalist, resume, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.progress import ProgressEvent
from maisi_cli.engine.train.embed import embed_datalist, embedding_name, target_size
from maisi_cli.models import get_model
from tests.helpers import write_mask


def write_ct(path: Path, shape=(20, 24, 16), spacing=(1.5, 1.5, 1.5), seed=0) -> Path:
    data = np.random.default_rng(seed).normal(0, 300, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.fixture
def datalist(tmp_path: Path) -> Path:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    write_ct(tmp_path / "data" / "a.nii.gz")
    write_ct(tmp_path / "data" / "sub" / "b.nii.gz", shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0), seed=1)
    write_mask(tmp_path / "data" / "a_label.nii.gz", (20, 24, 16), (1.5, 1.5, 1.5))
    path = tmp_path / "data" / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "a_label.nii.gz"},
                                             {"image": "sub/b.nii.gz"}]}))
    return path


def test_target_size_rounds_to_nearest_multiple_with_a_minimum():
    assert target_size((20, 24, 3), 8) == (24, 24, 8)
    assert target_size((224, 320, 100), 32) == (224, 320, 96)
    assert target_size((12, 36, 4), 8) == (16, 40, 8)  # halves round up; at least one multiple


def test_embedding_name_keeps_sub_folders(tmp_path):
    assert embedding_name(tmp_path / "sub" / "x.nii.gz", tmp_path) == Path("sub/x_emb.nii.gz")
    assert embedding_name(tmp_path / "y.nii", tmp_path) == Path("y_emb.nii.gz")


def test_embed_writes_channels_last_latents_sidecars_and_datalist(tiny_model, datalist, tmp_path):
    spec_path, weights = tiny_model
    spec = get_model(str(spec_path))
    out = tmp_path / "emb"
    events = []
    summary = embed_datalist(spec, datalist, out, weights_dir=weights, on_progress=events.append)
    assert summary["written"] == ["a_emb.nii.gz", "sub/b_emb.nii.gz"] and summary["skipped"] == []
    assert events[-1] == ProgressEvent("embed", 2, 2)

    latent = nib.load(out / "a_emb.nii.gz")
    # 20x24x16 → 24x24x16 (multiples of 8) → /4 → 6x6x4, 4 latent channels last
    assert latent.shape == (6, 6, 4, 4) and latent.get_data_dtype() == np.float32
    assert np.all(np.isfinite(latent.get_fdata()))
    sidecar = json.loads((out / "a_emb.nii.gz.json").read_text())
    assert sidecar["dim"] == [6, 6, 4]
    assert sidecar["spacing"] == pytest.approx([1.25, 1.5, 1.5])  # resized-image spacing: 1.5 * 20 / 24
    assert np.allclose(latent.header.get_zooms()[:3], [1.25, 1.5, 1.5])
    # the phantom label holds lungs (chest) and liver/spleen (abdomen)
    assert sidecar["top_region_index"] == [0, 1, 0, 0] and sidecar["bottom_region_index"] == [0, 0, 1, 0]
    assert sidecar["encoding"] == "sample"

    b_sidecar = json.loads((out / "sub" / "b_emb.nii.gz.json").read_text())
    assert "top_region_index" not in b_sidecar and b_sidecar["spacing"] == pytest.approx([2.0, 2.0, 2.0])
    assert nib.load(out / "sub" / "b_emb.nii.gz").shape == (4, 4, 4, 4)

    listed = json.loads((out / "embeddings.json").read_text())["training"]
    assert [item["image"] for item in listed] == ["a_emb.nii.gz", "sub/b_emb.nii.gz"]
    assert listed[0]["spacing"] == sidecar["spacing"] and listed[0]["top_region_index"] == [0, 1, 0, 0]
    assert all((out / item["image"]).is_file() for item in listed)


def test_rerun_skips_existing_and_redoes_missing_identically(tiny_model, datalist, tmp_path):
    spec_path, weights = tiny_model
    spec = get_model(str(spec_path))
    out = tmp_path / "emb"
    embed_datalist(spec, datalist, out, weights_dir=weights, seed=3)
    first_a = (out / "a_emb.nii.gz").read_bytes()
    first_b = (out / "sub" / "b_emb.nii.gz").read_bytes()
    mtime = (out / "sub" / "b_emb.nii.gz").stat().st_mtime_ns
    (out / "a_emb.nii.gz").unlink()
    summary = embed_datalist(spec, datalist, out, weights_dir=weights, seed=3)
    assert summary["written"] == ["a_emb.nii.gz"] and summary["skipped"] == ["sub/b_emb.nii.gz"]
    assert (out / "sub" / "b_emb.nii.gz").stat().st_mtime_ns == mtime
    assert (out / "a_emb.nii.gz").read_bytes() == first_a  # file k's noise comes from (seed, k) alone
    assert (out / "sub" / "b_emb.nii.gz").read_bytes() == first_b
    assert len(json.loads((out / "embeddings.json").read_text())["training"]) == 2


def test_seed_and_mean_change_the_encoding(tiny_model, datalist, tmp_path):
    spec_path, weights = tiny_model
    spec = get_model(str(spec_path))
    read = lambda folder: nib.load(folder / "a_emb.nii.gz").get_fdata()  # noqa: E731
    embed_datalist(spec, datalist, tmp_path / "s0", weights_dir=weights, seed=0)
    embed_datalist(spec, datalist, tmp_path / "s0b", weights_dir=weights, seed=0)
    embed_datalist(spec, datalist, tmp_path / "s1", weights_dir=weights, seed=1)
    embed_datalist(spec, datalist, tmp_path / "m0", weights_dir=weights, seed=0, mean=True)
    embed_datalist(spec, datalist, tmp_path / "m1", weights_dir=weights, seed=1, mean=True)
    assert np.array_equal(read(tmp_path / "s0"), read(tmp_path / "s0b"))
    assert not np.allclose(read(tmp_path / "s0"), read(tmp_path / "s1"))
    assert np.array_equal(read(tmp_path / "m0"), read(tmp_path / "m1"))  # the mean needs no noise
    assert not np.allclose(read(tmp_path / "m0"), read(tmp_path / "s0"))
    assert json.loads((tmp_path / "m0" / "a_emb.nii.gz.json").read_text())["encoding"] == "mean"


def test_cli_data_embed(tiny_model, datalist, tmp_path):
    spec_path, weights = tiny_model
    out = tmp_path / "emb"
    result = CliRunner().invoke(app, ["data", "embed", str(datalist), "--out", str(out), "--model", str(spec_path),
                                      "--weights-dir", str(weights), "--mean", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["items"] == 2 and summary["encoding"] == "mean"
    assert (out / "embeddings.json").is_file()


def test_cli_data_embed_missing_image_is_one_clear_error(tiny_model, tmp_path):
    spec_path, weights = tiny_model
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    result = CliRunner().invoke(app, ["data", "embed", str(datalist), "--out", str(tmp_path / "e"), "--model",
                                      str(spec_path), "--weights-dir", str(weights)])
    assert result.exit_code == 1
    assert "nope.nii.gz' does not exist" in result.stderr

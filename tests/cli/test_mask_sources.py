"""`maisi generate` without --mask: candidate masks from a database, or masks generated for requested organ and
tumour sizes. Tiny random networks; the plumbing and the choices are checked, not image quality."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.masks.database import read_database
from tests.helpers import phantom_labels, write_mask, write_tiny_model

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, ["--json", "generate", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def mask_folder(root: Path) -> Path:
    """Four phantom label maps: three at 32^3 / 2 mm (one with a lung tumour), one at 40^3 / 1.6 mm."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c"):
        write_mask(root / f"{name}.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    # large lungs around the tumour, so the lung branch's moves (up to ±20 voxels) stay inside them
    tumour = np.zeros((32, 32, 32), dtype=np.uint8)
    tumour[1:31, 1:31, 1:31] = 200
    tumour[2:16, 2:30, 6:30] = 28
    tumour[16:30, 2:30, 6:30] = 29
    tumour[2:30, 2:30, 1:6] = 1
    tumour[20:23, 14:17, 17:20] = 23
    write_mask(root / "tumour.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), labels=tumour)
    write_mask(root / "large.nii.gz", (40, 40, 40), (1.6, 1.6, 1.6))
    return root


@pytest.fixture
def database(tmp_path: Path) -> Path:
    folder = mask_folder(tmp_path / "masks")
    result = runner.invoke(app, ["--quiet", "data", "masks", "index", str(folder)])
    assert result.exit_code == 0, result.stderr
    return folder / "candidate_masks.json"


def test_database_exact_matches_give_each_sample_its_own_mask(tiny_model, database, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    report = invoke("--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database),
                    "--anatomy", "liver", "--no-augment", "--no-qc", "-n", "3", "--out", str(out))
    assert report["written"] == [0, 1, 2]
    assert report["plan"]["mask"]["match"] == "exact" and report["plan"]["mask"]["candidates"] == 3
    chosen = []
    for k in range(3):
        source = json.loads((out / f"sample_{k:04d}.json").read_text())["mask_source"]
        assert source["type"] == "database" and source["resampled"] is False
        chosen.append(source["entry"])
        labels = np.asarray(nib.load(out / f"sample_{k:04d}_label.nii.gz").dataobj)
        np.testing.assert_array_equal(labels, phantom_labels((32, 32, 32)))
    # three samples, three different candidates; the tumour mask is excluded since no tumour was asked for
    assert sorted(chosen) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]

    # sharding picks the same masks
    sharded = tmp_path / "sharded"
    invoke("--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database), "--anatomy",
           "liver", "--no-augment", "--no-qc", "-n", "3", "--shard", "1/2", "--out", str(sharded))
    assert json.loads((sharded / "sample_0001.json").read_text())["mask_source"]["entry"] == chosen[1]


def test_database_tumour_request_and_augmentation(tiny_model, database, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    invoke("--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database),
           "--anatomy", "lung tumor", "--no-qc", "--seed", "3", "--out", str(out))
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["mask_source"]["entry"] == "tumour.nii.gz" and sidecar["mask_source"]["augmented"] is True
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    assert (labels == 23).any()
    again = tmp_path / "again"
    invoke("--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database),
           "--anatomy", "lung tumor", "--no-qc", "--seed", "3", "--out", str(again))
    assert (out / "sample_0000_label.nii.gz").read_bytes() == (again / "sample_0000_label.nii.gz").read_bytes()


def test_database_closest_match_is_resampled(tiny_model, database, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    report = invoke("--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database),
                    "--no-augment", "--no-qc", "--size", "48x48x48", "--spacing", "1.5", "--out", str(out))
    assert report["plan"]["mask"]["match"] == "closest (resampled)"
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["mask_source"]["resampled"] is True
    # every tumour-free candidate survives resampling; the seeded order picks among them (as the reference)
    assert sidecar["mask_source"]["entry"] in {"a.nii.gz", "b.nii.gz", "c.nii.gz", "large.nii.gz"}
    image = nib.load(out / "sample_0000_image.nii.gz")
    assert image.shape == (48, 48, 48)
    np.testing.assert_allclose(image.header.get_zooms(), (1.5, 1.5, 1.5), rtol=1e-5)


def test_quality_retry_takes_the_next_candidate(tiny_model, database, tmp_path):
    spec, weights = tiny_model
    impossible = tmp_path / "stats.json"
    impossible.write_text(json.dumps({"liver": {"min_median": 0, "max_median": 1, "percentile_0_5": 5000,
                                                "percentile_99_5": 6000, "sigma_6_low": 5000, "sigma_6_high": 6000,
                                                "sigma_12_low": 5000, "sigma_12_high": 6000}}))
    out = tmp_path / "out"
    report = invoke("--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database),
                    "--anatomy", "liver", "--no-augment", "--stats", str(impossible), "--max-attempts", "2",
                    "--out", str(out))
    assert report["qc_failed"] == [0]
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert len(sidecar["qc"]["attempts"]) == 2
    # attempt 1 of sample 0 of a 1-sample run takes candidate 0 + 1·1
    assert sidecar["mask_source"]["candidate"] == 1


def test_nothing_in_the_database_matches(tiny_model, database, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    result = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                 "--mask-database", str(database), "--anatomy", "brain", "--out", str(out)])
    assert result.exit_code == 1
    assert "mask database: no candidate" in result.stderr and "32x32x32 at 2x2x2 mm" in result.stderr
    assert not out.exists()


def test_released_database_and_archive_are_found_and_unpacked(tiny_model, tmp_path, monkeypatch):
    """Without --mask-database, the model's own database JSON and mask archive are used; the archive is unpacked
    once under MAISI_HOME."""
    spec, weights = tiny_model
    copied = tmp_path / "weights"
    shutil.copytree(weights, copied)
    folder = mask_folder(tmp_path / "staging" / "all_masks")
    entries = json.loads(runner.invoke(app, ["--json", "data", "masks", "index", str(folder)]).stdout)
    assert entries["entries"] == 5
    (copied / "datasets").mkdir()
    shutil.move(folder / "candidate_masks.json", copied / "datasets" / "candidate_masks.json")
    with zipfile.ZipFile(copied / "datasets" / "all_masks.zip", "w") as bundle:
        for path in folder.iterdir():
            bundle.write(path, f"all_masks/{path.name}")
    out = tmp_path / "out"
    invoke("--model", str(spec), "--weights-dir", str(copied), "--anatomy", "spleen", "--no-qc", "--out", str(out))
    unpacked = list((Path(tmp_path / "maisi-home" / "masks")).glob("all_masks-*"))
    assert len(unpacked) == 1 and (unpacked[0] / "all_masks" / "a.nii.gz").is_file()
    assert json.loads((out / "sample_0000.json").read_text())["mask_source"]["type"] == "database"


def test_missing_released_database_names_the_fetch_command(tiny_model, tmp_path):
    spec, weights = tiny_model
    result = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "datasets/candidate_masks.json" in result.stderr and "--component mask_database" in result.stderr


@pytest.fixture
def liver_generator(tmp_path: Path, tiny_model) -> tuple[Path, Path]:
    """The tiny model whose mask decoder always answers channel 1 (liver), with an anatomy-size table."""
    spec, weights = tiny_model
    copied = tmp_path / "weights"
    shutil.copytree(weights, copied)
    vae_path = copied / "models" / "mask_generation_autoencoder.pt"
    state = torch.load(vae_path, weights_only=True)
    last = sorted(k for k in state if k.startswith("decoder.") and k.endswith(".conv.weight"))
    final = max(last, key=lambda k: int(k.split(".")[2]))
    state[final].zero_()
    bias = final.replace("weight", "bias")
    state[bias].zero_()
    state[bias][1] = 5.0
    torch.save(state, vae_path)
    (copied / "datasets").mkdir(exist_ok=True)
    rows = [{"organ_size": [0.2, 0.3, 0.4, 0.5, 0.6, -1, -1, -1, -1, -1]},
            {"organ_size": [0.2, 0.8, 0.4, 0.5, 0.6, -1, -1, 0.5, -1, -1]}]
    (copied / "datasets" / "all_anatomy_size_conditions.json").write_text(json.dumps(rows))
    return spec, copied


def test_generated_mask_for_requested_sizes(liver_generator, tmp_path):
    spec, weights = liver_generator
    out = tmp_path / "out"
    report = invoke("--model", str(spec), "--weights-dir", str(weights), "--anatomy", "liver:0.75",
                    "--mask-steps", "3", "--no-qc", "--label-mode", "requested", "--out", str(out))
    assert report["plan"]["mask"]["type"] == "generated"
    # nearest row is the second (|0.8 - 0.75| < |0.3 - 0.75|); liver overwritten; its hepatic tumour inherited
    assert report["plan"]["mask"]["condition"] == [0.2, 0.75, 0.4, 0.5, 0.6, -1, -1, 0.5, -1, -1]
    assert report["plan"]["mask"]["target_tumour"] == 26
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["mask_source"]["type"] == "generated" and sidecar["anatomy_sizes"] == {"liver": 0.75}
    assert set(sidecar["weights"]) == {"autoencoder", "diffusion_unet", "controlnet", "mask_generation_autoencoder",
                                       "mask_generation_diffusion"}  # the mask generator's files are recorded too
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1} and (labels == 1).any()
    image = nib.load(out / "sample_0000_image.nii.gz")
    assert image.shape == (32, 32, 32)  # the 48 mm generated cube, padded to the 64 mm requested
    np.testing.assert_allclose(image.header.get_zooms(), (2.0, 2.0, 2.0))


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (["--anatomy", "liver:1.5"], "within [0, 1]", 2),
        (["--anatomy", "lung tumor:0.5", "--anatomy", "bone lesion:0.5"], "at most one tumour", 2),
        (["--anatomy", "spleen:0.5"], "size control covers only", 2),
        (["--anatomy", "liver:big"], "SIZE must be a number", 2),
        (["--anatomy", "liver:0.5", "--anatomy", "spleen"], "not both", 2),
        (["--anatomy", "liver:0.5", "--mask", "x.nii.gz"], "drop --mask", 2),
        (["--body-region", "chest"], "takes no body-region input", 2),
    ],
)
def test_bad_mask_requests(liver_generator, tmp_path, args, fragment, code):
    spec, weights = liver_generator
    out = tmp_path / "out"
    result = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                 "--out", str(out), *args])
    assert result.exit_code == code, result.stderr
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_offline_without_the_size_table(tiny_model, tmp_path):
    spec, weights = tiny_model
    result = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                 "--anatomy", "liver:0.5", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "all_anatomy_size_conditions.json" in result.stderr


def test_ddpm_model_takes_body_regions_from_the_database_entry(tmp_path, database):
    """ddpm-ct's layout: the region inputs come from the chosen entry; --body-region filters the database."""
    spec, weights = write_tiny_model(tmp_path / "tiny-ddpm", scheduler="ddpm", mask_generator=False)
    out = tmp_path / "out"
    invoke("--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database), "--steps", "2",
           "--anatomy", "liver", "--body-region", "abdomen", "--no-augment", "--no-qc", "--out", str(out))
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["mask_source"]["type"] == "database"
    assert sidecar["body_region"] == [1, 2]  # the phantoms span chest (lungs) to abdomen (liver)
    refused = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                  "--mask-database", str(database), "--anatomy", "liver", "--body-region", "pelvis",
                                  "--out", str(tmp_path / "none")])
    assert refused.exit_code == 1 and "body region" in refused.stderr


def test_corrupt_archive_and_broken_database_are_one_line_errors(tiny_model, tmp_path):
    spec, weights = tiny_model
    copied = tmp_path / "weights"
    shutil.copytree(weights, copied)
    (copied / "datasets").mkdir()
    (copied / "datasets" / "candidate_masks.json").write_text(json.dumps([
        {"pseudo_label_filename": "a.nii.gz", "label_list": [1, 200], "dim": [32, 32, 32], "spacing": [2, 2, 2]}]))
    (copied / "datasets" / "all_masks.zip").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "out"
    corrupt = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(copied),
                                  "--out", str(out)])
    assert corrupt.exit_code == 1 and len(corrupt.stderr.strip().splitlines()) == 1
    assert "not a readable zip" in corrupt.stderr and not out.exists()

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"pseudo_label_filename": "a.nii.gz", "dim": [32, 32, 32], "spacing": [2, 2, 2]}]))
    missing_field = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                        "--mask-database", str(broken), "--out", str(out)])
    assert missing_field.exit_code == 1 and len(missing_field.stderr.strip().splitlines()) == 1
    assert "entry 0 field 'label_list'" in missing_field.stderr and not out.exists()


def released_masks(tmp_path: Path, weights: Path, archive_members: dict[str, bytes] | None = None,
                   entries: list[dict] | None = None) -> Path:
    """A copy of the tiny model's weights with its released database and mask archive in datasets/: the phantom
    folder's by default, else the given archive members and database entries."""
    copied = tmp_path / "weights"
    shutil.copytree(weights, copied)
    (copied / "datasets").mkdir()
    folder = mask_folder(tmp_path / "staging" / "all_masks")
    if entries is None:
        assert runner.invoke(app, ["--quiet", "data", "masks", "index", str(folder)]).exit_code == 0
        entries = json.loads((folder / "candidate_masks.json").read_text())
    (copied / "datasets" / "candidate_masks.json").write_text(json.dumps(entries))
    if archive_members is None:
        archive_members = {f"all_masks/{p.name}": p.read_bytes() for p in folder.glob("*.nii.gz")}
    with zipfile.ZipFile(copied / "datasets" / "all_masks.zip", "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, payload in archive_members.items():
            bundle.writestr(name, payload)
    return copied


def unpacked_masks(tmp_path: Path) -> list[Path]:
    """What MAISI_HOME/masks holds besides lock files."""
    home = tmp_path / "maisi-home" / "masks"
    return [p for p in home.iterdir() if not p.name.endswith(".lock")] if home.exists() else []


def test_dry_run_never_unpacks_the_archive(tiny_model, tmp_path):
    """--dry-run reads the database and the archive's directory, says where the archive would be unpacked, and
    writes nothing; the run unpacks it when the masks are first needed (here closest matches, tried once there)."""
    spec, weights = tiny_model
    copied = released_masks(tmp_path, weights)
    args = ["--model", str(spec), "--weights-dir", str(copied), "--no-augment", "--no-qc", "--size", "48x48x48",
            "--spacing", "1.5", "--out", str(tmp_path / "out")]
    plan = invoke(*args, "--dry-run")["plan"]["mask"]
    target = tmp_path / "maisi-home" / "masks" / "all_masks-"
    assert plan["archive"] == str(copied / "datasets" / "all_masks.zip")
    assert plan["unpacked"].startswith(f"not yet: would be unpacked into {target}")
    assert plan["match"] == "closest (resampled)"
    table = runner.invoke(app, ["generate", *args, "--dry-run"])
    assert table.exit_code == 0 and "not yet" in table.stdout and "unpacked" in table.stdout
    assert unpacked_masks(tmp_path) == [] and not (tmp_path / "out").exists()

    report = invoke(*args)
    assert report["written"] == [0] and report["plan"]["mask"]["unpacked"].startswith(f"in {target}")
    assert len(unpacked_masks(tmp_path)) == 1
    sidecar = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    assert sidecar["mask_source"]["resampled"] is True


def test_zip_bomb_archive_is_refused_without_unpacking(tiny_model, tmp_path):
    spec, weights = tiny_model
    entries = [{"pseudo_label_filename": "a.nii.gz", "label_list": [1, 200], "dim": [32, 32, 32],
                "spacing": [2, 2, 2]}]
    copied = released_masks(tmp_path, weights, {"all_masks/a.nii.gz": bytes(80 * 2**20)}, entries)
    archive = copied / "datasets" / "all_masks.zip"
    assert archive.stat().st_size < 2**20
    for extra in (["--dry-run"], []):
        result = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(copied),
                                     "--no-qc", "--out", str(tmp_path / "out"), *extra])
        assert result.exit_code == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"'{archive}' would unpack to 80.0 MiB, over the limit of 100x" in lines[0]
    assert unpacked_masks(tmp_path) == [] and not (tmp_path / "out").exists()


def test_database_entries_must_stay_inside_the_mask_folder(tiny_model, tmp_path):
    """An entry that leaves the database's folder ('../', an absolute path, a link out) is refused at plan time
    in one line naming the database, the entry and the option; --allow-outside-database reads it."""
    spec, weights = tiny_model
    outside = write_mask(tmp_path / "outside.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "link.nii.gz").symlink_to(outside)
    database = folder / "db.json"
    out = tmp_path / "out"
    args = ["--model", str(spec), "--weights-dir", str(weights), "--mask-database", str(database), "--no-qc",
            "--no-augment", "--out", str(out)]
    for name in ("../outside.nii.gz", str(outside), "link.nii.gz", "sub/../../outside.nii.gz"):
        database.write_text(json.dumps([{"pseudo_label_filename": name, "label_list": [1, 200],
                                         "dim": [32, 32, 32], "spacing": [2, 2, 2]}]))
        refused = runner.invoke(app, ["--quiet", "generate", *args, "--dry-run"])
        assert refused.exit_code == 1, (name, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and f"'{database}' entry '{name}' lies outside" in lines[0], lines
        assert "--allow-outside-database" in lines[0]
    assert not out.exists()

    database.write_text(json.dumps([{"pseudo_label_filename": "../outside.nii.gz", "label_list": [1, 200],
                                     "dim": [32, 32, 32], "spacing": [2, 2, 2]}]))
    invoke(*args, "--allow-outside-database")
    assert json.loads((out / "sample_0000.json").read_text())["mask_source"]["entry"] == "../outside.nii.gz"

    # the released layout: checked as written before the archive is unpacked
    entries = [{"pseudo_label_filename": "../outside.nii.gz", "label_list": [1, 200], "dim": [32, 32, 32],
                "spacing": [2, 2, 2]}]
    copied = released_masks(tmp_path / "released", weights, {"all_masks/a.nii.gz": b"1"}, entries)
    refused = runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--weights-dir", str(copied),
                                  "--no-qc", "--out", str(tmp_path / "none"), "--dry-run"])
    assert refused.exit_code == 1 and "'../outside.nii.gz' lies outside the unpacked mask archive" in refused.stderr
    assert unpacked_masks(tmp_path) == []


def test_index_refuses_paths_that_generate_would_refuse(tmp_path):
    """`maisi data masks index` writes only paths inside the database's folder: a database beside the mask folder,
    or a link out of it, is refused in one line and nothing is written."""
    folder = tmp_path / "labels"
    folder.mkdir()
    write_mask(folder / "a.nii.gz", (16, 16, 16), (2.0, 2.0, 2.0))
    beside = tmp_path / "elsewhere" / "db.json"
    result = runner.invoke(app, ["--quiet", "data", "masks", "index", str(folder), "--out", str(beside)])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "'../labels/a.nii.gz'" in result.stderr and "maisi generate" in result.stderr
    assert not beside.exists()

    outside = write_mask(tmp_path / "outside.nii.gz", (16, 16, 16), (2.0, 2.0, 2.0))
    (folder / "link.nii.gz").symlink_to(outside)
    result = runner.invoke(app, ["--quiet", "data", "masks", "index", str(folder)])
    assert result.exit_code == 1 and "link.nii.gz" in result.stderr and "'../outside.nii.gz'" in result.stderr
    assert not (folder / "candidate_masks.json").exists()
    (folder / "link.nii.gz").unlink()
    above = runner.invoke(app, ["--quiet", "data", "masks", "index", str(folder), "--out", str(tmp_path / "db.json")])
    assert above.exit_code == 0 and read_database(tmp_path / "db.json")[0].pseudo_label_filename == "labels/a.nii.gz"

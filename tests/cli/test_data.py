"""`maisi data masks index`: a candidate-mask database from a user's folder of label maps."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.masks.database import read_database
from tests.helpers import write_mask

runner = CliRunner()


def test_index_writes_a_database_the_finder_reads(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    write_mask(folder / "one.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    write_mask(folder / "two.nii", (48, 48, 32), (1.5, 1.5, 2.0))
    result = runner.invoke(app, ["--json", "data", "masks", "index", str(folder), "--out", str(tmp_path / "db.json")])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "database": str(tmp_path / "db.json"), "entries": 2,
                                         "root": str(folder.resolve()), "mask_labels": "maisi", "without_body": []}
    entries = read_database(tmp_path / "db.json")
    assert [e.pseudo_label_filename for e in entries] == ["labels/one.nii.gz", "labels/two.nii"]  # from db.json
    assert entries[1].dim == (48, 48, 32) and entries[1].spacing == (1.5, 1.5, 2.0)
    assert 200 in entries[0].label_list and entries[0].region_span() == (1, 2)


def test_index_default_output_and_errors(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    empty = runner.invoke(app, ["data", "masks", "index", str(folder)])
    assert empty.exit_code == 1 and "holds no .nii" in empty.stderr

    labels = np.zeros((8, 8, 8), dtype=np.uint16)
    labels[2:6, 2:6, 2:6] = 300
    write_mask(folder / "wide.nii.gz", (8, 8, 8), (1.0, 1.0, 1.0), dtype=np.uint16, labels=labels)
    wide = runner.invoke(app, ["data", "masks", "index", str(folder)])
    assert wide.exit_code == 1 and "0..255" in wide.stderr
    assert not (folder / "candidate_masks.json").exists()

    (folder / "wide.nii.gz").unlink()
    write_mask(folder / "ok.nii.gz", (16, 16, 16), (1.0, 1.0, 1.0))
    done = runner.invoke(app, ["--quiet", "data", "masks", "index", str(folder)])
    assert done.exit_code == 0 and (folder / "candidate_masks.json").exists()
    missing = runner.invoke(app, ["data", "masks", "index", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a folder" in missing.stderr

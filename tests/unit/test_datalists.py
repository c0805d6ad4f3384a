"""io/datalists.py: the one reader and writer of MONAI-style datalists (trainers, embed, phantoms, fid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.io.datalists import read_datalist, read_image_paths, write_datalist


class NothingToTrain(MaisiError):
    pass


class Unreadable(MaisiError):
    pass


def test_written_datalist_reads_back_with_paths_made_absolute(tmp_path):
    items = [{"image": "a_image.nii.gz", "label": "a_label.nii.gz", "fold": 0},
             {"image": "sub/b.nii.gz", "fold": 1}]
    path = tmp_path / "data" / "datalist.json"
    path.parent.mkdir()
    write_datalist(path, items)
    assert json.loads(path.read_text()) == {"training": items}
    assert path.read_text().endswith("\n") and '\n  "training"' in path.read_text()  # indent 2, as the sidecars

    read = read_datalist(path)
    assert [item["image"] for item in read] == [str((path.parent / "a_image.nii.gz").resolve()),
                                                str((path.parent / "sub" / "b.nii.gz").resolve())]
    assert read[0]["label"] == "a_label.nii.gz" and read[1]["fold"] == 1  # other fields as written
    assert read_image_paths(path, "REAL", unreadable=Unreadable) == [Path(item["image"]) for item in read]


@pytest.mark.parametrize(("document", "error", "message"), [
    ([], UsageError, r'^--data: .* must hold \{"training": \[\{"image": …\}, …\]\}, not a list$'),
    ({"training": {}}, UsageError, r'^--data: .* must hold \{"training"'),
    ({"training": [{"label": "x"}]}, UsageError, r'^--data: .* training item 0 has no "image" path$'),
    ({"training": []}, NothingToTrain, r'^--data: .* has an empty training split; list .* under "training"$'),
])
def test_read_datalist_errors_name_the_option_and_raise_the_callers_error_when_empty(tmp_path, document, error,
                                                                                      message):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(document))
    with pytest.raises(error, match=message):
        read_datalist(path, empty_error=NothingToTrain)


def test_read_datalist_names_the_callers_option(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("{")
    with pytest.raises(UsageError, match=r"^DATALIST: .* is not valid JSON \(line 1, column 2\)"):
        read_datalist(path, "DATALIST")


def test_image_paths_take_a_plain_list_and_expand_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "files.json"
    path.write_text(json.dumps(["a.nii.gz", {"image": " b.nii "}, "~/c.nii.gz"]))
    assert read_image_paths(path, "SYNTH", unreadable=Unreadable) == [
        (tmp_path / "a.nii.gz").resolve(), (tmp_path / "b.nii").resolve(), (tmp_path / "home" / "c.nii.gz").resolve()]


@pytest.mark.parametrize(("text", "error", "message"), [
    (None, Unreadable, r"^REAL: cannot read '.*missing.json' \(No such file or directory\)$"),
    ("[1", UsageError, r"^REAL: .* is not valid JSON \(line 1\); give "),
    ('{"validation": []}', UsageError, r'^REAL: .* must hold \{"training": \[\{"image": "…"\}, …\]\} or a list'),
    ('[""]', UsageError, r"^REAL: .* item 0 has no image path; give "),
])
def test_image_paths_errors(tmp_path, text, error, message):
    path = tmp_path / ("missing.json" if text is None else "list.json")
    if text is not None:
        path.write_text(text)
    with pytest.raises(error, match=message):
        read_image_paths(path, "REAL", unreadable=Unreadable)

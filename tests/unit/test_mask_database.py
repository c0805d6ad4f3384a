"""The candidate-mask database: exact match, closest-match order and cut-off, tumour and region filters, seeded
order, database validation, safe archive unpacking."""

from __future__ import annotations

import copy
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from maisi_cli.engine.masks import archive as archive_module
from maisi_cli.engine.masks.archive import inspect_archive, unpack_archive
from maisi_cli.engine.masks.database import (MaskDatabaseError, MaskEntry, climbs_out, closeness, find_candidates,
                                             index_folder, read_database, region_indices, shuffled)
from maisi_cli.errors import UsageError
from tests.helpers import phantom_labels, write_mask

CHEST = [0, 1, 0, 0]
ABDOMEN = [0, 0, 1, 0]


def entry(name, labels, dim, spacing, top=None, bottom=None) -> MaskEntry:
    return MaskEntry(pseudo_label_filename=name, label_list=labels, dim=dim, spacing=spacing,
                     top_region_index=top, bottom_region_index=bottom)


def test_exact_matches_need_the_same_grid_float_for_float():
    entries = [
        entry("a", [1, 200], (512, 512, 128), (0.75, 0.75, 4.0)),
        entry("b", [1, 200], (512, 512, 128), (0.75, 0.75, 4.0000001)),
        entry("c", [1, 200], (512, 512, 256), (0.75, 0.75, 4.0)),
    ]
    found, resample = find_candidates(entries, [1], [], (512, 512, 128), (0.75, 0.75, 4.0), needed=1)
    assert [e.pseudo_label_filename for e in found] == ["a"] and resample is False


def test_closest_match_order_follows_the_reference_score():
    size, spacing = (256, 256, 256), (1.5, 1.5, 1.5)
    near = entry("near", [1], (256, 256, 240), (1.5, 1.5, 1.6))  # z: |384-384|/10 + 16/100 + 0.1 = 0.26
    mid = entry("mid", [1], (300, 300, 256), (1.3, 1.3, 1.5))  # x,y: |390-384|/10 + 44/100 + 0.2 = 1.24 each
    far = entry("far", [1], (512, 512, 512), (0.8, 0.8, 0.8))  # x,y,z: |409.6-384|/10 + 2.56 + 0.7 = 5.82 each
    assert closeness(near, size, spacing) == pytest.approx(0.26)
    assert closeness(mid, size, spacing) == pytest.approx(2.48)
    assert closeness(far, size, spacing) == pytest.approx(3 * 5.82)
    found, resample = find_candidates([far, mid, near], [1], [], size, spacing, needed=1)
    assert resample is True and [e.pseudo_label_filename for e in found] == ["near", "mid", "far"]


def test_candidates_more_than_64_voxels_smaller_are_dropped():
    size, spacing = (256, 256, 256), (1.5, 1.5, 1.5)
    entries = [entry("small", [1], (191, 256, 256), (1.5, 1.5, 1.5)),
               entry("edge", [1], (192, 256, 256), (2.0, 1.5, 1.5))]
    entries += [entry(f"e{i}", [1], (256 + 8 * i, 256, 256), (1.0, 1.5, 1.5)) for i in range(10)]
    found, _ = find_candidates(entries, [1], [], size, spacing, needed=1)
    names = [e.pseudo_label_filename for e in found]
    assert "small" not in names and len(names) == 11
    assert names[0] == "edge"  # 192 = 256 - 64 is still allowed, and its FOV matches exactly
    assert names[1:] == [f"e{i}" for i in range(9, -1, -1)]  # nearer FOV first


def test_tumours_are_excluded_unless_requested():
    grid = ((256, 256, 256), (1.5, 1.5, 1.5))
    entries = [entry("plain", [1, 28, 200], *grid), entry("tumour", [1, 23, 28, 200], *grid)]
    found, _ = find_candidates(entries, [28], [], *grid, needed=1)
    assert [e.pseudo_label_filename for e in found] == ["plain"]
    found, _ = find_candidates(entries, [28, 23], [], *grid, needed=1)
    assert [e.pseudo_label_filename for e in found] == ["tumour"]


def test_body_region_filter_uses_the_entry_span():
    grid = ((256, 256, 256), (1.5, 1.5, 1.5))
    entries = [entry("chest", [1], *grid, top=CHEST, bottom=CHEST),
               entry("chest-abdomen", [1], *grid, top=CHEST, bottom=ABDOMEN),
               entry("no-regions", [1], *grid)]
    found, _ = find_candidates(entries, [1], region_indices(["abdomen"]), *grid, needed=1)
    assert sorted(e.pseudo_label_filename for e in found) == ["chest-abdomen", "no-regions"]
    found, _ = find_candidates(entries, [1], region_indices(["Thorax", "abdomen"]), *grid, needed=1)
    assert sorted(e.pseudo_label_filename for e in found) == ["chest-abdomen", "no-regions"]
    with pytest.raises(UsageError, match="'knee' is not a region"):
        region_indices(["knee"])


def test_nothing_matching_names_the_constraint_and_the_nearest_grids():
    entries = [entry("a", [1, 200], (512, 512, 128), (0.8, 0.8, 2.5)), entry("b", [3, 200], (256, 256, 256), (1.5,) * 3)]
    with pytest.raises(MaskDatabaseError) as failure:
        find_candidates(entries, [22], [], (256, 256, 256), (1.5,) * 3, needed=1)
    message = str(failure.value)
    assert "2 anatomy" in message and "256x256x256 at 1.5x1.5x1.5 mm" in message and "--mask" in message


def test_order_is_fixed_by_the_seed():
    candidates = [entry(f"m{i}", [1], (256,) * 3, (1.5,) * 3) for i in range(20)]
    first = [e.pseudo_label_filename for e in shuffled(candidates, 5)]
    assert first == [e.pseudo_label_filename for e in shuffled(candidates, 5)]
    assert first != [e.pseudo_label_filename for e in shuffled(candidates, 6)]
    assert sorted(first) == sorted(e.pseudo_label_filename for e in candidates)


def test_database_with_missing_fields_names_entry_and_field(tmp_path):
    path = tmp_path / "db.json"
    path.write_text(json.dumps([{"pseudo_label_filename": "a.nii.gz", "label_list": [1], "dim": [4, 4, 4],
                                 "spacing": [1, 1, 1]},
                                {"pseudo_label_filename": "b.nii.gz", "label_list": [1], "dim": [4, 4, 4]}]))
    with pytest.raises(MaskDatabaseError, match="entry 1 field 'spacing'"):
        read_database(path)
    path.write_text("{}")
    with pytest.raises(MaskDatabaseError, match="JSON list"):
        read_database(path)
    path.write_text("[")
    with pytest.raises(MaskDatabaseError, match="not valid JSON"):
        read_database(path)


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, payload in members.items():
            bundle.writestr(name, payload)
    return path


@pytest.mark.parametrize("bad", ["../escape.nii.gz", "masks/../../escape.nii.gz", "/etc/passwd", "C:/x.nii.gz"])
def test_archive_with_an_escaping_path_is_refused_before_writing(tmp_path, bad):
    assert climbs_out(bad)
    archive = make_zip(tmp_path / "masks.zip", {"masks/good.nii.gz": b"1", bad: b"2"})
    with pytest.raises(MaskDatabaseError, match="outside its folder"):
        unpack_archive(archive, tmp_path / "cache")
    assert not (tmp_path / "escape.nii.gz").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_archive_unpacks_once_even_with_two_takers(tmp_path):
    archive = make_zip(tmp_path / "masks.zip", {f"masks/m{i}.nii.gz": bytes([i]) * 1000 for i in range(50)})
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(unpack_archive(archive, tmp_path / "cache")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1]
    assert (results[0] / "masks" / "m7.nii.gz").read_bytes() == bytes([7]) * 1000
    marker_time = (results[0] / ".maisi-complete").stat().st_mtime_ns
    assert unpack_archive(archive, tmp_path / "cache") == results[0]
    assert (results[0] / ".maisi-complete").stat().st_mtime_ns == marker_time  # not unpacked again
    assert [p.name for p in (tmp_path / "cache").iterdir() if "partial" in p.name] == []


def test_corrupt_archive(tmp_path):
    archive = tmp_path / "masks.zip"
    archive.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(MaskDatabaseError, match="not a readable zip"):
        unpack_archive(archive, tmp_path / "cache")


def test_index_folder_builds_entries_with_regions(tmp_path):
    folder = tmp_path / "labels"
    (folder / "sub").mkdir(parents=True)
    write_mask(folder / "a.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    body = np.zeros((16, 16, 8), dtype=np.uint8)
    body[2:14, 2:14, 1:7] = 200
    write_mask(folder / "sub" / "b.nii.gz", (16, 16, 8), (1.0, 1.0, 3.0), labels=body)
    entries = index_folder(folder)
    assert [e["pseudo_label_filename"] for e in entries] == ["a.nii.gz", "sub/b.nii.gz"]
    first = entries[0]
    assert first["label_list"] == sorted(set(np.unique(phantom_labels((32, 32, 32))).tolist()) - {0})
    assert first["dim"] == [32, 32, 32] and first["spacing"] == [2.0, 2.0, 2.0]
    assert first["top_region_index"] == CHEST and first["bottom_region_index"] == ABDOMEN  # lungs + liver
    assert "top_region_index" not in entries[1]  # body only: no landmark
    assert MaskEntry.model_validate(first).region_span() == (1, 2)


def nothing_unpacked(cache: Path) -> bool:
    """The cache holds at most the lock files: no unpacked folder, no partial one."""
    return not cache.exists() or not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def make_bomb(path: Path, megabytes: int = 80) -> Path:
    """A zip of a few hundred KB that honestly declares and holds `megabytes` MiB of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("masks/a.nii.gz", b"1")
        bundle.writestr("masks/zeros.nii.gz", bytes(megabytes * 2**20))
    return path


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = make_bomb(tmp_path / "bomb.zip")
    assert archive.stat().st_size < 2**20
    for check in (inspect_archive, lambda path: unpack_archive(path, tmp_path / "cache")):
        with pytest.raises(MaskDatabaseError) as refused:
            check(archive)
        message = str(refused.value)
        assert f"'{archive}'" in message and "80.0 MiB" in message and "the limit of 100x" in message
        assert "\n" not in message
    assert nothing_unpacked(tmp_path / "cache")


def test_size_and_member_limits_and_their_override(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "masks.zip", {f"masks/m{i}.nii.gz": os.urandom(40_000) for i in range(3)})
    monkeypatch.setenv(archive_module.LIMIT_VARIABLE, "0.0001")  # about 105 KB: under the 120 KB declared
    with pytest.raises(MaskDatabaseError, match="over the limit of 104.9 KiB \\(set MAISI_MASK_ARCHIVE_MAX_GIB"):
        unpack_archive(archive, tmp_path / "cache")
    assert nothing_unpacked(tmp_path / "cache")
    monkeypatch.setenv(archive_module.LIMIT_VARIABLE, "lots")
    with pytest.raises(MaskDatabaseError, match="MAISI_MASK_ARCHIVE_MAX_GIB: 'lots' is not a size"):
        unpack_archive(archive, tmp_path / "cache")
    monkeypatch.delenv(archive_module.LIMIT_VARIABLE)

    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 2)
    with pytest.raises(MaskDatabaseError, match="holds 3 members, over the limit of 2"):
        unpack_archive(archive, tmp_path / "cache")
    assert nothing_unpacked(tmp_path / "cache")
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 3)
    assert (unpack_archive(archive, tmp_path / "cache") / "masks" / "m2.nii.gz").stat().st_size == 40_000


def test_bytes_written_are_counted_not_the_declared_sizes(tmp_path, monkeypatch):
    """A directory that under-declares its members (a reader that trusts it would write them whole): extraction
    stops past the declared size and leaves nothing behind."""
    archive = make_zip(tmp_path / "masks.zip", {"masks/a.nii.gz": b"1", "masks/big.nii.gz": bytes(3 * 2**20)})
    true_sizes = {}
    real_infolist, real_open = zipfile.ZipFile.infolist, zipfile.ZipFile.open

    def lying_infolist(self):
        declared = []
        for member in real_infolist(self):
            true_sizes[member.filename] = member.file_size
            member = copy.copy(member)
            member.file_size = min(member.file_size, 1000)
            declared.append(member)
        return declared

    def honest_open(self, member, *args, **kwargs):
        if isinstance(member, zipfile.ZipInfo):
            member = copy.copy(member)
            member.file_size = true_sizes[member.filename]
        return real_open(self, member, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "infolist", lying_infolist)
    monkeypatch.setattr(zipfile.ZipFile, "open", honest_open)
    with pytest.raises(MaskDatabaseError, match="'masks/big.nii.gz' unpacks past its declared 1000 bytes"):
        unpack_archive(archive, tmp_path / "cache")
    assert nothing_unpacked(tmp_path / "cache")

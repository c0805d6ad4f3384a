"""`--mask DIR`: TotalSegmentator's default output (one binary file per class, named by class) read as one label map
in the scheme's class ids (issue 22, item 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi_cli.engine import memory
from maisi_cli.engine.masks.class_folder import (class_folder_header, read_class_folder,
                                                 sha256_of_class_folder)
from maisi_cli.engine.masks.user import converted_labels
from maisi_cli.errors import MaskError, UsageError
from maisi_cli.io.nifti import read_nifti
from maisi_cli.label_schemes import label_scheme
from maisi_cli.labels import label_dictionary
from tests.cli.test_mask_labels import TS_ID, TS_TOTAL
from tests.helpers import phantom_labels

SIZE = (24, 24, 24)
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, -100.0], [0, 0, 0, 1]])  # LPS-like, as CTs are
MAISI = label_dictionary()


def write_binary(path: Path, mask: np.ndarray, dtype=np.uint8, affine: np.ndarray = AFFINE, value=1) -> Path:
    nib.save(nib.Nifti1Image((mask.astype(bool) * value).astype(dtype), affine), str(path))
    return path


def maisi_phantom() -> np.ndarray:
    """The phantom's organs in MAISI ids (liver, spleen, two lung lobes) and a right kidney; no body label, as a
    segmenter writes none."""
    labels = phantom_labels(SIZE)
    labels[labels == 200] = 0
    labels[14:18, 4:8, 2:6] = MAISI["right kidney"]
    return labels


def totalsegmentator_folder(folder: Path, maisi: np.ndarray) -> np.ndarray:
    """The MAISI map as TotalSegmentator writes it: all 117 class files of task "total", named as its published
    class map names them, each binary; the classes the map lacks as all-zero files. Returns the map in TS ids."""
    ts_of = {MAISI["liver"]: TS_ID["liver"], MAISI["spleen"]: TS_ID["spleen"],
             MAISI["right kidney"]: TS_ID["kidney_right"], MAISI["left lung upper lobe"]: TS_ID["lung_upper_lobe_left"],
             MAISI["left lung lower lobe"]: TS_ID["lung_lower_lobe_left"]}
    assert set(np.unique(maisi)) - {0} == set(ts_of)
    ts = np.zeros(SIZE, dtype=np.uint8)
    for maisi_id, ts_id in ts_of.items():
        ts[maisi == maisi_id] = ts_id
    folder.mkdir()
    for ident, name in enumerate(TS_TOTAL, start=1):
        write_binary(folder / f"{name}.nii.gz", ts == ident)
    return ts


def test_a_totalsegmentator_folder_gives_the_maisi_ids_of_the_same_map_as_one_file(tmp_path):
    maisi = maisi_phantom()
    folder = tmp_path / "segmentations"
    ts = totalsegmentator_folder(folder, maisi)
    assert len(list(folder.iterdir())) == 117
    scheme = label_scheme("totalsegmentator")

    merged, affine, warnings = read_class_folder(folder, scheme)
    assert merged.dtype == np.uint8 and warnings == []
    np.testing.assert_array_equal(merged, ts)
    np.testing.assert_allclose(affine, AFFINE)
    converted, unmapped = converted_labels(merged, scheme, folder)
    np.testing.assert_array_equal(converted, maisi)  # TS 5 (liver) is MAISI 1, TS 2 (kidney_right) MAISI 5, …
    assert unmapped == ()
    assert (converted == MAISI["liver"]).sum() == (ts == TS_ID["liver"]).sum() > 0

    one_file = tmp_path / "ts.nii.gz"
    nib.save(nib.Nifti1Image(ts, AFFINE), str(one_file))
    data, file_affine = read_nifti(one_file)
    np.testing.assert_array_equal(converted_labels(data, scheme, one_file)[0], converted)
    np.testing.assert_allclose(file_affine, affine)


def test_the_header_gives_the_grid_and_the_merged_dtype_before_any_voxel(tmp_path):
    folder = tmp_path / "segmentations"
    totalsegmentator_folder(folder, maisi_phantom())
    header = class_folder_header(folder, scheme=label_scheme("totalsegmentator"))
    assert header.shape == SIZE and header.dtype == np.uint8
    np.testing.assert_allclose(header.affine, AFFINE)
    assert class_folder_header(folder).dtype == np.uint16  # no scheme: the widest map read_class_folder makes


def test_a_file_on_another_grid_is_refused_naming_it(tmp_path):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    write_binary(folder / "liver.nii.gz", phantom_labels(SIZE) == 1)
    write_binary(folder / "spleen.nii.gz", np.zeros((24, 24, 20)))
    scheme = label_scheme("totalsegmentator")
    with pytest.raises(MaskError, match=r"--mask: '.*spleen.nii.gz' is on another grid \(24x24x20 .*all class files"):
        class_folder_header(folder, scheme=scheme)
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.5  # one voxel along x: the same shape, another place
    write_binary(folder / "spleen.nii.gz", np.zeros(SIZE), affine=shifted)
    with pytest.raises(MaskError, match=r"spleen.nii.gz' is on another grid .*\(31.5, 20, -100\) mm"):
        read_class_folder(folder, scheme)


@pytest.mark.parametrize("dtype, value, slope", [(np.uint8, 1, None), (np.uint8, 255, None), (np.float32, 1.0, None),
                                                 (np.int16, 1, 255.0)])
def test_binary_files_are_read_as_any_tool_writes_them(tmp_path, dtype, value, slope):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    liver = phantom_labels(SIZE) == 1
    image = nib.Nifti1Image((liver * value).astype(dtype), AFFINE)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)  # stored 0/1, read 0/255
    nib.save(image, str(folder / "liver.nii"))
    merged, _, _ = read_class_folder(folder, label_scheme("totalsegmentator"))
    np.testing.assert_array_equal(merged, np.where(liver, TS_ID["liver"], 0))


@pytest.mark.parametrize("values, dtype, found", [((1, 2), np.uint8, "values from 1 to 2"),
                                                  ((5,), np.uint8, "the value 5"),
                                                  ((0.5,), np.float32, "the value 0.5"),
                                                  ((1, np.nan), np.float32, "non-finite values"),
                                                  ((-1,), np.int16, "the value -1")])
def test_a_file_that_is_not_binary_is_refused_naming_it(tmp_path, values, dtype, found):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    write_binary(folder / "liver.nii.gz", phantom_labels(SIZE) == 1)
    data = np.zeros(SIZE, dtype=dtype)
    for k, value in enumerate(values):
        data[k, k, k] = value
    nib.save(nib.Nifti1Image(data, AFFINE), str(folder / "spleen.nii.gz"))
    with pytest.raises(MaskError, match=rf"'.*spleen.nii.gz' holds {found}.* besides 0; each class file must be "
                                        r"binary .*as --mask FILE"):
        read_class_folder(folder, label_scheme("totalsegmentator"))


def test_a_file_named_after_no_class_is_refused_with_the_fix_and_other_files_are_ignored(tmp_path):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    liver = phantom_labels(SIZE) == 1
    write_binary(folder / "liver.nii.gz", liver)
    (folder / "statistics.json").write_text("{}")  # TotalSegmentator --statistics
    (folder / "preview_total.png").write_bytes(b"\x89PNG")
    (folder / "._liver.nii.gz").write_bytes(b"\0\5\26\7")  # a macOS resource fork: not a NIfTI file
    (folder / "sub").mkdir()
    merged, _, _ = read_class_folder(folder, label_scheme("totalsegmentator"))
    np.testing.assert_array_equal(merged, np.where(liver, TS_ID["liver"], 0))

    write_binary(folder / "livr.nii.gz", liver)
    write_binary(folder / "segmentations.nii.gz", liver)  # a --ml file put beside the class files
    with pytest.raises(UsageError, match=r"--mask: in '.*', livr.nii.gz, segmentations.nii.gz name no class of "
                                         r"--mask-labels totalsegmentator; name each file after a class \(`maisi "
                                         r"labels --scheme totalsegmentator` lists them\), give the --mask-labels"):
        read_class_folder(folder, label_scheme("totalsegmentator"))
    with pytest.raises(UsageError, match="livr.nii.gz"):
        class_folder_header(folder, scheme=label_scheme("totalsegmentator"))  # before any voxel is read


def test_a_folder_without_nifti_files_or_with_two_files_for_one_class_is_refused(tmp_path):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    (folder / "statistics.json").write_text("{}")
    with pytest.raises(MaskError, match=r"--mask: the folder '.*' holds no .nii or .nii.gz file; give "
                                        "TotalSegmentator's output folder"):
        read_class_folder(folder, label_scheme("totalsegmentator"))
    write_binary(folder / "right_kidney.nii.gz", np.zeros(SIZE))
    write_binary(folder / "Kidney_Right.nii", np.zeros(SIZE))  # TotalSegmentator's name for the same anatomy
    with pytest.raises(MaskError, match=r"'Kidney_Right.nii' and 'right_kidney.nii.gz' .* both name class 5 "
                                        r"\(right kidney\); keep one"):
        read_class_folder(folder, label_scheme("maisi"))


def test_a_maisi_named_folder_reads_with_the_maisi_scheme_in_any_spelling(tmp_path):
    folder = tmp_path / "vista"
    folder.mkdir()
    regions = {"right_kidney.nii.gz": (slice(2, 6), "right kidney"), "Liver.nii.gz": (slice(6, 10), "liver"),
               "hepatic tumor.nii.gz": (slice(10, 12), "hepatic tumor"),
               "kidney_left.nii.gz": (slice(12, 16), "left kidney"),  # TotalSegmentator's name, as --anatomy takes
               "body.nii.gz": (slice(16, 20), "body")}
    expected = np.zeros(SIZE, dtype=np.uint8)
    for name, (rows, anatomy) in regions.items():
        mask = np.zeros(SIZE, dtype=bool)
        mask[rows, 4:20, 4:20] = True
        write_binary(folder / name, mask, dtype=np.int16)
        expected[mask] = MAISI[anatomy]
    for scheme_name in ("maisi", "vista3d"):
        merged, _, warnings = read_class_folder(folder, label_scheme(scheme_name))
        assert merged.dtype == np.uint8 and warnings == []
        np.testing.assert_array_equal(merged, expected)
        np.testing.assert_array_equal(converted_labels(merged, label_scheme(scheme_name), folder)[0], expected)


def test_a_body_file_beside_totalsegmentator_classes_is_the_body_label(tmp_path):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    maisi = phantom_labels(SIZE)  # body 200 with the organs inside it
    write_binary(folder / "body.nii.gz", maisi != 0)  # TotalSegmentator -ta body, whose body holds the organs
    write_binary(folder / "liver.nii.gz", maisi == 1)
    write_binary(folder / "spleen.nii.gz", maisi == 3)
    scheme = label_scheme("totalsegmentator")
    merged, _, warnings = read_class_folder(folder, scheme)
    expected = np.where(maisi == 1, 1, np.where(maisi == 3, 3, np.where(maisi != 0, 200, 0)))
    np.testing.assert_array_equal(converted_labels(merged, scheme, folder)[0], expected)
    assert warnings == []  # the organs lie in the body by design: no overlap to report
    small_body = (maisi == 1) & (np.indices(SIZE)[0] < 8)
    assert 0 < small_body.sum() < (maisi == 1).sum()
    write_binary(folder / "body.nii.gz", small_body)  # a body smaller than the liver still gives way to it
    merged, _, _ = read_class_folder(folder, scheme)
    organs = np.where(np.isin(maisi, (1, 3)), maisi, 0)
    np.testing.assert_array_equal(converted_labels(merged, scheme, folder)[0], organs)


def test_overlapping_files_give_each_voxel_to_the_smallest_structure_whatever_the_ids(tmp_path):
    folder = tmp_path / "hand-made"
    folder.mkdir()
    big, middle, small, twin = (np.zeros(SIZE, dtype=bool) for _ in range(4))
    big[2:20, 2:20, 2:20] = True  # stomach, MAISI 12: the largest
    middle[4:12, 4:12, 4:12] = True  # liver, MAISI 1: a lower id, smaller than the stomach
    small[6:8, 6:8, 6:8] = True  # spleen, MAISI 3: inside both
    twin[14:16, 14:16, 14:17] = True  # pancreas (4) and duodenum (13): the same size, one place
    for name, mask in (("stomach", big), ("liver", middle), ("spleen", small), ("pancreas", twin),
                       ("duodenum", twin)):
        write_binary(folder / f"{name}.nii.gz", mask)
    merged, _, warnings = read_class_folder(folder, label_scheme("maisi"))
    expected = np.zeros(SIZE, dtype=np.uint8)
    expected[big], expected[middle], expected[small], expected[twin] = 12, 1, 3, 13  # a tie: the higher id
    np.testing.assert_array_equal(merged, expected)
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning.startswith("--mask: class files of 'hand-made' overlap: ")
    for pair in ("liver.nii.gz and spleen.nii.gz share 8 voxels, given to spleen.nii.gz",
                 "liver.nii.gz and stomach.nii.gz share 504 voxels, given to liver.nii.gz",  # 512 less the spleen's 8
                 "spleen.nii.gz and stomach.nii.gz share 8 voxels, given to spleen.nii.gz",
                 "pancreas.nii.gz and duodenum.nii.gz share 12 voxels, given to duodenum.nii.gz"):
        assert pair in warning, warning
    assert "the smallest structure (the file with the fewest voxels)" in warning


def test_the_digest_names_the_class_files_content(tmp_path):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    liver = phantom_labels(SIZE) == 1
    write_binary(folder / "liver.nii.gz", liver)
    write_binary(folder / "spleen.nii.gz", phantom_labels(SIZE) == 3)
    first = sha256_of_class_folder(folder)
    assert len(first) == 64 and sha256_of_class_folder(folder) == first
    (folder / "statistics.json").write_text(json.dumps({"liver": 1}))
    assert sha256_of_class_folder(folder) == first  # files maisi does not read leave it alone
    changed = liver.copy()
    changed[0, 0, 0] = True
    write_binary(folder / "liver.nii.gz", changed)
    second = sha256_of_class_folder(folder)
    assert second != first
    (folder / "spleen.nii.gz").rename(folder / "kidney_right.nii.gz")
    assert sha256_of_class_folder(folder) not in (first, second)


def test_links_inside_the_folder_are_read_links_out_of_it_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    liver = phantom_labels(SIZE) == 1
    folder = store / "segmentations"
    folder.mkdir()
    (folder / ".versions").mkdir()
    write_binary(folder / ".versions" / "liver-2.nii.gz", liver)
    os.symlink(".versions/liver-2.nii.gz", folder / "liver.nii.gz")  # inside the folder: read
    linked_folder = tmp_path / "latest"
    os.symlink(folder, linked_folder)  # the folder named through a link, as a --mask file may be
    merged, _, _ = read_class_folder(linked_folder, label_scheme("totalsegmentator"))
    np.testing.assert_array_equal(merged, np.where(liver, TS_ID["liver"], 0))

    write_binary(store / "spleen-elsewhere.nii.gz", phantom_labels(SIZE) == 3)
    os.symlink("../spleen-elsewhere.nii.gz", folder / "spleen.nii.gz")
    with pytest.raises(MaskError, match=r"'.*spleen.nii.gz' is a link to '../spleen-elsewhere.nii.gz', outside the "
                                        "folder; a class folder reads only its own files"):
        read_class_folder(folder, label_scheme("totalsegmentator"))
    with pytest.raises(MaskError, match="outside the folder"):
        sha256_of_class_folder(linked_folder)
    (folder / "spleen.nii.gz").unlink()
    (folder / "stomach.nii.gz").mkdir()
    with pytest.raises(MaskError, match=r"'.*stomach.nii.gz' is a directory, not a mask file; remove it"):
        class_folder_header(folder)


def test_a_table_of_ones_own_with_ids_past_255_gives_a_uint16_map(tmp_path):
    table = tmp_path / "ids.json"
    table.write_text(json.dumps({"300": "liver", "7": None}))
    scheme = label_scheme(str(table))
    folder = tmp_path / "segmentations"
    folder.mkdir()
    liver = phantom_labels(SIZE) == 1
    write_binary(folder / "class_300.nii.gz", liver)  # such a table names its classes "class <id>"
    assert class_folder_header(folder, scheme=scheme).dtype == np.uint16
    merged, _, _ = read_class_folder(folder, scheme)
    assert merged.dtype == np.uint16 and merged.max() == 300
    np.testing.assert_array_equal(converted_labels(merged, scheme, folder)[0], np.where(liver, 1, 0))


def test_a_folder_too_large_for_the_host_memory_is_refused_before_reading(tmp_path, monkeypatch):
    folder = tmp_path / "segmentations"
    totalsegmentator_folder(folder, maisi_phantom())
    monkeypatch.setattr(memory, "available_host_memory", lambda: 1000)
    with pytest.raises(UsageError, match=r"--mask: reading the 117 class files of '.*' \(24x24x24\) into one label "
                                         r"map needs about .* GiB of host memory .*crop or downsample the masks"):
        read_class_folder(folder, label_scheme("totalsegmentator"))


def test_class_files_are_read_in_parallel_but_merged_in_order_with_bounded_reads_in_flight():
    import threading
    import time

    from maisi_cli.engine.masks.class_folder import read_in_order

    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def read(path):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.02 if int(path.name) % 2 else 0.001)  # odd files slower: they finish out of order
        with lock:
            state["now"] -= 1
        if path.name == "7":
            raise MaskError(f"bad {path.name}")
        return int(path.name)

    paths = [Path(str(i)) for i in range(12)]
    assert list(read_in_order(paths[:7], read, 3)) == list(range(7))
    assert 2 <= state["most"] <= 3  # overlapped, never more than three reads at once
    got = []
    with pytest.raises(MaskError, match="bad 7"):  # the first failure in the files' order, after those before it
        for value in read_in_order(paths, read, 3):
            got.append(value)
    assert got == list(range(7))

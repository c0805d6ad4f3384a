"""io/dicom.py: a CT series and a DICOM SEG read back by independent readers (dcm2niix, pydicom, highdicom's segread,
dciodvfy) equal to the volume and label map they were written from, on the NIfTI's geometry; byte-reproducible."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi_cli.errors import OutputError, UsageError
from maisi_cli.io import dicom
from maisi_cli.io.dicom import DicomIdentity, dicom_available, write_ct_series, write_segmentation

SHAPE = (32, 24, 16)
# RAS, non-identity spacing, an origin negative in x and z and positive in y
AFFINE = np.array([[0.8, 0, 0, -120.5], [0, 1.2, 0, 35.25], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
# the same kind of grid turned: x runs to the left, y along the first voxel axis, z down (every axis flipped or moved)
TURNED_AFFINE = np.array([[0, -0.7, 0, 40.0], [1.1, 0, 0, -60.0], [0, 0, -3.0, 12.5], [0, 0, 0, 1]])
IDENTITY = DicomIdentity(uid_key="0f" * 32 + ":3", model="rflow-ct", seed=1234567, sample_index=3,
                         software_version="0.1.0")
NAMES = {1: "liver", 5: "right kidney", 23: "lung tumor", 200: "body", 7: "aorta"}  # 7 is absent from the map
COLOURS = {1: (220, 20, 60), 5: (0, 128, 255), 23: (0, 255, 0), 200: (177, 122, 101), 7: (255, 255, 0)}


def ct_volume() -> np.ndarray:
    """int16 HU with no symmetry (each voxel's value tells its position), negative and positive values."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return ((i * 37 + j * 101 + k * 1009) % 4000 - 1024).astype(np.int16)


def label_map() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:31, 2:22, 0:16] = 200
    labels[3:12, 4:10, 2:9] = 1
    labels[20:27, 5:9, 6:13] = 5
    labels[14:16, 15:19, 10:11] = 23  # a small lesion on one slice
    return labels


def dicom_extra():
    pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
    return pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One CT series and its SEG, written once for the readers below."""
    dicom_extra()
    root = tmp_path_factory.mktemp("dicom")
    digests = write_ct_series(root / "ct", ct_volume(), AFFINE, IDENTITY)
    seg_digest = write_segmentation(root / "seg.dcm", label_map(), AFFINE, root / "ct", IDENTITY, NAMES, COLOURS)
    return root, digests, seg_digest


def read_series(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(path) for path in sorted(folder.iterdir())]


def voxels_of(instance, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, k) NIfTI voxel indices of each pixel of `instance` (rows × columns), from the DICOM geometry as pydicom
    reads it (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) mapped through the inverse RAS affine."""
    position = np.asarray(instance.ImagePositionPatient, float)
    orientation = np.asarray(instance.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in instance.PixelSpacing)
    rows, columns = np.meshgrid(np.arange(instance.Rows), np.arange(instance.Columns), indexing="ij")
    lps = (position[:, None, None] + orientation[:3, None, None] * column_spacing * columns
           + orientation[3:, None, None] * row_spacing * rows)
    ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
    voxel = np.einsum("ab,bxy->axy", np.linalg.inv(affine[:3, :3]), ras - affine[:3, 3][:, None, None])
    assert np.abs(voxel - np.round(voxel)).max() < 1e-3, "a pixel centre falls between the NIfTI's voxel centres"
    i, j, k = np.round(voxel).astype(int)
    return i, j, k


def test_dcm2niix_reconstructs_the_nifti_voxel_for_voxel_with_its_geometry(written, tmp_path):
    root, _, _ = written
    converter = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))
    if converter is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix; .ci/run installs it)")
    result = subprocess.run([converter, "-z", "n", "-b", "n", "-f", "back", "-o", str(tmp_path), str(root / "ct")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    back = nib.load(str(tmp_path / "back.nii"))
    assert back.get_data_dtype() == np.int16 and back.dataobj.slope in (None, 1.0) and back.dataobj.inter in (None, 0.0)
    ours = nib.as_closest_canonical(nib.Nifti1Image(ct_volume(), AFFINE))
    theirs = nib.as_closest_canonical(back)
    assert theirs.shape == ours.shape
    assert np.array_equal(np.asanyarray(theirs.dataobj), np.asanyarray(ours.dataobj))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)


@pytest.mark.parametrize("affine", [AFFINE, TURNED_AFFINE], ids=["ras", "turned"])
def test_every_instance_reads_back_with_pydicom_at_the_nifti_positions(written, tmp_path, affine):
    root, _, _ = written
    folder = root / "ct"
    if affine is TURNED_AFFINE:
        folder = tmp_path / "turned"
        write_ct_series(folder, ct_volume(), affine, IDENTITY)
    instances = read_series(folder)
    image = ct_volume()
    assert len(instances) == SHAPE[2]
    for number, instance in enumerate(instances, start=1):
        assert instance.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # Explicit VR Little Endian
        assert instance.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        assert instance.InstanceNumber == number
        pixels = instance.pixel_array
        assert pixels.dtype == np.int16
        assert (float(instance.RescaleSlope), float(instance.RescaleIntercept), instance.RescaleType) == (1, 0, "HU")
        i, j, k = voxels_of(instance, affine)
        assert np.array_equal(pixels, image[i, j, k])
        assert np.all(k == number - 1)  # instance n is the NIfTI's slice n - 1
    if affine is AFFINE:  # a RAS grid is shown as scanners write it: patient left to the right, posterior down
        assert [float(v) for v in instances[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in instances[0].PixelSpacing] == [1.2, 0.8]  # row spacing (y), column spacing (x)
        assert float(instances[0].SliceThickness) == float(instances[0].SpacingBetweenSlices) == 2.5


def test_the_series_is_marked_synthetic_and_names_the_model_and_seed(written):
    instance = read_series(written[0] / "ct")[0]
    assert str(instance.PatientName) == "MAISI^SYNTHETIC"
    assert instance.PatientID == f"MAISI-{IDENTITY.key_hash}-3"
    assert instance.PatientBirthDate == "" and instance.PatientSex == ""
    assert list(instance.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert instance.SyntheticData == "YES" and instance.Manufacturer == "maisi"
    assert "rflow-ct" in instance.SeriesDescription and "1234567" in instance.SeriesDescription
    assert "seed 1234567" in instance.ImageComments
    assert (float(instance.WindowCenter), float(instance.WindowWidth)) == (40, 400)
    assert (instance.StudyDate, instance.StudyTime) == ("20000101", "000000")


def test_segread_gives_each_segment_equal_to_its_label_with_its_name_and_colour(written):
    hd = dicom_extra()
    from pydicom import dcmread

    root, _, _ = written
    instances = read_series(root / "ct")
    seg = hd.seg.segread(root / "seg.dcm")
    labels = label_map()
    assert seg.StudyInstanceUID == instances[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == instances[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == instances[0].SeriesInstanceUID
    numbers = seg.get_segment_numbers()
    present = [1, 5, 23, 200]
    assert [seg.get_segment_description(n).SegmentLabel for n in numbers] == [NAMES[i] for i in present]
    for number, label in zip(numbers, present):
        rgb = hd.color.CIELabColor.from_dicom_value(
            seg.get_segment_description(number).RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, COLOURS[label])).max() <= 1
    frames = seg.get_pixels_by_source_instance([i.SOPInstanceUID for i in instances], segment_numbers=numbers,
                                               assert_missing_frames_are_empty=True)
    for n, instance in enumerate(instances):
        i, j, k = voxels_of(instance, AFFINE)
        for s, label in enumerate(present):
            assert np.array_equal(frames[n, :, :, s], labels[i, j, k] == label), (label, n)
    lesion = seg.get_segment_description(numbers[present.index(23)])
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert dcmread(root / "seg.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """dciodvfy's "Error" lines for `path` and its whole report. An error for Synthetic Data (0008,001C), a standard
    SOP Common attribute since DICOM 2022, is left out only when this dciodvfy's dictionary does not know the tag
    (Debian's dicom3tools of 2022-06 does not)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    outdated = "(0x0008,0x001c)  ?  - Warning - Unrecognized tag" in report
    errors = [line for line in report.splitlines() if line.startswith("Error")
              and not (outdated and "(0x0008,0x001c)" in line)]
    return errors, report


def test_dciodvfy_finds_no_error_in_a_ct_instance_or_the_seg(written):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
    root, _, _ = written
    for path in (root / "ct" / "slice_0001.dcm", root / "seg.dcm"):
        errors, report = dciodvfy_errors(path)
        assert not errors, f"{path.name}:\n{report}"


def test_writing_again_gives_the_same_bytes_and_another_key_other_uids(written, tmp_path):
    root, digests, seg_digest = written
    again = write_ct_series(tmp_path / "ct", ct_volume(), AFFINE, IDENTITY)
    assert again == digests and len(digests) == SHAPE[2]
    assert all((tmp_path / "ct" / name).read_bytes() == (root / "ct" / name).read_bytes() for name in digests)
    assert write_segmentation(tmp_path / "seg.dcm", label_map(), AFFINE, tmp_path / "ct", IDENTITY, NAMES,
                              COLOURS) == seg_digest
    assert (tmp_path / "seg.dcm").read_bytes() == (root / "seg.dcm").read_bytes()

    other = DicomIdentity(**{**IDENTITY.__dict__, "uid_key": "0f" * 32 + ":4"})
    write_ct_series(tmp_path / "other", ct_volume(), AFFINE, other)
    first, second = read_series(root / "ct")[0], read_series(tmp_path / "other")[0]
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    for key in keys:
        assert getattr(first, key) != getattr(second, key) and getattr(first, key).is_valid
        assert getattr(first, key).startswith("2.25.")
    uids = [getattr(instance, key) for instance in read_series(root / "ct") for key in keys]
    assert len(set(uids)) == 3 + SHAPE[2]  # one study, series, frame of reference; an instance UID per slice


def test_an_existing_folder_is_refused_and_a_failed_write_leaves_nothing(written, tmp_path, monkeypatch):
    (tmp_path / "ct").mkdir()
    with pytest.raises(OutputError, match="exists"):
        write_ct_series(tmp_path / "ct", ct_volume(), AFFINE, IDENTITY)

    original = dicom.ct_slice_bytes

    def fail_at_slice_5(template, layout, identity, index, frame):
        if index == 5:
            raise OSError(28, "No space left on device")
        return original(template, layout, identity, index, frame)

    monkeypatch.setattr(dicom, "ct_slice_bytes", fail_at_slice_5)
    with pytest.raises(OutputError, match="no space"):
        write_ct_series(tmp_path / "new", ct_volume(), AFFINE, IDENTITY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no folder, no temporary one


def test_a_label_map_on_another_grid_is_refused(written, tmp_path):
    root, _, _ = written
    shifted = AFFINE.copy()
    shifted[2, 3] += 2.5
    with pytest.raises(OutputError, match="not the CT series' grid"):
        write_segmentation(tmp_path / "seg.dcm", label_map(), shifted, root / "ct", IDENTITY, NAMES, COLOURS)
    assert not any(tmp_path.iterdir())


def test_dicom_available_names_the_extra_when_highdicom_is_missing(monkeypatch):
    dicom_extra()
    assert dicom_available() is None  # installed: nothing to say
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom now raises ImportError
    with pytest.raises(UsageError) as raised:
        dicom_available()
    assert str(raised.value) == "--format dicom: needs the dicom extra: pip install 'maisi[dicom]'"
    assert raised.value.exit_code == 2

"""NRRD outputs (io/nrrd.py), colour tables (io/colour_tables.py) and the one colour per label id (colours.py).

Read back by independent readers: pynrrd, SimpleITK (when installed), nibabel for the NIfTI the geometry is compared
with, and small parsers written here from the published formats of 3D Slicer's colour table and ITK-SNAP's label
description file. Colour distances are CIE76 ΔE computed here from the sRGB and CIELAB definitions.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from maisi_cli import colours
from maisi_cli.colours import label_colour, label_colour_table
from maisi_cli.engine import preview
from maisi_cli.engine.phantoms import PHANTOM_LABELS
from maisi_cli.io.colour_tables import itksnap_label_description_bytes, slicer_colour_table_bytes
from maisi_cli.io.nifti import write_nifti
from maisi_cli.io.nrrd import write_nrrd_image, write_seg_nrrd
from maisi_cli.labels import BODY_LABEL, label_dictionary

SHAPE = (32, 24, 16)
LPS = np.diag([-1.0, -1.0, 1.0])


def oblique_affine() -> np.ndarray:
    """Voxel-to-RAS: 0.8 x 0.9 x 2.5 mm voxels, rotated 20 degrees about z and 5 about x, the first axis mirrored
    (towards the patient's left, as a DICOM-derived grid), an origin off every axis."""
    a, b = math.radians(20), math.radians(5)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = about_z @ about_x @ np.diag([-1.0, 1.0, 1.0]) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [101.5, -87.25, -412.0]
    return affine


def ct_volume() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-1024, 3071, SHAPE, dtype=np.int16)


def label_volume() -> np.ndarray:
    """A body (200) holding a liver (1), a left kidney (14), vertebra L1 (37) and one voxel of a plugin-range id
    outside any dictionary (250)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:30, 1:23, 0:16] = BODY_LABEL
    labels[4:14, 5:15, 3:9] = 1
    labels[18:25, 3:8, 6:12] = 14
    labels[15:18, 18:22, 2:14] = 37
    labels[29, 22, 15] = 250
    return labels


# --- the CT image -------------------------------------------------------------------------------------------------
def nibabel_lps_geometry(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction) in LPS, as nibabel reads the NIfTI's affine."""
    affine = nib.load(str(path)).affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return LPS @ affine[:3, 3], spacing, LPS @ (affine[:3, :3] / spacing)


def test_the_image_nrrd_reads_back_equal_with_the_nifti_geometry(tmp_path):
    image, affine = ct_volume(), oblique_affine()
    write_nifti(tmp_path / "ct.nii.gz", image, affine)
    origin, spacing, direction = nibabel_lps_geometry(tmp_path / "ct.nii.gz")
    digest = write_nrrd_image(tmp_path / "ct.nrrd", image, affine)

    data, header = nrrd.read(str(tmp_path / "ct.nrrd"))
    assert data.dtype == np.int16 and np.array_equal(data, image)
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "gzip"
    np.testing.assert_allclose(header["space origin"], origin, atol=1e-4)
    np.testing.assert_allclose(header["space directions"], (direction * spacing).T, atol=1e-5)  # one row per axis

    first = (tmp_path / "ct.nrrd").read_bytes()
    assert write_nrrd_image(tmp_path / "ct.nrrd", image, affine) == digest
    assert (tmp_path / "ct.nrrd").read_bytes() == first  # no timestamp: the same array gives the same bytes
    assert b"GMT" not in first.split(b"\n\n")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "ct.nrrd"]  # no temporary left


def test_simpleitk_reads_the_image_nrrd_as_the_nifti(tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is the second independent NRRD reader")
    image, affine = ct_volume(), oblique_affine()
    write_nifti(tmp_path / "ct.nii.gz", image, affine)
    write_nrrd_image(tmp_path / "ct.nrrd", image, affine)
    origin, spacing, direction = nibabel_lps_geometry(tmp_path / "ct.nii.gz")
    read = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(read).transpose(2, 1, 0), image)  # SimpleITK gives (z, y, x)
    np.testing.assert_allclose(read.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(read.GetSpacing(), spacing, atol=1e-5)
    np.testing.assert_allclose(np.reshape(read.GetDirection(), (3, 3)), direction, atol=1e-5)
    nifti = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))  # and as SimpleITK itself places the NIfTI
    np.testing.assert_allclose(read.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), nifti.GetDirection(), atol=1e-5)


# --- the segmentation ---------------------------------------------------------------------------------------------
def segments_of(header: dict) -> dict[int, dict[str, str]]:
    """{segment index: {field: value}} from the Segment{N}_{field} entries of a header."""
    found: dict[int, dict[str, str]] = {}
    for key, value in header.items():
        match = re.fullmatch(r"Segment(\d+)_(\w+)", key)
        if match:
            found.setdefault(int(match[1]), {})[match[2]] = value
    return found


def extent_of(labels: np.ndarray, value: int) -> list[int]:
    where = np.nonzero(labels == value)
    return [int(bound) for axis in where for bound in (axis.min(), axis.max())]


def test_the_seg_nrrd_holds_the_labels_and_names_and_colours_each_one(tmp_path):
    labels, affine = label_volume(), oblique_affine()
    names = {ident: name for name, ident in label_dictionary().items()}
    digest = write_seg_nrrd(tmp_path / "labels.seg.nrrd", labels, affine, label_colour_table())

    data, header = nrrd.read(str(tmp_path / "labels.seg.nrrd"))
    assert data.dtype == np.uint8 and np.array_equal(data, labels)  # one layer: the label map itself
    assert header["space"] == "left-posterior-superior" and header["kinds"] == ["domain"] * 3
    np.testing.assert_allclose(header["space origin"], LPS @ affine[:3, 3], atol=1e-9)
    segments = segments_of(header)
    assert sorted(segments) == list(range(len(segments)))
    by_value = {int(s["LabelValue"]): s for s in segments.values()}
    assert sorted(by_value) == [1, 14, 37, BODY_LABEL, 250]
    for value, segment in by_value.items():
        assert segment["Name"] == names.get(value, f"label {value}")
        assert segment["ID"] == f"Segment_{value}" and segment["Layer"] == "0"
        rgb = [float(c) * 255 for c in segment["Color"].split()]
        np.testing.assert_allclose(rgb, label_colour(value), atol=1e-3)  # the colour preview draws
        assert [int(e) for e in segment["Extent"].split()] == extent_of(labels, value)
        assert segment["NameAutoGenerated"] == segment["ColorAutoGenerated"] == "0"  # Slicer keeps them
        assert f"maisi_label_id:{value}|" in segment["Tags"]
    assert by_value[1]["Name"] == "liver" and by_value[250]["Name"] == "label 250"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"

    first = (tmp_path / "labels.seg.nrrd").read_bytes()
    assert write_seg_nrrd(tmp_path / "labels.seg.nrrd", labels, affine, label_colour_table()) == digest
    assert (tmp_path / "labels.seg.nrrd").read_bytes() == first


def test_simpleitk_reads_the_seg_nrrd_labels_and_segment_fields(tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is the second independent NRRD reader")
    labels = label_volume()
    write_seg_nrrd(tmp_path / "labels.seg.nrrd", labels, oblique_affine(), label_colour_table())
    read = sitk.ReadImage(str(tmp_path / "labels.seg.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(read).transpose(2, 1, 0), labels)
    fields = {key: read.GetMetaData(key) for key in read.GetMetaDataKeys()}
    assert {s["Name"] for s in segments_of(fields).values()} == {"liver", "left kidney", "vertebrae L1", "body",
                                                                 "label 250"}


# --- colour tables ------------------------------------------------------------------------------------------------
def parse_slicer_table(text: str) -> dict[int, tuple[str, tuple[int, int, int], int]]:
    """Slicer's discrete colour table: `#` lines are comments; each other line is `ID NAME R G B A`."""
    rows = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        ident, name, r, g, b, a = line.split()
        assert int(ident) not in rows
        rows[int(ident)] = (name, (int(r), int(g), int(b)), int(a))
    return rows


ITKSNAP_LINE = re.compile(r'\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*')


def parse_itksnap(text: str) -> dict[int, tuple[str, tuple[int, int, int], float, int, int]]:
    """ITK-SNAP's label description: `#` lines are comments; each other line is
    `IDX R G B A VIS MSH "LABEL"` (A an opacity 0..1)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = ITKSNAP_LINE.fullmatch(line)
        assert match, line
        ident, r, g, b, alpha, visible, mesh, label = match.groups()
        assert int(ident) not in rows
        rows[int(ident)] = (label, (int(r), int(g), int(b)), float(alpha), int(visible), int(mesh))
    return rows


def test_the_slicer_colour_table_lists_every_dictionary_id_with_its_colour():
    payload = slicer_colour_table_bytes(label_colour_table())
    assert payload == slicer_colour_table_bytes(list(reversed(label_colour_table())))  # order of entries: no matter
    assert payload.startswith(b"# Color table file ")
    rows = parse_slicer_table(payload.decode("utf-8"))
    assert rows.pop(0) == ("Background", (0, 0, 0), 0)
    dictionary = label_dictionary()
    assert sorted(rows) == sorted(dictionary.values())
    for name, ident in dictionary.items():
        assert rows[ident] == (name.replace(" ", "_"), label_colour(ident), 255), name
    assert rows[5][0] == "right_kidney"


def test_the_itksnap_file_lists_every_dictionary_id_with_its_colour_and_a_clear_label():
    payload = itksnap_label_description_bytes(label_colour_table())
    assert payload == itksnap_label_description_bytes(label_colour_table())
    text = payload.decode("utf-8")
    assert "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL" in text
    rows = parse_itksnap(text)
    assert rows.pop(0) == ("Clear Label", (0, 0, 0), 0.0, 0, 0)
    dictionary = label_dictionary()
    assert sorted(rows) == sorted(dictionary.values())
    for name, ident in dictionary.items():
        assert rows[ident] == (name, label_colour(ident), 1.0, 1, 1), name


def test_colour_tables_refuse_an_id_twice_or_outside_a_uint8_map():
    with pytest.raises(ValueError, match="twice"):
        slicer_colour_table_bytes([(1, "liver", (1, 2, 3)), (1, "again", (1, 2, 3))])
    with pytest.raises(ValueError, match="0..255"):
        itksnap_label_description_bytes([(256, "big", (1, 2, 3))])


# --- the colours themselves ---------------------------------------------------------------------------------------
def cielab(rgb: tuple[int, int, int]) -> np.ndarray:
    """sRGB 0..255 → CIELAB under D65 (IEC 61966-2-1 transfer curve, CIE 1976 L*a*b*)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = to_xyz @ linear / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def closest_pair(ids) -> tuple[float, int, int]:
    labs = {i: cielab(label_colour(i)) for i in ids}
    return min((float(np.linalg.norm(labs[a] - labs[b])), a, b) for a, b in itertools.combinations(labs, 2))


# The organs a whole-body CT map shows most, by name (ΔE76 above 20: two thin contours side by side read as
# different colours at a glance; 2.3 is the just-noticeable difference of flat patches).
COMMON_ORGANS = (
    "liver", "spleen", "pancreas", "right kidney", "left kidney", "aorta", "inferior vena cava", "right adrenal gland",
    "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "bladder", "portal vein and splenic vein",
    "small bowel", "colon", "trachea", "airway", "heart", "brain", "left lung upper lobe", "left lung lower lobe",
    "right lung upper lobe", "right lung middle lobe", "right lung lower lobe", "spinal cord", "sternum", "sacrum",
    "left hip", "right hip", "left femur", "right femur", "left iliac artery", "right iliac artery",
    "left iliac vena", "right iliac vena", "superior vena cava", "pulmonary vein", "left autochthon",
    "right autochthon", "left iliopsoas", "right iliopsoas", "costal cartilages", "hepatic vessel", "hepatic tumor",
    "lung tumor", "pancreatic tumor",
)


def test_every_id_has_a_fixed_colour_that_is_not_a_grey_of_the_ct():
    for ident in range(1, 256):
        colour = label_colour(ident)
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        assert max(colour) - min(colour) >= 100, (ident, colour)  # never one of the CT's greys
        assert cielab(colour)[0] >= 39.9, (ident, colour)  # not too dark to see on a dark CT
    assert len({label_colour(i) for i in range(1, 256)}) == 255
    assert label_colour(0) == (0, 0, 0)
    assert label_colour(256) == label_colour(1) and label_colour(-1) == label_colour(254)  # int16 maps: in turn
    assert preview.label_colour is label_colour  # preview draws these very colours


def test_labels_seen_together_are_far_apart_in_cielab():
    names = label_dictionary()
    organs = [names[n] for n in COMMON_ORGANS]
    assert closest_pair(organs)[0] > 20, closest_pair(organs)
    shown = sorted(set(organs) | (PHANTOM_LABELS - {BODY_LABEL}))  # with the phantom's vertebrae and 24 ribs
    assert closest_pair(shown)[0] > 15, closest_pair(shown)
    named = sorted(i for n, i in names.items() if not n.startswith("dummy"))
    assert closest_pair(named)[0] > 12, closest_pair(named)
    assert closest_pair(range(1, 256))[0] > 10


def test_conventional_colours_and_the_table_equals_its_design():
    assert label_colour(label_dictionary()["aorta"]) == (230, 30, 40)  # arteries red
    assert label_colour(label_dictionary()["inferior vena cava"]) == (40, 90, 225)  # veins blue
    assert colours.COLOURS == colours.design_colours()  # the literal table is the documented design's output

"""engine/preview.py: windowing, --window/--slice parsing, orientation, contours, colours, layout (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_cli.engine import preview
from maisi_cli.errors import UsageError
from maisi_cli.labels import label_dictionary


# --- windows ------------------------------------------------------------------------------------------------------
def test_window_to_uint8_maps_the_window_linearly_and_clips():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0, np.nan])
    out = preview.window_to_uint8(hu, 40, 400)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255, 0]
    assert preview.window_to_uint8(np.array([-600.0]), -600, 1500).tolist() == [128]


@pytest.mark.parametrize("text, expected", [
    ("soft-tissue", (40.0, 400.0)), ("Lung", (-600.0, 1500.0)), ("bone", (400.0, 1800.0)),
    ("40,400", (40.0, 400.0)), ("-600, 1500", (-600.0, 1500.0)), ("12.5,80", (12.5, 80.0)),
])
def test_parse_window_accepts_names_and_level_width(text, expected):
    assert preview.parse_window(text) == expected


@pytest.mark.parametrize("text", ["brainz", "40", "40,400,1", "40x400", "a,b", "40,0", "40,-10", "nan,400", ""])
def test_parse_window_rejects_bad_values_naming_the_option(text):
    with pytest.raises(UsageError) as caught:
        preview.parse_window(text)
    assert str(caught.value).startswith("--window:")
    assert caught.value.exit_code == 2


def test_parse_slice_defaults_to_mid_planes_and_checks_the_range():
    assert preview.parse_slice(None, (40, 32, 25)) == (20, 16, 12)
    assert preview.parse_slice("0, 31,24", (40, 32, 25)) == (0, 31, 24)
    for text in ("1,2", "1,2,3,4", "a,b,c", "1.5,2,3", "40,0,0", "0,-1,0", "0,0,25"):
        with pytest.raises(UsageError) as caught:
            preview.parse_slice(text, (40, 32, 25))
        assert str(caught.value).startswith("--slice:"), text


# --- orientation --------------------------------------------------------------------------------------------------
def test_planes_are_shown_in_radiological_orientation():
    """A marker towards the patient's right, anterior and superior (RAS) sits, in the axial panel, top-left; in the
    coronal panel, top-left; in the sagittal panel, top-left (anterior on the viewer's left)."""
    volume = np.zeros((10, 8, 6))
    volume[8, 6, 4] = 1  # near +x (right), +y (anterior), +z (head)
    planes = preview.plane_slices(volume, (8, 6, 4))
    assert planes["axial"].shape == (8, 10) and planes["coronal"].shape == (6, 10) and planes["sagittal"].shape == (6, 8)
    assert np.argwhere(planes["axial"] == 1).tolist() == [[8 - 1 - 6, 10 - 1 - 8]]  # row 1 (anterior), col 1 (right)
    assert np.argwhere(planes["coronal"] == 1).tolist() == [[6 - 1 - 4, 10 - 1 - 8]]  # row 1 (head), col 1 (right)
    assert np.argwhere(planes["sagittal"] == 1).tolist() == [[6 - 1 - 4, 8 - 1 - 6]]  # row 1 (head), col 1 (anterior)


def test_to_canonical_reorients_an_las_volume_to_ras():
    """A volume stored left-to-right flipped (LAS, negative x spacing) is flipped back: the marker's RAS voxel and
    the spacing come out as in the RAS original."""
    ras = np.zeros((5, 4, 3), dtype=np.int16)
    ras[4, 1, 2] = 7
    las = ras[::-1]
    affine = np.diag([-2.0, 3.0, 4.0, 1.0])
    affine[0, 3] = 8.0
    data, canonical = preview.to_canonical(las, affine)
    np.testing.assert_array_equal(data, ras)
    assert preview.voxel_spacing(canonical) == (2.0, 3.0, 4.0)
    assert canonical[0, 0] > 0


def test_render_places_a_ras_marker_where_the_layout_says(tmp_path):
    """Through the rendered PNG: a bright voxel at the right-anterior-superior corner region shows in the top-left
    quarter of each panel, and panels keep square millimetres (anisotropic spacing)."""
    volume = np.full((20, 20, 10), -1000, dtype=np.int16)
    volume[15:19, 15:19, 7:9] = 1000  # right, anterior, superior
    result = preview.render_preview(volume, (1.0, 1.0, 2.0), index=(16, 16, 8), panel_size=100)
    pixels = np.asarray(result.image)
    header = preview.GAP + result.layout.header_lines * preview.HEADER_ROW  # the title, wrapped to the width
    assert result.image.size == result.layout.size == (3 * 100 + 4 * preview.GAP, header + preview.TITLE_HEIGHT
                                                       + 100 + preview.GAP)
    shapes = preview.display_shapes(volume.shape, (1.0, 1.0, 2.0), 100)
    assert shapes == {"axial": (100, 100), "coronal": (100, 100), "sagittal": (100, 100)}
    for position in range(3):
        left, top, right, bottom = result.layout.panel_box(position)
        panel = pixels[top:bottom, left:right].min(axis=-1)  # white (the orientation letters are amber)
        bright = np.argwhere(panel > 200)
        assert len(bright), position
        assert bright[:, 0].max() < 50 and bright[:, 1].max() < 50, position  # top-left quarter


def test_display_shapes_keep_millimetres_square():
    shapes = preview.display_shapes((100, 50, 20), (1.0, 1.0, 5.0), 200)
    # extents: 100, 50, 100 mm → 2 px per mm
    assert shapes["axial"] == (100, 200)  # rows: y (50 mm), columns: x (100 mm)
    assert shapes["coronal"] == (200, 200)
    assert shapes["sagittal"] == (200, 100)


def test_resample_nearest_keeps_label_values():
    plane = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(preview.resample_nearest(plane, (4, 4)),
                                  np.repeat(np.repeat(plane, 2, axis=0), 2, axis=1))


# --- contours and colours -----------------------------------------------------------------------------------------
def test_contour_mask_marks_the_boundary_of_each_label_and_skips_the_body():
    labels = np.full((9, 9), 200)
    labels[0, :] = 0
    labels[2:7, 2:7] = 1
    labels[4, 4] = 3  # a one-pixel organ inside the liver
    edge = preview.contour_mask(labels)
    expected = np.zeros((9, 9), dtype=bool)
    expected[2:7, 2:7] = True
    expected[3:6, 3:6] = False
    expected[3, 4] = expected[5, 4] = expected[4, 3] = expected[4, 5] = True  # liver pixels touching label 3
    expected[4, 4] = True  # label 3 itself
    np.testing.assert_array_equal(edge, expected)  # no body (200) or background pixel is drawn


def test_contour_mask_draws_nothing_on_a_uniform_label():
    assert not preview.contour_mask(np.ones((5, 5), dtype=np.uint8)).any()


def test_label_colours_are_fixed_saturated_and_distinct():
    ids = sorted(set(label_dictionary().values()))
    colours = [preview.label_colour(i) for i in ids]
    assert colours == [preview.label_colour(i) for i in ids]  # deterministic
    assert preview.label_colour(1) == preview.label_colour(1) and preview.label_colour(1) != preview.label_colour(3)
    assert len(set(colours)) == len(colours)
    for colour in colours:
        assert max(colour) - min(colour) >= 100, colour  # never a grey of the CT (maisi_cli/colours.py)


def test_label_names_come_from_the_dictionary():
    assert preview.label_name(1) == "liver"
    assert preview.label_name(200) == "body"
    assert preview.label_name(250) == "label 250"


def test_legend_lists_the_drawn_labels_with_swatches():
    labels = np.full((24, 24, 24), 200, dtype=np.uint8)
    labels[4:10, 4:10, 4:20] = 1
    labels[14:20, 14:20, 4:20] = 28
    labels[0:2, 0:2, 0:2] = 3  # not in any mid-plane
    image = np.zeros(labels.shape, dtype=np.int16)
    result = preview.render_preview(image, (1.0, 1.0, 1.0), labels, panel_size=96)
    assert result.labels == [1, 28]
    assert result.layout.legend_entries == 2 and result.image.size == result.layout.size
    pixels = np.asarray(result.image)
    for entry, ident in enumerate(result.labels):
        left, top, right, bottom = result.layout.swatch_box(entry)
        assert (pixels[top:bottom, left:right] == preview.label_colour(ident)).all()


def test_sample_preview_path(tmp_path):
    assert preview.sample_preview_path(tmp_path / "sample_0007_image.nii.gz") == tmp_path / "sample_0007_preview.png"
    assert preview.sample_preview_path(tmp_path / "ct.nii") == tmp_path / "ct_preview.png"

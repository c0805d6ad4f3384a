"""The body envelope (label 200): the upstream CT algorithm on phantoms lying on a scanner table, the label-only
approximation, and reading the CT on the mask's grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from maisi_cli.engine.masks.body import (BODY_METHOD_NOTE, BodyEnvelopeOptions, add_body_envelope, axial_axis_of,
                                         body_envelope_from_labels, dilate, erode, read_body_ct)
from maisi_cli.engine.phantoms import default_spacing, make_phantom
from maisi_cli.errors import UsageError

SIZE = (96, 96, 96)  # the phantom's 384 mm field of view at 4 mm
SPACING = default_spacing(SIZE)
SHELL_HU, CORE_HU = (100.0, 200.0), (-960.0, -900.0)  # carbon-fibre shells, foam core (reads as air)


def add_table(image: np.ndarray, labels: np.ndarray, kind: str, rng: np.random.Generator):
    """The phantom's CT with a scanner table under its back (array axis 1 runs posterior to anterior), curved
    across x and the same along z, drawn only outside the body: (ct int16, table mask, table's top shell mask).

    kind "mattress": a sandwich table (2-2.5 voxel shells of SHELL_HU around a 20-30 mm foam core) below a
    6-10 mm foam mattress (< -800 HU, as air); "slab": a 15-30 mm composite slab of -300..-100 HU, 4-8 mm of air
    below the back; "pressed": the sandwich table without a mattress, its top pressed against the back wherever
    the curve reaches it (a broad contact)."""
    body = labels > 0
    dy = SPACING[1]
    x = (np.arange(SIZE[0]) - (SIZE[0] - 1) / 2) * SPACING[0]
    y = np.arange(SIZE[1]) * dy
    back = np.where(body.any(axis=1), np.argmax(body, axis=1) * dy, np.inf)  # (X, Z): lowest body y, mm
    lowest = float(back.min())
    shell = rng.uniform(2.0, 2.5) * dy
    sandwich = [(shell, rng.uniform(*SHELL_HU)), (rng.uniform(20, 30), rng.uniform(*CORE_HU)),
                (shell, rng.uniform(*SHELL_HU))]
    curve = (lowest + x**2 / (2 * rng.uniform(600, 1000)))[:, None] * np.ones_like(back)
    if kind == "mattress":
        gap, gap_hu, layers, top = rng.uniform(6, 10), rng.uniform(-950, -880), sandwich, curve
    elif kind == "slab":
        gap, gap_hu, top = rng.uniform(4, 8), -1000.0, np.full_like(back, lowest)
        layers = [(rng.uniform(15, 30), rng.uniform(-300, -100))]
    else:
        gap, gap_hu, layers, top = 0.0, -1000.0, sandwich, curve
    top = np.minimum(top, back) - gap  # (X, Z), never into the body
    depth = top[:, None, :] - y[None, :, None]  # mm below the table's top surface
    bounds = [(-gap, 0.0, gap_hu)] if gap else []
    below = 0.0
    for thickness, hu in layers:
        bounds.append((below, below + thickness, hu))
        below += thickness
    ct = image.astype(np.float32)
    table = np.zeros(SIZE, dtype=bool)
    for low, high, hu in bounds:
        layer = (depth > low) & (depth <= high) & ~body
        ct[layer] = hu
        table |= layer
    ct[table] += rng.normal(0.0, 15.0, int(table.sum())).astype(np.float32)
    top_shell = (depth > 0) & (depth <= shell) & ~body
    return np.clip(ct, -1000, 1000).astype(np.int16), table, top_shell


def phantom_on_table(seed: int, kind: str):
    phantom = make_phantom(SIZE, SPACING, seed)
    ct, table, top_shell = add_table(phantom.image, phantom.labels, kind, np.random.default_rng(1000 + seed))
    organs = np.where(phantom.labels == 200, 0, phantom.labels).astype(np.uint8)
    return phantom, organs, ct, table, top_shell


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def test_ct_envelope_matches_the_phantom_body_and_leaves_the_table_out():
    rows = []
    for kind in ("mattress", "slab"):
        for seed in range(3):
            phantom, organs, ct, table, _ = phantom_on_table(seed, kind)
            out = add_body_envelope(organs, ct)
            score = dice(out > 0, phantom.labels > 0)
            rows.append((kind, seed, score, int(np.count_nonzero((out > 0) & table)), int(table.sum())))
            assert out.dtype == np.uint8
            assert np.array_equal(out[organs > 0], organs[organs > 0]), "an organ lost its label"
            assert set(np.unique(out[organs == 0])) <= {0, 200}
    print("\ntable     seed  Dice    table voxels labelled / table voxels")
    for kind, seed, score, labelled, total in rows:
        print(f"{kind:9s} {seed:4d}  {score:.4f}  {labelled} / {total}")
    assert all(score >= 0.98 for _, _, score, _, _ in rows)
    assert all(labelled == 0 for _, _, _, labelled, _ in rows)


def test_a_table_pressed_against_the_back_keeps_only_its_top_shell_where_it_touches():
    """Without a mattress, the sealed foam core holds the table to the patient through the opening (step 4): step 8
    drops the core, and the opening again drops the shells beside and below the patient. What touches the skin
    over a broad contact cannot be told from the skin at the voxel level (upstream's limit): only that part of the
    top shell may stay."""
    for seed in range(2):
        phantom, organs, ct, table, top_shell = phantom_on_table(seed, "pressed")
        out = add_body_envelope(organs, ct)
        labelled_table = (out > 0) & table
        assert dice(out > 0, phantom.labels > 0) >= 0.98
        assert not np.any(labelled_table & ~top_shell), "the core or the lower shell stayed in the body"
        assert np.count_nonzero(labelled_table) < 0.5 * np.count_nonzero(top_shell)


def test_a_present_body_label_and_any_organ_ids_are_kept():
    phantom, organs, ct, _, _ = phantom_on_table(0, "slab")
    wide = organs.astype(np.int32)
    partial = wide.copy()
    partial[40:50, 40:50, 40:50][partial[40:50, 40:50, 40:50] == 0] = 200  # some voxels already labelled body
    out = add_body_envelope(partial, ct)
    assert np.array_equal(out[partial > 0], partial[partial > 0].astype(np.uint8))
    assert dice(out > 0, phantom.labels > 0) >= 0.98


def test_without_bed_removal_the_table_joins_the_body(monkeypatch):
    """The Dice test's sensitivity: with step 4 (erode, largest component, dilate) skipped, the slab table is body."""
    from maisi_cli.engine.masks import body

    monkeypatch.setattr(body, "largest_component", lambda mask: mask)
    monkeypatch.setattr(body, "erode", lambda mask, size, outside: mask)
    phantom, organs, ct, table, _ = phantom_on_table(0, "slab")
    out = body.add_body_envelope(organs, ct)
    assert dice(out > 0, phantom.labels > 0) < 0.98 and np.count_nonzero((out > 0) & table) > 1000


@pytest.mark.parametrize("outside", [False, True])
def test_box_morphology_matches_scipy_cubes(outside):
    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((23, 19, 17)) > 0.6)
    mask[0, :, :] = True  # a face on the border, where the padding matters
    for size in (3, 5, 7):
        cube = np.ones((size,) * 3, dtype=bool)
        assert np.array_equal(dilate(mask, size), ndimage.binary_dilation(mask, cube))
        expected = ndimage.binary_erosion(mask, cube, border_value=int(outside))
        assert np.array_equal(erode(mask, size, outside), expected)
    # even edges (scipy's window: size // 2 before the voxel) and an axis shorter than the cube
    for shape, size in (((23, 19, 17), 4), ((23, 2, 17), 5), ((1, 19, 6), 3)):
        part = np.ascontiguousarray(mask[:shape[0], :shape[1], :shape[2]])
        view = part.view(np.uint8)
        grown = ndimage.maximum_filter(view, size, mode="constant", cval=0).astype(bool)
        shrunk = ndimage.minimum_filter(view, size, mode="constant", cval=int(outside)).astype(bool)
        assert np.array_equal(dilate(part, size), grown)
        assert np.array_equal(erode(part, size, outside), shrunk)


def reference_envelope(labels: np.ndarray, ct: np.ndarray, options: BodyEnvelopeOptions,
                       body_label: int = 200) -> np.ndarray:
    """add_body_envelope's eight steps (and its second opening after step 8) written as plainly as scipy.ndimage
    allows: the whole volume in every step, ndimage's binary morphology with full cubes, np.bincount for sizes."""
    def cube(size):
        return np.ones((size,) * 3, dtype=bool)

    def largest(mask):
        components, count = ndimage.label(mask, structure=cube(3))
        if count == 0:
            return np.zeros_like(mask)
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        return components == np.argmax(sizes)

    closing, bed = cube(options.closing_kernel), cube(options.bed_cleanup_kernel)
    out = labels.astype(np.uint8)
    labelled = out > 0
    air = largest(ct < options.hu_threshold)  # 1
    air = ndimage.binary_erosion(ndimage.binary_dilation(air, closing), closing, border_value=1)
    air &= ~labelled  # 2
    body = ndimage.binary_erosion(~air, bed, border_value=0)  # 3, 4
    body = ndimage.binary_dilation(largest(body), bed)
    body = ndimage.binary_erosion(ndimage.binary_dilation(body, closing), closing, border_value=1)  # 5
    body |= labelled  # 6
    out[body & ~labelled] = body_label  # 7
    envelope = out == body_label  # 8
    pockets, _ = ndimage.label(envelope & (ct < options.hu_threshold))
    sizes = np.bincount(pockets.ravel())
    sizes[0] = 0
    table = np.flatnonzero(sizes >= options.table_fraction * np.count_nonzero(envelope))
    if table.size:
        out[np.isin(pockets, table)] = 0
        kept = ndimage.binary_dilation(largest(ndimage.binary_erosion(out > 0, bed)), bed)
        out[~kept & (out == body_label)] = 0
    return out


@pytest.mark.parametrize("case", ["mattress", "slab", "pressed", "cut by the volume", "corner specks", "options"])
def test_ct_envelope_equals_the_plain_reference(case):
    """The fast envelope (box filters, the work box around what is not exterior air, labelling within bounding
    boxes) gives the plain formulation's output voxel for voxel: with each table, with the body cut by the
    volume's faces (the box reaches the border there), with specks in two corners (the box is the whole volume),
    and with other parameters (a pressed table, so step 8 and the second opening run)."""
    kind = {"cut by the volume": "slab", "corner specks": "mattress", "options": "pressed"}.get(case, case)
    _, organs, ct, _, _ = phantom_on_table(0, kind)
    options = BodyEnvelopeOptions()
    if case == "cut by the volume":
        part = (slice(22, 74), slice(None), slice(30, 66))  # the trunk cut at both sides and both ends
        organs, ct = np.ascontiguousarray(organs[part]), np.ascontiguousarray(ct[part])
    elif case == "corner specks":
        ct[0, 0, 0] = ct[-1, -1, -1] = 40
    elif case == "options":
        options = BodyEnvelopeOptions(hu_threshold=-500.0, closing_kernel=5, bed_cleanup_kernel=7,
                                      table_fraction=0.01)
    expected = reference_envelope(organs, ct, options)
    got = add_body_envelope(organs, ct, options)
    assert np.count_nonzero(expected == 200) > 10000
    assert np.array_equal(got, expected), f"{np.count_nonzero(got != expected)} voxels differ"


def test_label_only_method_covers_every_labelled_voxel():
    phantom = make_phantom(SIZE, SPACING, 1)
    organs = np.where(phantom.labels == 200, 0, phantom.labels).astype(np.uint8)
    out = body_envelope_from_labels(organs, SPACING)
    assert np.array_equal(out[organs > 0], organs[organs > 0])
    assert set(np.unique(out[organs == 0])) == {0, 200}
    score = dice(out > 0, phantom.labels > 0)
    print(f"\nlabel-only method, 20 mm margin: Dice {score:.4f} against the phantom's body")
    assert 0.75 <= score < 0.98  # an approximation: the phantom's muscles and fat are not labelled
    # the slices are taken across the axial axis wherever it lies in the array
    moved = body_envelope_from_labels(np.moveaxis(organs, 2, 0), (SPACING[2], SPACING[0], SPACING[1]), axial_axis=0)
    assert np.array_equal(np.moveaxis(moved, 0, 2), out)
    assert "approximated" in BODY_METHOD_NOTE


def test_axial_axis_of_a_reoriented_affine():
    assert axial_axis_of(np.diag([1.0, 1.0, 2.5, 1.0])) == 2
    assert axial_axis_of(np.array([[0, 0, -1.0, 0], [0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])) == 0


def test_read_body_ct_on_the_mask_grid(tmp_path):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    ct = np.full((16, 12, 8), -1000, dtype=np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), str(path))
    read = read_body_ct(path, (16, 12, 8), affine)
    assert read.dtype == np.int16 and np.array_equal(read, ct)

    scaled = nib.Nifti1Image(np.zeros((16, 12, 8), dtype=np.uint16), affine)
    scaled.header.set_slope_inter(1.0, -1024.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    hu = read_body_ct(tmp_path / "scaled.nii.gz", (16, 12, 8), affine)
    assert hu.dtype == np.float32 and float(hu.max()) == -1024.0

    for shape, other in (((16, 12, 9), affine), ((16, 12, 8), np.diag([1.0, 1.5, 2.0, 1.0]))):
        with pytest.raises(UsageError) as refused:
            read_body_ct(path, shape, other, field="--body-from")
        message = str(refused.value)
        assert "\n" not in message and message.startswith("--body-from:")
        assert "16x12x8 at 1.5x1.5x2 mm" in message and "segmented from" in message


def test_options_problems():
    assert BodyEnvelopeOptions().problem() is None
    assert BodyEnvelopeOptions(closing_kernel=4).problem()[0] == "--closing-kernel"
    assert BodyEnvelopeOptions(bed_cleanup_kernel=0).problem()[0] == "--bed-kernel"
    assert BodyEnvelopeOptions(table_fraction=0.0).problem()[0] == "--table-fraction"

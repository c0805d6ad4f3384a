"""The body envelope: label 200 on every body voxel that no organ label claims.

The released ControlNet was trained on label maps in which every voxel of the patient carries a label: an organ's,
or 200 ("body") for the rest (fat, muscle, skin, bowel content). Segmenters (TotalSegmentator, NV-Segment-CT/VISTA3D)
label organs only, so a map of theirs needs its envelope before it can condition a generation.

Two methods:
- `add_body_envelope(labels, ct)`: from the CT the labels were segmented from, the upstream algorithm
  (NV-Generate-CTMR `scripts/utils.py::add_body_envelope`, same steps and defaults), written here with
  scipy.ndimage on boolean volumes: the exterior air is the largest connected component below the HU threshold, the
  body is what is not exterior air, and the scanner table is cut away by an opening and by dropping table-sized
  air pockets. Fast at the size users run (11 s at 512³ on 2 cores, 92 s before): cube morphology as shifted whole-volume
  ORs/ANDs, every step after the first in the box around what is not exterior air, labelling within bounding boxes.
- `body_envelope_from_labels(labels, spacing)`: without a CT, an approximation of the skin line from the labelled
  organs alone (see its docstring for its limits).

numpy and scipy only: no torch, Typer or rich.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi_cli.errors import MaskError, UsageError
from maisi_cli.labels import BODY_LABEL

BODY_METHOD_NOTE = ("no CT given: the body envelope (200) is approximated from the labelled organs alone (their "
                    "outline per axial slice plus a soft-tissue margin), not the real skin line; give the CT the "
                    "mask was segmented from for the real one")

# Host bytes per voxel add_body_envelope holds at its peak besides its inputs: the uint8 output, boolean volumes and
# ndimage.label's int32 component ids; bench/body_envelope_512.py measured 8.4 at 512³, and 9.1 where the box the
# steps after 1 work in is the whole volume (its worst case)
ENVELOPE_BYTES_PER_VOXEL = 10
LABEL_ONLY_MARGIN_MM = 20.0  # skin to the outermost labelled structure (ribs, spine, muscles) in a typical trunk
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbours, as MONAI's largest-component helper uses


@dataclass(frozen=True)
class BodyEnvelopeOptions:
    """The upstream algorithm's parameters, with its defaults."""

    hu_threshold: float = -800.0  # below: air (exterior air, lung, bowel gas, foam)
    closing_kernel: int = 3  # cube edge (voxels) of the closings of the air (step 1) and of the body (step 5)
    bed_cleanup_kernel: int = 5  # cube edge (voxels) of the opening that cuts the table off the body (step 4)
    table_fraction: float = 0.05  # an air pocket inside the body this large (of the body's 200 voxels) is table

    def problem(self) -> tuple[str, str] | None:
        """(option, why) for a value the algorithm cannot use, else None."""
        for name, kernel in (("--closing-kernel", self.closing_kernel), ("--bed-kernel", self.bed_cleanup_kernel)):
            if kernel < 1 or kernel % 2 == 0:
                return name, f"{kernel} is not an odd number of voxels 1 or more (a cube centred on the voxel)"
        if not 0.0 < self.table_fraction <= 1.0:
            return "--table-fraction", f"{self.table_fraction:g} is not a fraction in (0, 1]"
        if not math.isfinite(self.hu_threshold):
            return "--hu-threshold", f"{self.hu_threshold} is not a number of HU"
        return None


# --- morphology on boolean volumes --------------------------------------------------------------------------------
def _along(axis: int, part: slice) -> tuple[slice, ...]:
    """An index taking `part` along `axis` and everything along the axes before it (those after follow)."""
    return (slice(None),) * axis + (part,)


def _box_filter(mask: np.ndarray, size: int, outside: bool, grow: bool) -> np.ndarray:
    """Dilation (`grow`) or erosion of a boolean volume by a cube of edge `size`, voxels beyond the volume taken as
    `outside` (MONAI's pad_value), as a new array; the window along each axis is scipy's (size // 2 voxels before
    the voxel, the rest after). A cube is separable: along each axis in turn, every voxel is ORed (dilation) or
    ANDed (erosion) with its neighbours, one whole-volume operation on shifted views per neighbour. These run at
    memory speed along every axis (about 30 ms at 512³), where scipy's 1-D min/max filters took 24 s along the
    first axis, whose lines are strided."""
    if size <= 1:
        return mask.copy()  # a new array still: callers change the result in place
    before, after = size // 2, size - 1 - size // 2
    combine = np.logical_or if grow else np.logical_and
    buffers = (np.empty(mask.shape, dtype=bool), np.empty(mask.shape, dtype=bool))
    source = mask
    for axis in range(mask.ndim):
        result, length = buffers[axis % 2], mask.shape[axis]
        first = 1
        if before >= 1 and length > 1:  # the voxel before, combined while copying (one pass less)
            combine(source[_along(axis, slice(1, None))], source[_along(axis, slice(None, -1))],
                    out=result[_along(axis, slice(1, None))])
            result[_along(axis, slice(None, 1))] = source[_along(axis, slice(None, 1))]
            first = 2
        else:
            np.copyto(result, source)
        for shift in range(first, min(before, length - 1) + 1):  # the voxel `shift` before
            combine(result[_along(axis, slice(shift, None))], source[_along(axis, slice(None, -shift))],
                    out=result[_along(axis, slice(shift, None))])
        for shift in range(1, min(after, length - 1) + 1):  # the voxel `shift` after
            combine(result[_along(axis, slice(None, -shift))], source[_along(axis, slice(shift, None))],
                    out=result[_along(axis, slice(None, -shift))])
        if not grow and not outside:  # where the window reaches beyond the volume, a voxel not in the set
            result[_along(axis, slice(None, before))] = False
            result[_along(axis, slice(max(length - after, 0), None))] = False
        source = result
    return source


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    return _box_filter(mask, size, outside=False, grow=True)


def erode(mask: np.ndarray, size: int, outside: bool) -> np.ndarray:
    return _box_filter(mask, size, outside=outside, grow=False)


_COUNT_BLOCK = 1 << 18  # ids per sort in component_sizes (1 MiB of int32)


def component_sizes(components: np.ndarray, count: int) -> np.ndarray:
    """Voxels per component id 0..count (int64) of ndimage.label's ids, counted a block at a time: each block sorted,
    then the length of each run of one id added. np.bincount took twice as long on int32 ids (it converts them to
    int64 first, and on the whole volume that copy would be twice the ids' size)."""
    flat = components.reshape(-1)
    sizes = np.zeros(count + 1, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_BLOCK):
        block = np.sort(flat[start:start + _COUNT_BLOCK])
        run_starts = np.flatnonzero(block[1:] != block[:-1]) + 1
        edges = np.concatenate(([0], run_starts, [block.size]))
        sizes[block[edges[:-1]]] += np.diff(edges)  # the ids of a sorted block's runs are distinct
    return sizes


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of `mask`, as slices (None when there is none)."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(spans)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean volume (all False when it has none; on a tie, the one whose
    first voxel comes first in raster order). Labelled within the mask's bounding box only: ndimage.label's time
    goes with the voxels it scans, and a box keeps the raster order."""
    largest = np.zeros_like(mask)
    box = bounding_box(mask)
    if box is None:
        return largest
    components, count = ndimage.label(mask[box], structure=FULL_CONNECTIVITY)
    sizes = component_sizes(components, count)
    sizes[0] = 0
    np.equal(components, int(np.argmax(sizes)), out=largest[box])
    return largest


# --- the CT method ------------------------------------------------------------------------------------------------
def exterior_air(ct: np.ndarray, options: BodyEnvelopeOptions) -> np.ndarray:
    """Step 1's air before its closing: the largest 26-connected component of the voxels below the threshold, on
    the whole volume (which component is the largest can depend on any voxel)."""
    return largest_component(ct < options.hu_threshold)


# The steps after 1 look only at the box around what is not exterior air or is labelled (a CT's corners and the air
# above the patient are exterior air), widened by a margin, and give the whole volume's result to the voxel: beyond
# the box every voxel is exterior air and unlabelled, so it is air after the closing and body in no step; the margin
# (the closing kernel + 1) keeps the body, and the closing's dilation of it, a closing kernel inside the box, so the
# erosions and dilations read at the box's faces the values the whole volume has beyond them.
def work_box(exterior: np.ndarray, out: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The box around every voxel not in `exterior` or labelled in `out`, widened by `margin` voxels and clipped to
    the volume; None when there is none (no body). Read in slabs of the first axis: no whole-volume temporary."""
    seen = [np.zeros(n, dtype=bool) for n in out.shape]
    for start in range(0, out.shape[0], 16):
        busy = np.logical_not(exterior[start:start + 16])
        busy |= out[start:start + 16] > 0
        seen[0][start:start + 16] = busy.any(axis=(1, 2))
        seen[1] |= busy.any(axis=(0, 2))
        seen[2] |= busy.any(axis=(0, 1))
    if not seen[0].any():
        return None
    spans = [np.flatnonzero(along) for along in seen]
    return tuple(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n))
                 for hit, n in zip(spans, out.shape))


def body_silhouette(exterior: np.ndarray, labelled: np.ndarray, options: BodyEnvelopeOptions) -> np.ndarray:
    """Step 1's closing to step 6, from step 1's air component: closed (thin structures surrounded by air, such as
    a table's shell, join it), minus the labelled voxels; body = not exterior air; an opening (erode, largest
    component, dilate) cuts off what touches it through a neck thinner than the bed kernel (the table); a closing
    seals small gaps; labelled voxels are in."""
    air = dilate(exterior, options.closing_kernel)
    # beyond the volume counts as air while the air is eroded back, so the closing does not peel the border
    air = erode(air, options.closing_kernel, outside=True)
    air &= ~labelled
    body = np.logical_not(air, out=air)
    body = erode(body, options.bed_cleanup_kernel, outside=False)
    body = largest_component(body)
    body = dilate(body, options.bed_cleanup_kernel)
    body = dilate(body, options.closing_kernel)
    body = erode(body, options.closing_kernel, outside=True)
    body |= labelled
    return body


def drop_table_air(out: np.ndarray, ct: np.ndarray, options: BodyEnvelopeOptions, body_label: int) -> int:
    """Step 8, in place: every face-connected pocket of air (CT below the threshold) among the body voxels that is
    at least `table_fraction` of them is a table's foam or the gap under the patient, not the patient: back to 0.
    Returns the voxels dropped.

    As upstream: the fraction is of the voxels labelled `body_label` (not of the whole body), the pockets are
    6-connected (scipy's default, as upstream calls it), and lung air is safe only because the lungs are labelled;
    a map without lung labels whose CT shows lungs would lose them here, as it would upstream (which skips this step
    when told the map has no lungs; this module has no such switch: MAISI maps and both segmenters label the lungs).
    """
    envelope = out == body_label
    envelope_voxels = int(np.count_nonzero(envelope))
    envelope &= ct < options.hu_threshold
    box = bounding_box(envelope)
    if envelope_voxels == 0 or box is None:
        return 0
    pockets, count = ndimage.label(envelope[box])  # within the pockets' box: the same pockets, sooner
    del envelope
    sizes = component_sizes(pockets, count)
    sizes[0] = 0
    table = sizes >= options.table_fraction * envelope_voxels
    if not table.any():
        return 0
    dropped = table[pockets]
    del pockets
    out[box][dropped] = 0
    return int(np.count_nonzero(dropped))


def add_body_envelope(labels: np.ndarray, ct: np.ndarray, options: BodyEnvelopeOptions = BodyEnvelopeOptions(),
                      body_label: int = BODY_LABEL) -> np.ndarray:
    """`labels` (any integer ids ≤ 255, 3-D) with `body_label` added on every unlabelled voxel of the patient's body
    as the CT `ct` (HU, same grid) shows it, as uint8. Labelled voxels keep their label (a 200 already there
    included). The upstream algorithm, step by step:

    1. air = the largest 26-connected component of CT < hu_threshold, closed by a closing_kernel cube;
    2. labelled voxels are not air; 3. body = not air;
    4. erode by a bed_cleanup_kernel cube, keep the largest component, dilate back: what hangs on the body by a
       neck thinner than the kernel (the scanner table, its cushion) falls off;
    5. close by a closing_kernel cube; 6. labelled voxels are body;
    7. every unlabelled body voxel becomes body_label;
    8. every air pocket (6-connected, CT < hu_threshold) among the body_label voxels as large as table_fraction of
       them is dropped (a table's foam core or the air under the patient).

    Knowing departures from upstream's code: after step 8, envelope voxels it cut off from the patient are dropped
    too (`cut_table_again`); step 8 always runs (upstream has a switch for maps without lungs,
    see `drop_table_air`); the output is uint8 whatever the input type (the ControlNet reads 8 bit planes).

    The steps after 1 run on the box around what is not exterior air (`work_box`), with the whole volume's result."""
    if labels.shape != ct.shape or labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} and ct {ct.shape} must be 3-D volumes on one grid")
    out = labels.astype(np.uint8)  # the only copy of the labels; the caller checked they fit in 0..255
    exterior = exterior_air(ct, options)
    box = work_box(exterior, out, margin=options.closing_kernel + 1)
    if box is None:  # only unlabelled exterior air: no body
        return out
    out_box, ct_box = out[box], ct[box]  # views: writes reach `out`
    labelled = out_box > 0
    body = body_silhouette(exterior[box], labelled, options)
    del exterior
    body &= ~labelled
    del labelled
    np.copyto(out_box, np.uint8(body_label), where=body)
    del body
    if drop_table_air(out_box, ct_box, options, body_label):
        cut_table_again(out_box, options, body_label)
    return out


def cut_table_again(out: np.ndarray, options: BodyEnvelopeOptions, body_label: int) -> None:
    """After step 8 dropped a pocket, in place: step 4's opening (erode, largest component, dilate) once more, and
    `body_label` voxels outside it go back to 0 (organ labels stay). A departure from upstream, which stops at step
    8: a table whose sealed foam core held it against the patient through step 4 is left, once the core is dropped,
    as thin shells under and beside the patient, still labelled body; now they hang by a thin neck and fall off."""
    body = erode(out > 0, options.bed_cleanup_kernel, outside=False)
    body = largest_component(body)
    body = dilate(body, options.bed_cleanup_kernel)
    body |= out != body_label
    out[~body] = 0


# --- the label-only method ----------------------------------------------------------------------------------------
def _slice_envelope(labelled: np.ndarray, pixel: tuple[float, float], margin_mm: float) -> np.ndarray:
    """One axial slice: the labelled pixels grown by `margin_mm` plus a closing radius, holes filled, shrunk by the
    closing radius again (so gaps between organs up to 2·(margin + closing) close, and the outline stays smooth)."""
    closing_mm = margin_mm
    distance_out = ndimage.distance_transform_edt(~labelled, sampling=pixel)
    grown = distance_out <= margin_mm + closing_mm
    del distance_out
    grown = ndimage.binary_fill_holes(grown)
    # pad by the closing radius so the shrink does not eat from the slice's edge (beyond it is unknown, not air)
    pad = [math.ceil(closing_mm / p) + 1 for p in pixel]
    padded = np.pad(grown, [(n, n) for n in pad], mode="edge")
    inside = ndimage.distance_transform_edt(padded, sampling=pixel) > closing_mm
    return inside[pad[0]:pad[0] + grown.shape[0], pad[1]:pad[1] + grown.shape[1]] | labelled


def body_envelope_from_labels(labels: np.ndarray, spacing: tuple[float, float, float],
                              margin_mm: float = LABEL_ONLY_MARGIN_MM, body_label: int = BODY_LABEL,
                              axial_axis: int = 2) -> np.ndarray:
    """`labels` with `body_label` added around the labelled organs, without a CT, as uint8: on each axial slice
    (the planes across `axial_axis`, the head-foot axis: axis 2 in the NIfTI files CT scanners and segmenters
    write), the labelled pixels are grown by `margin_mm` (the soft tissue between the outermost labelled structure
    and the skin), closed by a disc of the same radius and their holes filled; every unlabelled pixel inside becomes
    `body_label`. Labelled voxels keep their label, and every one of them is inside the envelope.

    Limits: it approximates the skin line, it does not see it. The envelope is the organs' outline plus a fixed
    margin, so it is too thin where the subcutaneous fat is thicker than the margin (the abdomen of an obese
    patient) and too thick on a lean one; slices with no labelled voxel get no body (the head, the legs, arms that
    are not labelled); limbs close to the trunk may merge with it. Use the CT method wherever the CT exists."""
    if labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} must be a 3-D volume")
    if not margin_mm >= 0:
        raise ValueError(f"margin_mm {margin_mm} must be 0 or more")
    out = np.moveaxis(labels.astype(np.uint8), axial_axis, 2)  # a view of the one copy: writes reach `result`
    result = np.moveaxis(out, 2, axial_axis)
    pixel = tuple(float(spacing[a]) for a in range(3) if a != axial_axis)
    for z in range(out.shape[2]):
        plane = out[:, :, z]
        labelled = plane > 0
        if not labelled.any():
            continue
        envelope = _slice_envelope(labelled, pixel, margin_mm)  # type: ignore[arg-type]
        plane[envelope & ~labelled] = body_label
    return np.ascontiguousarray(result) if not result.flags.c_contiguous else result


def axial_axis_of(affine: np.ndarray) -> int:
    """The voxel axis that runs closest to the world's head-foot (z) axis."""
    directions = np.abs(np.asarray(affine, dtype=np.float64)[:3, :3])
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    return int(np.argmax(directions[2]))


# --- reading the CT -----------------------------------------------------------------------------------------------
def _grid_words(shape: tuple[int, ...], affine: np.ndarray) -> str:
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    origin = np.asarray(affine)[:3, 3]
    return (f"{'x'.join(map(str, shape))} at {'x'.join(f'{s:.4g}' for s in spacing)} mm, origin "
            f"({', '.join(f'{o:.4g}' for o in origin)})")


def same_grid(shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...], affine_b: np.ndarray) -> bool:
    """Same voxel count and the same voxel-to-world map (to a thousandth of a millimetre, header rounding)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, rtol=0.0, atol=1e-3)


def read_body_ct(path: Path, shape: tuple[int, int, int], affine: np.ndarray, field: str = "--body-from") -> np.ndarray:
    """The CT at `path` on the mask's grid (`shape`, `affine`), in HU: int16 when stored as int16 without scaling,
    else float32 (scaled in float32, never through a float64 copy). A CT on another grid is a UsageError: a
    segmenter writes its labels on its CT's grid, so another grid means another CT (or a resampled one). The host
    memory for the CT and for the envelope's work is checked before any voxel is read."""
    import nibabel as nib

    from maisi_cli.engine.memory import check_host_memory
    from maisi_cli.io.nifti import read_nifti_header

    path = Path(path)
    header = read_nifti_header(path, field, "CT image")  # checked: readable, 3-D, a usable affine
    if not same_grid(header.shape, header.affine, shape, affine):
        raise UsageError(f"{field}: '{path}' is on a {_grid_words(header.shape, header.affine)} grid, the mask on "
                         f"{_grid_words(shape, affine)}; give the CT the mask was segmented from (segmenters write "
                         "their labels on their CT's grid), or resample one onto the other first")
    voxels = math.prod(header.shape)
    image = nib.load(str(path))
    stored = np.dtype(image.get_data_dtype())
    result_bytes = 2 if stored == np.int16 else 4
    check_host_memory(voxels * (stored.itemsize + result_bytes + ENVELOPE_BYTES_PER_VOXEL), field,
                      f"reading '{path}' ({'x'.join(map(str, header.shape))}, {stored}) and adding the body envelope",
                      "crop the CT and its mask to the body first")
    try:
        raw = np.asanyarray(image.dataobj.get_unscaled()).reshape(header.shape)
    except Exception as error:  # noqa: BLE001 — a truncated or corrupt data part raises many types
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise MaskError(f"{field}: '{path}' is not a readable NIfTI file ({reason})") from None
    slope, inter = (float(v) if v is not None and math.isfinite(float(v)) else d
                    for v, d in ((image.dataobj.slope, 1.0), (image.dataobj.inter, 0.0)))
    if raw.dtype == np.int16 and (slope, inter) == (1.0, 0.0):
        return raw
    ct = raw.astype(np.float32)
    del raw
    if slope != 1.0:
        ct *= np.float32(slope)
    if inter != 0.0:
        ct += np.float32(inter)
    return ct


def label_ids(data: np.ndarray, path: Path, field: str) -> np.ndarray:
    """A label map's whole-number ids in 0..255 as uint8 (masks/user.py checks a --mask the same way; that module
    imports this one, so the check is not borrowed from it)."""
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.rint(data)):
        raise MaskError(f"{field}: '{path}' holds fractional values; a label map of whole-number ids is needed")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise MaskError(f"{field}: '{path}' holds {data.dtype} values; a label map of whole numbers is needed")
    low, high = (data.min(), data.max()) if data.size else (0, 0)
    if low < 0 or high > 255:
        raise MaskError(f"{field}: '{path}' has labels from {low:g} to {high:g}; label ids must be within 0..255 "
                        "(the ControlNet reads 8 bit planes)")
    return data.astype(np.uint8)


# --- a label map file in, a label map file out (`maisi data body`) -------------------------------------------------
@dataclass(frozen=True)
class BodyEnvelopeRun:
    mask: Path
    out: Path
    ct: Path | None
    method: str  # "ct", "labels" (the label-only approximation) or "kept" (the mask already had its body)
    body_voxels_before: int  # voxels labelled body_label in the mask as read
    added: int  # voxels that became body_label
    body_voxels: int  # voxels labelled body_label in the output
    shape: tuple[int, int, int]
    seconds: float

    def as_dict(self) -> dict:
        return {"mask": str(self.mask), "out": str(self.out), "ct": None if self.ct is None else str(self.ct),
                "method": self.method, "body_voxels_before": self.body_voxels_before, "added": self.added,
                "body_voxels": self.body_voxels, "shape": list(self.shape), "seconds": round(self.seconds, 3)}


def write_body_envelope(mask: Path, out: Path, ct: Path | None = None,
                        options: BodyEnvelopeOptions = BodyEnvelopeOptions(), margin_mm: float = LABEL_ONLY_MARGIN_MM,
                        replace_body: bool = False, body_label: int = BODY_LABEL) -> BodyEnvelopeRun:
    """Read the label map `mask` (any ids in 0..255), add `body_label` (from `ct` when given, else from the labels
    alone) and write it to `out` atomically as uint8 NIfTI with the mask's affine. A mask that already holds
    `body_label` is written as it is (method "kept"), unless `replace_body` drops its body first and computes it
    again."""
    import gzip
    import time

    from maisi_cli.engine.memory import check_host_memory
    from maisi_cli.io.files import write_atomic
    from maisi_cli.io.nifti import nifti_bytes, read_nifti, read_nifti_header

    started = time.perf_counter()
    header = read_nifti_header(mask, "MASK", "label map")
    check_host_memory(math.prod(header.shape) * (header.dtype.itemsize + 3), "MASK",
                      f"reading '{mask}' ({'x'.join(map(str, header.shape))}, {header.dtype})",
                      "crop the mask to the body first")
    data, affine = read_nifti(mask, field="MASK", what="label map")
    labels = label_ids(data, mask, field="MASK")
    del data
    before = int(np.count_nonzero(labels == body_label))
    if before and replace_body:
        labels[labels == body_label] = 0
    if before and not replace_body:
        result, method = labels, "kept"
    elif ct is not None:
        volume = read_body_ct(ct, header.shape, affine, field="--ct")
        result, method = add_body_envelope(labels, volume, options, body_label), "ct"
        del volume
    else:
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        result = body_envelope_from_labels(labels, (float(spacing[0]), float(spacing[1]), float(spacing[2])),
                                           margin_mm, body_label, axial_axis=axial_axis_of(affine))
        method = "labels"
    body_voxels = int(np.count_nonzero(result == body_label))
    added = body_voxels - (0 if replace_body else before)
    payload = nifti_bytes(result, affine)
    if not Path(out).name.endswith(".gz"):
        payload = gzip.decompress(payload)  # a plain .nii
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out), payload)
    shape = (int(header.shape[0]), int(header.shape[1]), int(header.shape[2]))
    return BodyEnvelopeRun(Path(mask), Path(out), None if ct is None else Path(ct), method, before, added,
                           body_voxels, shape, time.perf_counter() - started)

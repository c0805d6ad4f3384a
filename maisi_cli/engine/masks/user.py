"""A user's own label map as the condition: checked, oriented to RAS, resampled to the requested grid.

The resampling is the reference's `ensure_output_size_and_spacing` (§9.5): MONAI `Spacing` with nearest-neighbour
interpolation to the target spacing, then a symmetric `ResizeWithPadOrCrop` to the target size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from maisi_cli.config import SPACING_RANGE_MM, FloatTriple, Triple, format_triple, spacing_problem
from maisi_cli.engine.memory import MaskGrid, check_host_memory, mask_stage_terms
from maisi_cli.errors import MaskError
from maisi_cli.label_schemes import LabelScheme
from maisi_cli.io.nifti import NiftiHeader, read_nifti, read_nifti_header
from maisi_cli.labels import BODY_LABEL, label_dictionary


@dataclass(frozen=True)
class ConditionMask:
    labels: np.ndarray  # uint8 (X, Y, Z) at the requested size, RAS
    affine: np.ndarray  # 4×4, RAS, requested spacing
    resampled: bool
    original_shape: Triple
    original_spacing: FloatTriple
    lost_labels: tuple[tuple[int, int], ...] = ()  # (label, voxels in the file) of labels the resampling lost
    unmapped: tuple[tuple[int, str, int], ...] = ()  # (class id, name, voxels) a --mask-labels scheme could not map


def checked_labels(data: np.ndarray, path: Path, field: str = "--mask") -> np.ndarray:
    """Whole-number label ids in [0, 255] as uint8 (the ControlNet sees 8 bit planes)."""
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise MaskError(f"{field}: '{path}' holds {data.dtype} values; a label map of whole numbers is needed")
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.rint(data)):
            raise MaskError(f"{field}: '{path}' holds fractional values; a label map of whole-number ids is needed")
    low, high = data.min(), data.max()
    if low < 0 or high > 255:
        raise MaskError(
            f"{field}: '{path}' has labels from {low:g} to {high:g}; MAISI label ids must be within 0..255 "
            f"(the ControlNet reads 8 bit planes)"
        )
    return data.astype(np.uint8)


def voxel_spacing(affine: np.ndarray) -> FloatTriple:
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def resampled_grid(shape: Triple, affine: np.ndarray, spacing: FloatTriple) -> Triple:
    """The grid MONAI `Spacing` makes of a volume reoriented to RAS (its `compute_shape_offset` for an axis-aligned
    affine): on each RAS axis, the extent of the voxel axis along it (first to last voxel centre) over the target
    spacing, plus one, rounded."""
    source = voxel_spacing(affine)
    grid = [0, 0, 0]
    for axis, (count, step) in enumerate(zip(shape, source)):
        ras = int(np.argmax(np.abs(affine[:3, axis])))  # the RAS axis this voxel axis becomes
        grid[ras] = int(np.round((count - 1) * step / spacing[ras] + 1.0))
    return (grid[0], grid[1], grid[2])


def read_mask_grid(path: Path, spacing: FloatTriple, field: str = "--mask") -> tuple[MaskGrid, NiftiHeader]:
    """The mask's header (its voxels are not read) and what fitting it to `spacing` will allocate. A degenerate
    affine (read_nifti_header) or a voxel spacing outside SPACING_RANGE_MM is a MaskError naming `field`."""
    header = read_nifti_header(path, field)
    original = voxel_spacing(header.affine)
    problem = spacing_problem(original)
    if problem:
        low, high = SPACING_RANGE_MM
        raise MaskError(f"{field}: '{path}' has voxel spacing {'x'.join(f'{s:g}' for s in original)} mm in its "
                        f"header, outside [{low:g}, {high:g}] mm; fix its header or resample the mask")
    same_spacing = np.allclose(sorted_by_ras(original, header.affine), spacing, rtol=1e-3, atol=1e-4)
    resampled = None if same_spacing else resampled_grid(header.shape, header.affine, spacing)
    floating = bool(np.issubdtype(header.dtype, np.floating))
    return MaskGrid(header.shape, header.dtype.itemsize, floating, resampled), header


def sorted_by_ras(values: FloatTriple, affine: np.ndarray) -> FloatTriple:
    """Per-voxel-axis values reordered to the RAS axes those voxel axes become (as `Orientation` does)."""
    out = list(values)
    for axis, value in enumerate(values):
        out[int(np.argmax(np.abs(affine[:3, axis])))] = value
    return (out[0], out[1], out[2])


def check_mask_memory(path: Path, grid: MaskGrid, header: NiftiHeader, size: Triple, spacing: FloatTriple) -> None:
    """Refuse, before its voxels are read, a mask whose reading and fitting cannot fit the host memory; the fix
    follows the largest cost: the file itself, its resampling (the spacing) or the output grid (the size)."""
    terms = mask_stage_terms(grid, size)
    largest = max(terms, key=terms.__getitem__)
    field, fix = {
        "mask resampling": ("--spacing", "give a larger --spacing, or a mask nearer that spacing"),
        "mask pad/crop": ("--size", "ask for a smaller --size"),
    }.get(largest, ("--mask", "crop or downsample the mask first"))
    subject = (f"reading '{path}' ({format_triple(grid.shape)}, {header.dtype}) and fitting it to "
               f"{format_triple(size)} at {format_triple(spacing)} mm ({largest})")
    check_host_memory(sum(terms.values()), field, subject, fix)


def fit_to_grid(labels: np.ndarray, affine: np.ndarray, size: Triple, spacing: FloatTriple) -> tuple[np.ndarray, np.ndarray, bool]:
    """(labels, affine, resampled): RAS orientation, then nearest resampling and centre pad/crop when needed.
    A resampling that cannot fit the host memory is refused before it starts (any mask source comes here)."""
    import torch  # torch and MONAI only to resample: `maisi data masks index` checks masks without them
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

    volume = MetaTensor(torch.from_numpy(labels[None].astype(np.int16)), affine=torch.from_numpy(affine))
    volume = Orientation(axcodes="RAS", labels=None)(volume)
    current_spacing = voxel_spacing(np.asarray(volume.affine))
    same_spacing = np.allclose(current_spacing, spacing, rtol=1e-3, atol=1e-4)
    same_size = tuple(volume.shape[1:]) == tuple(size)
    if same_spacing and same_size:
        return volume[0].numpy().astype(np.uint8), np.asarray(volume.affine, dtype=np.float64), False
    if not same_spacing:
        shape: Triple = tuple(int(s) for s in volume.shape[1:])  # type: ignore[assignment]
        grid = MaskGrid(shape, 1, False, resampled_grid(shape, np.asarray(volume.affine), spacing))
        terms = {k: v for k, v in mask_stage_terms(grid, size).items() if k in ("mask resampling", "mask pad/crop")}
        check_host_memory(sum(terms.values()), "--spacing",
                          f"resampling the mask ({format_triple(shape)} at "
                          f"{format_triple(tuple(round(s, 4) for s in current_spacing))} mm) to "
                          f"{format_triple(spacing)} mm", "give a larger --spacing")
        volume = Spacing(pixdim=spacing, mode="nearest", dtype=np.float32)(volume)
    volume = ResizeWithPadOrCrop(spatial_size=size)(volume)
    array = np.rint(volume[0].numpy()).astype(np.uint8)
    return array, np.asarray(volume.affine, dtype=np.float64), True


def load_condition_mask(path: Path, size: Triple, spacing: FloatTriple,
                        scheme: LabelScheme | None = None) -> ConditionMask:
    """The mask at `path` fitted to the grid, its class ids first converted to MAISI's by `scheme` (--mask-labels).
    Its header is read first: a degenerate affine, an absurd spacing or a fit that cannot fit the host memory is
    refused before any voxel is read."""
    grid, header = read_mask_grid(path, spacing)
    check_mask_memory(path, grid, header, size, spacing)
    data, affine = read_nifti(path)
    if scheme is None or scheme.identity:
        return fitted_condition_mask(data, affine, size, spacing, path, "--mask")
    converted, unmapped = converted_labels(data, scheme, path)
    return replace(fitted_condition_mask(converted, affine, size, spacing, path, "--mask"), unmapped=unmapped)


def converted_labels(data: np.ndarray, scheme: LabelScheme, path: Path,
                     field: str = "--mask") -> tuple[np.ndarray, tuple[tuple[int, str, int], ...]]:
    """(the label map in MAISI ids, uint8; the classes with no MAISI counterpart as (id, name, voxels), made
    background). One table look-up per voxel, whatever the number of classes."""
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise MaskError(f"{field}: '{path}' holds {data.dtype} values; a label map of whole numbers is needed")
    if np.issubdtype(data.dtype, np.floating) and (not np.all(np.isfinite(data))
                                                   or not np.array_equal(data, np.rint(data))):
        raise MaskError(f"{field}: '{path}' holds fractional values; a label map of whole-number ids is needed")
    low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if low < 0 or high > 65535:
        raise MaskError(f"{field}: '{path}' has class ids from {low} to {high}; --mask-labels {scheme.name} reads "
                        "ids 0..65535")
    classes = data.astype(np.int64 if np.issubdtype(data.dtype, np.floating) else data.dtype, copy=False)
    present, counts = np.unique(classes, return_counts=True)
    table = np.zeros(high + 1, dtype=np.uint8)
    unmapped = []
    for ident, voxels in zip(present.tolist(), counts.tolist()):
        if ident == 0:
            continue
        # the body envelope (200) that maisi adds to a segmenter's map passes through unless the table says otherwise
        target = scheme.mapping.get(ident, BODY_LABEL if ident == BODY_LABEL else None)
        if target is None:
            unmapped.append((ident, scheme.class_names.get(ident, f"class {ident}"), voxels))
        else:
            table[ident] = target
    return table[classes], tuple(unmapped)


def unmapped_warning(mask: ConditionMask, path: Path, scheme: LabelScheme) -> str:
    """One line naming the classes --mask-labels could not map (they are left out of the condition)."""
    listed = ", ".join(f"{ident} {name} ({voxels} voxel{'' if voxels == 1 else 's'})"
                       for ident, name, voxels in mask.unmapped)
    return (f"--mask-labels {scheme.name}: '{path.name}' holds classes with no MAISI label: {listed}; they are "
            "generated as background (map them in a .json table to keep them)")


def condition_mask_from_array(data: np.ndarray, affine: np.ndarray, size: Triple, spacing: FloatTriple,
                              field: str = "mask", scheme: LabelScheme | None = None) -> ConditionMask:
    """A label map given in memory (the Python API), checked and fitted to the grid as a file would be."""
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise MaskError(f"{field}: a 3D label map is needed; this array has shape {data.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MaskError(f"{field}: the affine must be a finite, invertible 4×4 matrix (voxel to RAS mm)")
    problem = spacing_problem(voxel_spacing(affine))
    if problem:
        raise MaskError(f"{field}: the affine's voxel spacing is not usable; {problem}")
    if scheme is None or scheme.identity:
        return fitted_condition_mask(data, affine, size, spacing, Path("<array>"), field)
    converted, unmapped = converted_labels(data, scheme, Path("<array>"), field)
    return replace(fitted_condition_mask(converted, affine, size, spacing, Path("<array>"), field), unmapped=unmapped)


def fitted_condition_mask(data: np.ndarray, affine: np.ndarray, size: Triple, spacing: FloatTriple, path: Path,
                          field: str) -> ConditionMask:
    labels = checked_labels(data, path, field)
    if not labels.any():
        raise MaskError(f"{field}: '{path}' is all background (0); it needs at least a body (200) or organ labels")
    fitted, fitted_affine, resampled = fit_to_grid(labels, affine, size, spacing)
    return ConditionMask(
        labels=fitted,
        affine=fitted_affine,
        resampled=resampled,
        original_shape=tuple(int(s) for s in data.shape),  # type: ignore[arg-type]
        original_spacing=voxel_spacing(affine),
        lost_labels=lost_labels(labels, fitted) if resampled else (),
    )


def _label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per label id 0..255."""
    return np.bincount(labels.ravel(), minlength=256)


def lost_labels(before: np.ndarray, after: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(label, voxels in `before`) for each label of `before` that `after` (its resampled copy) no longer holds."""
    counts_before, counts_after = _label_counts(before), _label_counts(after)
    return tuple((int(label), int(counts_before[label]))
                 for label in np.flatnonzero((counts_before > 0) & (counts_after == 0)) if label != 0)


def _label_name(label: int) -> str:
    names = {ident: name for name, ident in label_dictionary().items()}
    return f"label {label} {names[label]}" if label in names else f"label {label}"


def resample_warning(mask: ConditionMask, path: Path, size: Triple, spacing: FloatTriple) -> str:
    """One warning line: the mask was resampled, and which labels of the file the resampled mask lost. A lost
    label is a warning, not an error: the other labels still make a sensible condition, but the CT will not show
    the lost organ, and the QC cannot check it."""
    target = f"{format_triple(size)} at {format_triple(spacing)} mm"
    message = (
        f"--mask: '{path.name}' is {format_triple(mask.original_shape)} at "
        f"{format_triple(tuple(round(s, 4) for s in mask.original_spacing))} mm; resampled (nearest) and padded/cropped "
        f"to {target}"
    )
    lost = mask.lost_labels
    if not lost:
        return message
    labels = ", ".join(f"{_label_name(label)} ({voxels} voxel{'' if voxels == 1 else 's'})"
                       for label, voxels in lost)
    one = len(lost) == 1
    return (f"{message}, where {labels} {'vanishes' if one else 'vanish'}: the CT is generated without "
            f"{'it' if one else 'them'}; give a mask at the target grid or a finer --spacing to keep "
            f"{'it' if one else 'them'}")

"""A user's own label map as the condition: checked, oriented to RAS, resampled to the requested grid.

The resampling is the reference's `ensure_output_size_and_spacing` (§9.5): MONAI `Spacing` with nearest-neighbour
interpolation to the target spacing, then a symmetric `ResizeWithPadOrCrop` to the target size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from maisi_cli.config import SPACING_RANGE_MM, FloatTriple, Triple, format_triple, spacing_problem
from maisi_cli.engine.masks.body import BODY_METHOD_NOTE, add_body_envelope, body_envelope_from_labels, read_body_ct
from maisi_cli.engine.masks.class_folder import class_folder_header, read_class_folder
from maisi_cli.engine.masks.validation import check_condition_labels, check_scheme
from maisi_cli.engine.memory import MaskGrid, check_host_memory, mask_stage_terms
from maisi_cli.errors import MaskError
from maisi_cli.label_schemes import LabelScheme
from maisi_cli.io.label_maps import label_counts, relabelled
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


def mask_grid_of(header: NiftiHeader, path: Path, spacing: FloatTriple, field: str) -> MaskGrid:
    """What reading a mask with this header and fitting it to `spacing` will allocate; an absurd voxel spacing in
    the header is refused."""
    original = voxel_spacing(header.affine)
    if spacing_problem(original):
        low, high = SPACING_RANGE_MM
        raise MaskError(f"{field}: '{path}' has voxel spacing {'x'.join(f'{s:g}' for s in original)} mm in its "
                        f"header, outside [{low:g}, {high:g}] mm; fix its header or resample the mask")
    same_spacing = np.allclose(sorted_by_ras(original, header.affine), spacing, rtol=1e-3, atol=1e-4)
    resampled = None if same_spacing else resampled_grid(header.shape, header.affine, spacing)
    floating = bool(np.issubdtype(header.dtype, np.floating))
    return MaskGrid(header.shape, header.dtype.itemsize, floating, resampled)


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
    user_mask_grid(UserMask(path, "file", read_nifti_header(path)), size, spacing)
    data, affine = read_nifti(path)
    labels, unmapped = labels_in_maisi_ids(data, scheme, path)
    return replace(fitted_condition_mask(labels, affine, size, spacing, path, "--mask"), unmapped=unmapped)


def labels_in_maisi_ids(data: np.ndarray, scheme: LabelScheme | None, path: Path,
                        field: str = "--mask") -> tuple[np.ndarray, tuple[tuple[int, str, int], ...]]:
    """(uint8 MAISI ids, the classes `scheme` could not map): MAISI's own ids checked, a segmenter's converted."""
    if scheme is None or scheme.identity:
        return checked_labels(data, path, field), ()
    return converted_labels(data, scheme, path, field)


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
    classes = data if data.dtype in (np.uint8, np.uint16) else data.astype(np.uint16)  # whole numbers in 0..65535
    counts = label_counts(classes, high + 1)
    table = np.zeros(high + 1, dtype=np.uint8)
    unmapped = []
    for ident in np.flatnonzero(counts).tolist():
        voxels = int(counts[ident])
        if ident == 0:
            continue
        target = scheme.mapping.get(ident)  # the body 200 is in every segmenter's table (label_schemes)
        if target is None:
            unmapped.append((ident, scheme.class_names.get(ident, f"class {ident}"), voxels))
        else:
            table[ident] = target
    return relabelled(classes, table), tuple(unmapped)


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


def lost_labels(before: np.ndarray, after: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(label, voxels in `before`) for each label of `before` that `after` (its resampled copy) no longer holds."""
    counts_before, counts_after = label_counts(before), label_counts(after)
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


# --- a user's own map: read, converted, completed with the body, checked, then fitted -----------------------------


@dataclass(frozen=True)
class UserMask:
    """A user's label map before its voxels are read: a NIfTI file, a folder of one binary file per class (what
    TotalSegmentator writes by default), or an array given to the Python API (`path` is then `<array>`)."""
    path: Path
    kind: str  # "file", "folder" or "array"
    header: NiftiHeader
    array: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.kind != "array" else "<array>"

    def own_grid(self) -> tuple[Triple, FloatTriple]:
        """Its size and spacing on the RAS axes it is reoriented to."""
        affine = self.header.affine
        size = sorted_by_ras(tuple(float(count) for count in self.header.shape), affine)  # type: ignore[arg-type]
        spacing = sorted_by_ras(voxel_spacing(affine), affine)
        return (int(size[0]), int(size[1]), int(size[2])), tuple(round(s, 6) for s in spacing)  # type: ignore

    def read(self, scheme: LabelScheme) -> tuple[np.ndarray, list[str]]:
        """(its class ids as given, warnings of reading a class folder)."""
        if self.kind == "array":
            assert self.array is not None
            return self.array, []
        if self.kind == "folder":
            data, _, warnings = read_class_folder(self.path, scheme)
            return data, list(warnings)
        return read_nifti(self.path)[0], []


def user_mask_from_path(path: Path, scheme: LabelScheme, field: str = "--mask") -> UserMask:
    """A file's or a class folder's header (no voxel read): a degenerate affine, or a class folder's file that names
    no class of `scheme`, is refused here."""
    if path.is_dir():
        return UserMask(path, "folder", class_folder_header(path, field, scheme))
    return UserMask(path, "file", read_nifti_header(path, field))


def user_mask_from_array(data: np.ndarray, affine: np.ndarray, field: str = "mask") -> UserMask:
    """A label map given in memory, checked as a file's header would be."""
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise MaskError(f"{field}: a 3D label map is needed; this array has shape {data.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MaskError(f"{field}: the affine must be a finite, invertible 4×4 matrix (voxel to RAS mm)")
    problem = spacing_problem(voxel_spacing(affine))
    if problem:
        raise MaskError(f"{field}: the affine's voxel spacing is not usable; {problem}")
    header = NiftiHeader(tuple(int(s) for s in data.shape), data.dtype, affine)  # type: ignore[arg-type]
    return UserMask(Path("<array>"), "array", header, data)


def user_mask_grid(mask: UserMask, size: Triple, spacing: FloatTriple, field: str = "--mask") -> MaskGrid:
    """What reading the mask and fitting it to the grid will allocate, from its header alone; an absurd voxel
    spacing, or a fit that cannot fit the host memory, is refused here."""
    grid = mask_grid_of(mask.header, mask.path, spacing, field)
    check_mask_memory(mask.path, grid, mask.header, size, spacing)
    return grid


@dataclass(frozen=True)
class BodyEnvelope:
    """How a map without the body label gets it (`--body-from`): from the CT it was segmented from, or from its
    labels alone (approximate)."""
    method: str  # "ct" or "labels"
    ct: Path | None = None
    options: Any = None  # masks/body.py BodyEnvelopeOptions

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"method": self.method}
        if self.ct is not None:
            described["ct"] = str(self.ct)
        if self.options is not None:
            described["options"] = asdict(self.options)
        return described


def with_body(labels: np.ndarray, affine: np.ndarray, body: BodyEnvelope, name: str) -> tuple[np.ndarray, list[str]]:
    """The map with the body label added by `body`'s method; a map that has it already is kept as it is."""
    if np.any(labels == BODY_LABEL):
        return labels, [f"--body-from: '{name}' already holds the body label (200); kept as it is"]
    if body.method == "ct":
        assert body.ct is not None
        ct = read_body_ct(body.ct, tuple(labels.shape), affine)  # type: ignore[arg-type]
        return add_body_envelope(labels, ct, body.options), []
    return body_envelope_from_labels(labels, voxel_spacing(affine)), [f"--body-from labels: {BODY_METHOD_NOTE}"]


@dataclass(frozen=True)
class PreparedMask:
    mask: ConditionMask
    warnings: tuple[str, ...]
    counts: np.ndarray  # voxels per MAISI id of the fitted map


def prepare_user_mask(mask: UserMask, scheme: LabelScheme, body: BodyEnvelope | None, size: Triple,
                      spacing: FloatTriple, require_body: bool, field: str = "--mask") -> PreparedMask:
    """Read the map, convert its ids to MAISI's (`scheme`), check it is not another scheme's map, add the body
    (`body`), refuse ids outside the label dictionary or a missing body when `require_body`, then fit it to the
    grid. Everything here runs before any network loads."""
    raw, warnings = mask.read(scheme)
    labels, unmapped = labels_in_maisi_ids(raw, scheme, mask.path, field)
    if unmapped:
        warnings.append(unmapped_warning_for(unmapped, mask.name, scheme))
    warnings += check_scheme(labels if scheme.identity else raw, mask.header.affine, scheme, mask.name)
    del raw
    if body is not None:
        labels, body_warnings = with_body(labels, mask.header.affine, body, mask.name)
        warnings += body_warnings
    if not labels.any():
        raise MaskError(f"{field}: '{mask.path}' is all background (0); it needs at least a body (200) or organ "
                        "labels")
    if require_body:
        check_condition_labels(labels, mask.name)
    fitted = fitted_condition_mask(labels, mask.header.affine, size, spacing, mask.path, field)
    fitted = replace(fitted, unmapped=unmapped)
    if fitted.resampled:
        warnings.append(resample_warning(fitted, mask.path, size, spacing))
    return PreparedMask(fitted, tuple(warnings), label_counts(fitted.labels))


def unmapped_warning_for(unmapped: tuple[tuple[int, str, int], ...], name: str, scheme: LabelScheme) -> str:
    """One line naming the classes --mask-labels could not map (they are left out of the condition)."""
    listed = ", ".join(f"{ident} {label} ({voxels} voxel{'' if voxels == 1 else 's'})"
                       for ident, label, voxels in unmapped)
    return (f"--mask-labels {scheme.name}: '{name}' holds classes with no MAISI label: {listed}; they are "
            "generated as background (map them in a .json table to keep them)")

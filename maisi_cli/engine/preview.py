"""A quick look at a CT and its label map: one RGB PNG with the three orthogonal planes, CT windowing, the labels as
coloured contours and a legend of their names (`maisi preview`, `maisi generate --preview`).

numpy, nibabel and Pillow only (no torch, Typer or rich).

Orientation. The volumes are first reoriented to the closest canonical RAS grid (array axis 0 towards the patient's
right, axis 1 anterior, axis 2 towards the head). The axial plane is shown as radiologists read it: anterior at the
top and the patient's right on the viewer's left; the coronal plane with the head up and the patient's right on the
viewer's left; the sagittal plane with the head up and anterior on the viewer's left. All three panels share one
scale in mm per pixel, so pixels are square in mm whatever the voxel spacing.

Labels. Each label is drawn as its boundary (a label pixel with a 4-neighbour of another label), computed on the
panel's pixels, in a fixed colour per label id (maisi_cli/colours.py: the colours of the colour tables and
.seg.nrrd segments maisi writes). The body (label 200) outlines the whole body and is not drawn.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from nibabel import orientations

from maisi_cli.colours import label_colour
from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.io.files import write_output_file
from maisi_cli.io.nifti import read_nifti
from maisi_cli.labels import BODY_LABEL, label_dictionary

# Named CT windows: name → (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "liver": (80.0, 150.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOW = "soft-tissue"
HIDDEN_LABELS = frozenset({0, BODY_LABEL})  # background, and the body outline (it would circle everything)
PLANES = ("axial", "coronal", "sagittal")
PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the canonical axis each plane holds fixed
AXIS_NAMES = "xyz"

MIN_PANEL, MAX_PANEL = 64, 2048
GAP = 4  # pixels between panels and around the canvas
HEADER_ROW = 14  # one line of the title above everything
TITLE_HEIGHT = 16  # the line above each panel (the plane and its slice index)
LEGEND_ROW = 14  # one legend entry per row
LEGEND_COLUMN = 200  # width of one legend column
SWATCH = 10
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
MARKER = (255, 200, 40)  # the orientation letters (amber, with a black outline where the font allows)
MARKER_INSET = 2
# (top, bottom, left, right) letters of each plane as shown (plane_slices): R/L, A/P, S/I
ORIENTATION = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


# --- windows and slices -------------------------------------------------------------------------------------------
def parse_window(text: str) -> tuple[float, float]:
    """(level, width) in HU from a window name (soft-tissue, lung, bone, liver, brain) or `LEVEL,WIDTH`
    (e.g. `40,400`, `-600,1500`)."""
    key = text.strip().lower()
    if key in WINDOWS:
        return WINDOWS[key]
    parts = key.split(",")
    if len(parts) == 2:
        try:
            level, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            if not (math.isfinite(level) and math.isfinite(width)):
                pass
            elif width <= 0:
                raise UsageError(f"--window: width {parts[1].strip()} must be positive (LEVEL,WIDTH in HU, "
                                 "e.g. 40,400)")
            else:
                return level, width
    raise UsageError(f"--window: '{text}' is not a window; use {', '.join(WINDOWS)} or LEVEL,WIDTH in HU "
                     "(e.g. 40,400)")


def window_to_uint8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU → 0..255: level − width/2 and below is black, level + width/2 and above is white, linear between."""
    if width <= 0:
        raise ValueError("width must be positive")
    low = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) / width
    return np.round(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def parse_slice(text: str | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel indices (x, y, z) of the sagittal, coronal and axial planes in the canonical RAS grid: `X,Y,Z`, or the
    mid-planes when `text` is None."""
    if text is None:
        return tuple(int(n) // 2 for n in shape)  # type: ignore[return-value]
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise UsageError(f"--slice: '{text}' is not X,Y,Z; give three voxel indices, e.g. "
                         f"{','.join(str(int(n) // 2) for n in shape)}")
    index = tuple(int(p) for p in parts)
    for axis, (i, n) in enumerate(zip(index, shape)):
        if not 0 <= i < n:
            raise UsageError(f"--slice: {AXIS_NAMES[axis]}={i} is outside the volume (0..{n - 1} on that axis of "
                             f"the RAS grid, shape {'x'.join(str(int(s)) for s in shape)})")
    return index  # type: ignore[return-value]


# --- orientation --------------------------------------------------------------------------------------------------
def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) flipped and transposed to the closest canonical RAS grid (as nibabel's as_closest_canonical)."""
    ornt = orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    moved = orientations.apply_orientation(data, ornt)
    return moved, affine @ orientations.inv_ornt_aff(ornt, data.shape)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def plane_slices(volume: np.ndarray, index: Sequence[int]) -> dict[str, np.ndarray]:
    """The three planes through voxel `index` of a canonical RAS volume, as 2-D arrays (rows top to bottom, columns
    left to right) in viewing orientation: axial anterior up and patient's right on the left; coronal head up and
    patient's right on the left; sagittal head up and anterior on the left."""
    x, y, z = (int(i) for i in index)
    return {
        "axial": volume[::-1, ::-1, z].T,  # rows: anterior → posterior; columns: right → left
        "coronal": volume[::-1, y, ::-1].T,  # rows: head → feet; columns: right → left
        "sagittal": volume[x, ::-1, ::-1].T,  # rows: head → feet; columns: anterior → posterior
    }


def plane_pixel_mm(spacing: Sequence[float]) -> dict[str, tuple[float, float]]:
    """(row, column) size in mm of a voxel in each plane of `plane_slices`."""
    sx, sy, sz = (float(s) for s in spacing)
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}


def display_shapes(shape: Sequence[int], spacing: Sequence[float], panel_size: int) -> dict[str, tuple[int, int]]:
    """(height, width) in pixels of each plane: one mm-per-pixel scale for all three, the volume's largest extent
    filling `panel_size`."""
    extents = [int(n) * float(s) for n, s in zip(shape, spacing)]
    mm_per_pixel = max(extents) / panel_size
    planes = plane_slices(np.empty(tuple(int(n) for n in shape), dtype=np.bool_), [0, 0, 0])
    sizes = plane_pixel_mm(spacing)
    shapes = {}
    for name, plane in planes.items():
        rows, cols = plane.shape
        height = rows * sizes[name][0] / mm_per_pixel
        width = cols * sizes[name][1] / mm_per_pixel
        shapes[name] = (min(panel_size, max(1, round(height))), min(panel_size, max(1, round(width))))
    return shapes


def resample_nearest(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2-D array to `shape` (pixel centres aligned, as Pillow's resize)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * plane.shape[0] / shape[0]).astype(np.int64), plane.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * plane.shape[1] / shape[1]).astype(np.int64), plane.shape[1] - 1)
    return plane[rows[:, None], cols[None, :]]


# --- labels -------------------------------------------------------------------------------------------------------
def contour_mask(labels: np.ndarray, hidden: frozenset[int] | set[int] = HIDDEN_LABELS) -> np.ndarray:
    """True where a pixel of a shown label has a 4-neighbour (inside the array) holding another label."""
    labels = np.asarray(labels)
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    shown = ~np.isin(labels, list(hidden))
    return differs & shown


def label_name(ident: int) -> str:
    names = {value: name for name, value in label_dictionary().items()}
    return names.get(int(ident), f"label {int(ident)}")


# --- layout -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where everything goes on the canvas: the title (`header_lines` lines), three `panel_size` squares in a row
    under their plane names, then the legend in columns of LEGEND_COLUMN pixels, one entry per LEGEND_ROW, filled
    row by row. The legend is never taller than a panel: when its entries need more rows than that, it takes more
    columns and the canvas widens."""
    panel_size: int
    legend_entries: int
    header_lines: int = 1

    @property
    def panels_width(self) -> int:
        return 3 * self.panel_size + 4 * GAP

    @property
    def max_legend_rows(self) -> int:
        return max(1, self.panel_size // LEGEND_ROW)

    @property
    def legend_columns(self) -> int:
        fitting = max(1, (self.panels_width - GAP) // LEGEND_COLUMN)
        return max(fitting, math.ceil(self.legend_entries / self.max_legend_rows))

    @property
    def legend_rows(self) -> int:
        return math.ceil(self.legend_entries / self.legend_columns)

    @property
    def width(self) -> int:
        legend = GAP + min(self.legend_columns, max(1, self.legend_entries)) * LEGEND_COLUMN
        return max(self.panels_width, legend if self.legend_entries else 0)

    @property
    def panels_top(self) -> int:
        """The top of the plane names' line (under the title)."""
        return GAP + self.header_lines * HEADER_ROW

    @property
    def legend_top(self) -> int:
        return self.panels_top + TITLE_HEIGHT + self.panel_size + GAP

    @property
    def height(self) -> int:
        return self.legend_top + (self.legend_rows * LEGEND_ROW + GAP if self.legend_entries else 0)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def panel_box(self, position: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of panel 0 (axial), 1 (coronal) or 2 (sagittal)."""
        left = GAP + position * (self.panel_size + GAP)
        top = self.panels_top + TITLE_HEIGHT
        return left, top, left + self.panel_size, top + self.panel_size

    def legend_cell(self, entry: int) -> tuple[int, int]:
        """(left, top) of legend entry `entry` (filled row by row)."""
        row, column = divmod(entry, self.legend_columns)
        return GAP + column * LEGEND_COLUMN, self.legend_top + row * LEGEND_ROW

    def swatch_box(self, entry: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), exclusive, of legend entry `entry`'s colour swatch."""
        left, top = self.legend_cell(entry)
        top += (LEGEND_ROW - SWATCH) // 2
        return left, top, left + SWATCH, top + SWATCH


# --- rendering ----------------------------------------------------------------------------------------------------
@dataclass
class Preview:
    image: object  # PIL.Image.Image
    slice: tuple[int, int, int]
    window: tuple[float, float]
    labels: list[int] = field(default_factory=list)  # ids drawn, in legend order
    layout: Layout | None = None
    title: str = ""
    # plane → [(letter, (x, y) of the letter's centre on the canvas)]: top, bottom, left, right
    markers: dict[str, list[tuple[str, tuple[int, int]]]] = field(default_factory=dict)

    def as_dict(self, out: Path) -> dict:
        return {
            "out": str(out),
            "size": list(self.image.size),  # type: ignore[attr-defined]
            "title": self.title,
            "slice": list(self.slice),
            "window": {"level": self.window[0], "width": self.window[1]},
            "labels": [{"id": i, "name": label_name(i), "colour": "#%02x%02x%02x" % label_colour(i)}
                       for i in self.labels],
        }


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def wrap_parts(draw, parts: Sequence[str], font, width: int, separator: str = "  |  ") -> list[str]:
    """The parts joined on lines no wider than `width` (a part alone on a line is cut to fit)."""
    lines: list[str] = []
    for part in parts:
        if lines and draw.textlength(lines[-1] + separator + part, font=font) <= width:
            lines[-1] += separator + part
        else:
            lines.append(_fit_text(draw, part, font, width))
    return lines


def window_text(window: tuple[float, float], name: str | None = None) -> str:
    """'window soft-tissue (L 40, W 400 HU)' or 'window L 40, W 400 HU'."""
    level, width = window
    return f"window {name} (L {level:g}, W {width:g} HU)" if name else f"window L {level:g}, W {width:g} HU"


def title_parts(window: tuple[float, float], index: Sequence[int], window_name: str | None = None,
                info=None) -> list[str]:
    """The title's parts: window, slice indices, and from the sample's sidecar (engine/sample_info.SampleInfo)
    the sample, its seed and QC verdict."""
    x, y, z = (int(i) for i in index)
    parts = [window_text(window, window_name), f"slices x={x} y={y} z={z}"]
    if info is not None:
        if info.index is not None:
            parts.insert(0, f"sample {info.index}")
        if info.seed is not None:
            parts.append(f"seed {info.seed}")
        parts.append(info.verdict)
    return parts


def orientation_letters(name: str) -> tuple[str, str, str, str]:
    """(top, bottom, left, right) of a plane as plane_slices shows it."""
    return ORIENTATION[name]


def draw_markers(draw, font, box: tuple[int, int, int, int], name: str) -> list[tuple[str, tuple[int, int]]]:
    """The plane's orientation letters inside the image's edges (`box`: left, top, right, bottom, exclusive)."""
    from PIL import ImageFont

    left, top, right, bottom = box
    middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
    top_letter, bottom_letter, left_letter, right_letter = orientation_letters(name)
    placed = []
    for letter, anchor in ((top_letter, "top"), (bottom_letter, "bottom"), (left_letter, "left"),
                           (right_letter, "right")):
        x0, y0, x1, y1 = draw.textbbox((0, 0), letter, font=font)
        w, h = x1 - x0, y1 - y0
        x = {"left": left + MARKER_INSET, "right": right - MARKER_INSET - w}.get(anchor, middle_x - w // 2)
        y = {"top": top + MARKER_INSET, "bottom": bottom - MARKER_INSET - h}.get(anchor, middle_y - h // 2)
        # an outline keeps the letter readable on bright bone; bitmap fonts (Pillow without FreeType) have none
        stroke = {"stroke_width": 1, "stroke_fill": BACKGROUND} if isinstance(font, ImageFont.FreeTypeFont) else {}
        draw.text((x - x0, y - y0), letter, fill=MARKER, font=font, **stroke)
        placed.append((letter, (x + w // 2, y + h // 2)))
    return placed


def render_preview(image: np.ndarray, spacing: Sequence[float], labels: np.ndarray | None = None,
                   index: Sequence[int] | None = None, window: tuple[float, float] = WINDOWS[DEFAULT_WINDOW],
                   panel_size: int = 256, window_name: str | None = None, info=None) -> Preview:
    """The preview of a canonical RAS `image` in HU (and its label map on the same grid) as an RGB Pillow image:
    a title (window, slice indices; with `info`, a SampleInfo from the sample's sidecar, its index, seed and QC
    verdict), the three planes with their orientation letters, and a legend of the labels drawn in them."""
    from PIL import Image, ImageDraw, ImageFont  # only to draw: `maisi qc` imports this module and draws nothing

    shape = image.shape
    index = tuple(int(n) // 2 for n in shape) if index is None else tuple(int(i) for i in index)
    shapes = display_shapes(shape, spacing, panel_size)
    grey_planes = plane_slices(image, index)
    label_planes = plane_slices(labels, index) if labels is not None else None

    panels: dict[str, np.ndarray] = {}
    shown: set[int] = set()
    for name in PLANES:
        height, width = shapes[name]
        grey = Image.fromarray(np.ascontiguousarray(window_to_uint8(grey_planes[name], *window)))
        rgb = np.array(grey.resize((width, height), Image.Resampling.BILINEAR).convert("RGB"))
        if label_planes is not None:
            display_labels = resample_nearest(np.asarray(label_planes[name]).astype(np.int64), (height, width))
            shown.update(draw_contours(rgb, display_labels))
        panels[name] = rgb

    ordered = sorted(shown)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = title_parts(window, index, window_name, info)
    lines = wrap_parts(measure, title, font, Layout(panel_size, len(ordered)).width - 2 * GAP)
    layout = Layout(panel_size, len(ordered), len(lines))
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((GAP, GAP + row * HEADER_ROW), line, fill=TEXT, font=font)
    markers = {}
    for position, name in enumerate(PLANES):
        left, top, right, bottom = layout.panel_box(position)
        height, width = shapes[name]
        image_left, image_top = left + (panel_size - width) // 2, top + (panel_size - height) // 2
        canvas.paste(Image.fromarray(panels[name]), (image_left, image_top))
        markers[name] = draw_markers(draw, font, (image_left, image_top, image_left + width, image_top + height),
                                     name)
        axis = PLANE_AXIS[name]
        caption = f"{name} {AXIS_NAMES[axis]}={index[axis]}"
        draw.text((left, layout.panels_top), _fit_text(draw, caption, font, panel_size), fill=TEXT, font=font)
    for entry, ident in enumerate(ordered):
        left, top = layout.legend_cell(entry)
        swatch = layout.swatch_box(entry)
        draw.rectangle((swatch[0], swatch[1], swatch[2] - 1, swatch[3] - 1), fill=label_colour(ident))
        text = _fit_text(draw, f"{ident} {label_name(ident)}", font, LEGEND_COLUMN - SWATCH - 10)
        draw.text((left + SWATCH + 4, top), text, fill=TEXT, font=font)
    return Preview(canvas, index, window, ordered, layout, "  |  ".join(title), markers)  # type: ignore[arg-type]


def draw_contours(rgb: np.ndarray, display_labels: np.ndarray) -> list[int]:
    """Each shown label's boundary painted into `rgb` (in place) in its fixed colour; the ids drawn."""
    edge = contour_mask(display_labels)
    drawn = np.unique(display_labels[edge]).tolist()
    for ident in drawn:
        rgb[edge & (display_labels == ident)] = label_colour(ident)
    return [int(i) for i in drawn]


# --- files --------------------------------------------------------------------------------------------------------
def _read(path: Path, field_name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return read_nifti(path, field=field_name, what=what)
    except UsageError:
        raise
    except MaisiError as error:  # a missing or unreadable file is a wrong argument here
        raise UsageError(str(error)) from None


def load_volumes(image_path: Path, mask_path: Path | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """(image, label map or None, voxel spacing), both on the canonical RAS grid. A label map that is not on the
    image's grid (shape or affine) is a UsageError naming MASK."""
    image, affine = _read(image_path, "IMAGE", "CT image")
    labels = None
    if mask_path is not None:
        labels, mask_affine = _read(mask_path, "MASK", "label map")
        if labels.shape != image.shape:
            raise UsageError(f"MASK: '{mask_path}' has shape {'x'.join(map(str, labels.shape))}, IMAGE has "
                             f"{'x'.join(map(str, image.shape))}; give the label map of this image (same grid)")
        if not np.allclose(mask_affine, affine, atol=1e-3):
            raise UsageError(f"MASK: '{mask_path}' has another affine than IMAGE (different spacing, origin or "
                             "orientation); give the label map of this image (same grid)")
        if not np.issubdtype(labels.dtype, np.integer):
            rounded = np.rint(labels)
            if not np.array_equal(rounded, labels):
                raise UsageError(f"MASK: '{mask_path}' holds non-integer values; give a label map")
            labels = rounded.astype(np.int64)
        labels, _ = to_canonical(labels, mask_affine)
    image, canonical_affine = to_canonical(image, affine)
    return image, labels, voxel_spacing(canonical_affine)


def check_panel_size(panel_size: int) -> None:
    if not MIN_PANEL <= panel_size <= MAX_PANEL:
        raise UsageError(f"--panel-size: {panel_size} is outside {MIN_PANEL}..{MAX_PANEL} pixels")


def check_out(out: Path) -> None:
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: '{out}' must name a .png file")
    if out.is_dir():
        raise UsageError(f"--out: '{out}' is a folder; name a .png file")


def write_png(path: Path, image) -> None:
    """The PNG written atomically (a temporary name in the same folder, then renamed)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    write_output_file(path, buffer.getvalue(), "--out")


def make_preview(image_path: Path, mask_path: Path | None, out: Path | None = None, window: str = DEFAULT_WINDOW,
                 slice_text: str | None = None, panel_size: int = 256) -> Preview:
    """Check every argument, read the volumes, render, write `out` (default: beside the image,
    sample_0000_image.nii.gz → sample_0000_preview.png). The title takes the sample's seed and QC verdict from its
    sidecar when it has one. Nothing is written when a check fails."""
    from maisi_cli.engine.sample_info import info_for_image

    out = sample_preview_path(image_path) if out is None else out
    check_out(out)
    check_panel_size(panel_size)
    level_width = parse_window(window)
    image, labels, spacing = load_volumes(image_path, mask_path)
    index = parse_slice(slice_text, image.shape)
    preview = render_preview(image, spacing, labels, index, level_width, panel_size, window_name(window),
                             info_for_image(image_path))
    write_png(out, preview.image)
    return preview


def window_name(text: str) -> str | None:
    """The window's name when `text` names one (soft-tissue, lung, ...), else None (LEVEL,WIDTH)."""
    key = text.strip().lower()
    return key if key in WINDOWS else None


def sample_preview_path(image_path: Path) -> Path:
    """sample_0000_image.nii.gz → sample_0000_preview.png (beside it)."""
    name = image_path.name
    for suffix in ("_image.nii.gz", "_image.nii", ".nii.gz", ".nii"):
        if name.endswith(suffix):
            return image_path.with_name(name[: -len(suffix)] + "_preview.png")
    return image_path.with_name(name + "_preview.png")


def write_sample_preview(image_path: Path, label_path: Path, missing_only: bool = False) -> Path | None:
    """`maisi generate --preview`: sample_NNNN_preview.png beside a written pair (mid-planes, soft-tissue window).
    With `missing_only`, an existing preview is kept (None is returned)."""
    out = sample_preview_path(image_path)
    if missing_only and out.is_file():
        return None
    make_preview(image_path, label_path, out)
    return out

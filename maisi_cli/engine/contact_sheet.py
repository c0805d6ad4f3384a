"""`maisi preview --sheet RUN_DIR`: one PNG with a tile per sample of a run folder, to see a whole run at a glance.

Each tile is the sample's mid-axial plane (shown as `maisi preview` shows it: anterior up, the patient's right on the
viewer's left, square millimetres), in the CT window, with its label map's contours in the fixed label colours;
under it, the sample's index, its QC verdict (red when it failed) and its seed, from the sidecar. Tiles are laid out
row by row in a near-square grid. Samples are those with a sidecar (complete ones); numpy, nibabel and Pillow only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maisi_cli.engine.preview import (BACKGROUND, DEFAULT_WINDOW, GAP, TEXT, _fit_text, check_out, display_shapes,
                                      draw_contours, load_volumes, parse_window, plane_slices, resample_nearest,
                                      window_name, window_text, window_to_uint8, wrap_parts, write_png)
from maisi_cli.engine.sample_info import SampleInfo, run_samples
from maisi_cli.errors import UsageError

DEFAULT_TILE = 192
MIN_TILE, MAX_TILE = 64, 1024
CAPTION_LINE = 13
CAPTION_LINES = 2
HEADER_LINE = 14
FAILED = (255, 80, 80)
PASSED = (140, 230, 140)
READABLE_FORMATS = ("nifti", "nii")
SHEET_NAME = "contact_sheet.png"


@dataclass(frozen=True)
class SheetLayout:
    """`count` tiles of `tile` pixels in `columns` columns, each with CAPTION_LINES lines under it, under a title."""
    count: int
    tile: int
    columns: int
    header_lines: int = 1

    @property
    def header(self) -> int:
        return GAP + self.header_lines * HEADER_LINE

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.columns)

    @property
    def cell(self) -> tuple[int, int]:
        """(width, height) of one tile with its caption, gap included."""
        return self.tile + GAP, self.tile + CAPTION_LINES * CAPTION_LINE + GAP

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.cell
        return GAP + self.columns * width, self.header + GAP + self.rows * height

    def tile_box(self, position: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), exclusive, of tile `position` (row by row)."""
        row, column = divmod(position, self.columns)
        width, height = self.cell
        left, top = GAP + column * width, self.header + GAP + row * height
        return left, top, left + self.tile, top + self.tile


def sheet_columns(count: int) -> int:
    """A near-square grid, at most 8 tiles wide."""
    return max(1, min(8, math.ceil(math.sqrt(count))))


@dataclass
class Tile:
    index: int
    box: tuple[int, int, int, int]
    caption: list[str]
    verdict: str
    labels: list[int] = field(default_factory=list)  # ids drawn on the tile


@dataclass
class Sheet:
    image: object  # PIL.Image.Image
    layout: SheetLayout
    tiles: list[Tile]
    title: str

    def as_dict(self, out: Path) -> dict:
        return {"out": str(out), "size": list(self.image.size), "title": self.title,  # type: ignore[attr-defined]
                "columns": self.layout.columns, "rows": self.layout.rows,
                "tiles": [{"sample": t.index, "box": list(t.box), "caption": t.caption, "verdict": t.verdict}
                          for t in self.tiles]}


def sample_files(info: SampleInfo) -> tuple[Path, Path | None]:
    """(image, label or None) of a sample, checked readable: NIfTI written by maisi and still there."""
    where = f"RUN_DIR: sample {info.index} ({info.sidecar.name})"
    if info.output_format not in READABLE_FORMATS:
        raise UsageError(f"{where} was written as {info.output_format}; the sheet reads NIfTI: "
                         "`maisi convert` the run to --format nifti first")
    image = info.path_of("image")
    if image is None or not image.is_file():
        raise UsageError(f"{where}: its image {info.image!r} is missing; copy the folder again or re-run "
                         "`maisi generate` into it")
    label = info.path_of("label")
    if info.label is not None and (label is None or not label.is_file()):
        raise UsageError(f"{where}: its label map {info.label!r} is missing; copy the folder again or re-run "
                         "`maisi generate` into it")
    return image, label


def axial_tile(image_path: Path, label_path: Path | None, window: tuple[float, float], tile: int
               ) -> tuple[np.ndarray, list[int]]:
    """The mid-axial plane as RGB, fitted into a `tile` square (square millimetres), and the label ids drawn."""
    from PIL import Image

    volume, labels, spacing = load_volumes(image_path, label_path)
    index = tuple(int(n) // 2 for n in volume.shape)
    height, width = display_shapes(volume.shape, spacing, tile)["axial"]
    grey = np.ascontiguousarray(window_to_uint8(plane_slices(volume, index)["axial"], *window))
    rgb = np.array(Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR).convert("RGB"))
    drawn: list[int] = []
    if labels is not None:
        shown = resample_nearest(np.asarray(plane_slices(labels, index)["axial"]).astype(np.int64), (height, width))
        drawn = draw_contours(rgb, shown)
    return rgb, drawn


def render_sheet(run: Path, window: str = DEFAULT_WINDOW, tile: int = DEFAULT_TILE) -> Sheet:
    """The contact sheet of every complete sample of `run`."""
    from PIL import Image, ImageDraw, ImageFont

    if not run.is_dir():
        raise UsageError(f"--sheet: '{run}' is not a folder; give a folder `maisi generate` wrote")
    if not MIN_TILE <= tile <= MAX_TILE:
        raise UsageError(f"--panel-size: {tile} is outside {MIN_TILE}..{MAX_TILE} pixels for a sheet's tiles")
    level_width = parse_window(window)
    samples = run_samples(run)
    if not samples:
        raise UsageError(f"--sheet: '{run}' holds no complete sample (no sample_NNNN.json); give a folder "
                         "`maisi generate` wrote, after its run has finished")
    files = [sample_files(info) for info in samples]  # every file checked before any is read
    font = ImageFont.load_default()
    failed = sum(info.qc_passed is False for info in samples)
    checked = sum(info.qc_passed is not None for info in samples)
    title = [f"{run.resolve().name}: {len(samples)} sample(s)", "mid-axial planes",
             window_text(level_width, window_name(window))]
    if checked:
        title.append(f"QC {checked - failed} passed, {failed} failed")
    columns = sheet_columns(len(samples))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrap_parts(measure, title, font, SheetLayout(len(samples), tile, columns).size[0] - 2 * GAP, ", ")
    layout = SheetLayout(len(samples), tile, columns, len(lines))
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((GAP, GAP + row * HEADER_LINE), line, fill=TEXT, font=font)
    tiles = []
    for position, (info, (image_path, label_path)) in enumerate(zip(samples, files)):
        left, top, right, bottom = layout.tile_box(position)
        rgb, drawn = axial_tile(image_path, label_path, level_width, tile)
        canvas.paste(Image.fromarray(rgb), (left + (tile - rgb.shape[1]) // 2, top + (tile - rgb.shape[0]) // 2))
        index = info.index if info.index is not None else position
        caption = [f"sample {index}  {info.verdict}", f"seed {info.seed}" if info.seed is not None else "seed -"]
        colour = FAILED if info.qc_passed is False else PASSED if info.qc_passed else TEXT
        for line, (text, fill) in enumerate(zip(caption, (colour, TEXT))):
            draw.text((left, bottom + 1 + line * CAPTION_LINE), _fit_text(draw, text, font, tile), fill=fill,
                      font=font)
        tiles.append(Tile(index, (left, top, right, bottom), caption, info.verdict, drawn))
    return Sheet(canvas, layout, tiles, ", ".join(title))


def make_sheet(run: Path, out: Path | None = None, window: str = DEFAULT_WINDOW, tile: int = DEFAULT_TILE
               ) -> tuple[Sheet, Path]:
    """Render the sheet of `run` and write it to `out` (default RUN_DIR/contact_sheet.png), atomically."""
    out = run / SHEET_NAME if out is None else out
    check_out(out)
    sheet = render_sheet(run, window, tile)
    write_png(out, sheet.image)
    return sheet, out

"""The charts maisi draws with matplotlib: the QC report of a CT (`maisi qc --report`, `maisi generate --report`) and
the FID bar chart (`maisi fid --plot`).

matplotlib is imported inside the functions that draw, never at module import, so `maisi --help` and the commands
that draw nothing do not pay for it; figures are made with the object-oriented API on an Agg canvas (no pyplot, no
global backend switch: a notebook that calls the API keeps its own backend). Each function returns what it drew
(panels, their pixel boxes, the failing organs, the title) so tests and callers can check the picture without
reading pixels.

QC report: one panel per organ of the statistics, on its own HU axis (lung near -850 and soft tissue near 50 would
not be readable on one axis): the training range [low, high] the check uses as a green band, the organ's HU
distribution in this CT as a box (25th-75th percentile) with whiskers (5th-95th), and the median the check compares
as a black diamond. A failing organ's box, median and verdict are red and the panel says FAIL; an organ absent from
the label map says so. The title gives the verdict.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from maisi_cli.errors import UsageError
from maisi_cli.io.files import write_output_file

DPI = 100
FAIL_RED = "#dc1e1e"  # (220, 30, 30): a failing organ's box and verdict
PASS_BLUE = "#4682b4"  # (70, 130, 180): a passing organ's box
RANGE_GREEN = "#c8e6c8"  # (200, 230, 200): the training range
PASS_GREEN = "#2e7d32"
GREY = "#777777"


@dataclass
class Chart:
    """What a chart shows: its title, its panels (organs, or planes for FID) with their pixel boxes (left, top,
    right, bottom, from the image's top-left), and for a QC report the failing organs and each organ's verdict."""
    title: str
    size: tuple[int, int]
    panels: list[str]
    boxes: list[tuple[int, int, int, int]]
    failed: list[str] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)

    def as_dict(self, out: Path) -> dict[str, Any]:
        panels = []
        for name, box in zip(self.panels, self.boxes):
            panel: dict[str, Any] = {"name": name, "box": list(box)}
            if name in self.verdicts:
                panel["verdict"] = self.verdicts[name]
            if name in self.values:
                panel["value"] = self.values[name]
            panels.append(panel)
        return {"out": str(out), "size": list(self.size), "title": self.title, "panels": panels}


def check_png_path(path: Path, option: str) -> None:
    """A chart's output path: a .png file name, not a folder (checked before any work is done)."""
    if Path(path).suffix.lower() != ".png":
        raise UsageError(f"{option}: '{path}' must name a .png file, e.g. report.png")
    if Path(path).is_dir():
        raise UsageError(f"{option}: '{path}' is a folder; name a .png file in it")


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _pixel_box(figure, axes) -> tuple[int, int, int, int]:
    width, height = figure.get_size_inches() * figure.dpi
    box = axes.get_position()
    return (round(box.x0 * width), round((1 - box.y1) * height), round(box.x1 * width), round((1 - box.y0) * height))


def _write(figure, out: Path, option: str) -> tuple[int, int]:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    write_output_file(out, buffer.getvalue(), option)
    width, height = figure.get_size_inches() * figure.dpi
    return round(width), round(height)


# --- QC report ----------------------------------------------------------------------------------------------------
def qc_chart(out: Path, organs: Sequence[Mapping[str, Any]], quantiles: Mapping[str, Sequence[float]], passed: bool,
             subject: str, statistics: str, non_finite_voxels: int = 0, option: str = "--report") -> Chart:
    """Write the QC report of one CT to `out` (PNG). `organs` are the rows of QCReport.as_dict()["organs"] (organ,
    median_hu, low, high, voxels, verdict); `quantiles` each organ's 5/25/50/75/95th HU percentiles
    (engine/qc.organ_quantiles; an organ missing there is drawn with its median alone)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    rows = list(organs)
    failed = [str(row["organ"]) for row in rows if row["verdict"] == "fail"]
    verdict = "PASSED" if passed else "FAILED"
    reasons = failed + ([f"{non_finite_voxels} non-finite voxels"] if non_finite_voxels else [])
    title = f"{subject}: quality check {verdict}" + (f" ({', '.join(reasons)})" if reasons and not passed else "")
    figure = _figure(8.0, 1.3 + 0.62 * max(1, len(rows)))
    figure.suptitle(title, color=FAIL_RED if not passed else "black", fontsize=11, fontweight="bold", y=0.985)
    height_in = figure.get_size_inches()[1]
    figure.text(0.5, 1 - 0.42 / height_in, f"organ HU in this CT against the training range; statistics: {statistics}",
                ha="center", va="top", fontsize=8, color=GREY)
    top, bottom = 1 - 0.62 / height_in, 0.55 / height_in
    grid = figure.add_gridspec(max(1, len(rows)), 1, left=0.17, right=0.86, top=top, bottom=bottom, hspace=0.9)
    boxes, names, verdicts = [], [], {}
    for position, row in enumerate(rows):
        axes = figure.add_subplot(grid[position, 0])
        organ, row_verdict = str(row["organ"]), str(row["verdict"])
        low, high, median = float(row["low"]), float(row["high"]), row.get("median_hu")
        spread = quantiles.get(organ)
        values = [low, high] + ([float(median)] if median is not None else []) + list(spread or [])
        margin = max(10.0, 0.08 * (max(values) - min(values)))
        axes.set_xlim(min(values) - margin, max(values) + margin)
        axes.set_ylim(0, 1)
        axes.set_yticks([])
        axes.tick_params(axis="x", labelsize=7, length=2, pad=1)
        axes.axvspan(low, high, color=RANGE_GREEN, zorder=0)
        colour = FAIL_RED if row_verdict == "fail" else PASS_BLUE
        if spread is not None:
            p5, p25, _, p75, p95 = (float(v) for v in spread)
            axes.plot([p5, p25], [0.5, 0.5], color=colour, linewidth=1.2, zorder=2)
            axes.plot([p75, p95], [0.5, 0.5], color=colour, linewidth=1.2, zorder=2)
            axes.plot([p5, p5], [0.35, 0.65], color=colour, linewidth=1.2, zorder=2)
            axes.plot([p95, p95], [0.35, 0.65], color=colour, linewidth=1.2, zorder=2)
            axes.add_patch(Rectangle((p25, 0.22), max(p75 - p25, 1e-6), 0.56, facecolor=colour, edgecolor=colour,
                                     zorder=3))
        if median is not None:
            axes.plot([float(median)], [0.5], marker="D", markersize=6, color="black", markeredgecolor="white",
                      zorder=4)
        else:
            axes.text(0.5, 0.5, row_verdict, transform=axes.transAxes, ha="center", va="center", fontsize=8,
                      color=GREY)
        voxels = int(row.get("voxels") or 0)
        axes.text(-0.02, 0.5, f"{organ}\n{voxels} voxels", transform=axes.transAxes, ha="right", va="center",
                  fontsize=8)
        label, label_colour = {"fail": ("FAIL", FAIL_RED), "pass": ("pass", PASS_GREEN)}.get(
            row_verdict, (row_verdict, GREY))
        axes.text(1.02, 0.5, label, transform=axes.transAxes, ha="left", va="center", fontsize=9,
                  color=label_colour, fontweight="bold" if row_verdict == "fail" else "normal")
        if row_verdict == "fail":
            for spine in axes.spines.values():
                spine.set_edgecolor(FAIL_RED)
                spine.set_linewidth(1.5)
        names.append(organ)
        verdicts[organ] = row_verdict
        boxes.append(axes)
    handles = [Patch(facecolor=RANGE_GREEN, label="training range (check's low..high)"),
               Patch(facecolor=PASS_BLUE, label="HU 25-75 % (whiskers 5-95 %)"),
               Line2D([], [], marker="D", color="black", linestyle="none", label="median (checked)")]
    if failed:  # red appears in the picture only where an organ fails
        handles.append(Patch(facecolor=FAIL_RED, label="failing organ"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    if not rows:
        figure.text(0.5, 0.5, "the statistics list no organ", ha="center", fontsize=9)
    size = _write(figure, out, option)
    return Chart(title, size, names, [_pixel_box(figure, axes) for axes in boxes], failed, verdicts)


# --- FID ----------------------------------------------------------------------------------------------------------
def fid_chart(out: Path, planes: Mapping[str, float], average: float, subtitle: str = "",
              option: str = "--plot") -> Chart:
    """Write a bar chart of the FID of each plane and their average to `out` (PNG), each bar labelled with its
    value."""
    names = [plane.upper() for plane in planes] + ["average"]
    values = [float(v) for v in planes.values()] + [float(average)]
    figure = _figure(5.5, 3.6)
    axes = figure.add_axes((0.14, 0.14, 0.82, 0.70))
    colours = [PASS_BLUE] * len(planes) + ["#e07b39"]
    bars = axes.bar(names, values, color=colours, width=0.6)
    for bar, value in zip(bars, values):
        axes.annotate(f"{value:.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                      va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    top = max(values + [0.0])
    axes.set_ylim(min(0.0, min(values)) * 1.1, top * 1.15 if top > 0 else 1.0)
    axes.set_ylabel("FID (lower: closer to the real set)", fontsize=8)
    axes.tick_params(labelsize=8)
    title = f"2.5D FID per plane, average {average:.4g}"
    figure.suptitle(title, fontsize=10, fontweight="bold", y=0.97)
    if subtitle:
        figure.text(0.5, 0.885, subtitle, ha="center", fontsize=8, color=GREY)
    size = _write(figure, out, option)
    width, height = size
    boxes = []
    for bar in bars:  # each bar's pixel box, from the top-left
        (x0, y0), (x1, y1) = axes.transData.transform([(bar.get_x(), bar.get_y()),
                                                       (bar.get_x() + bar.get_width(), bar.get_y() + bar.get_height())])
        boxes.append((round(x0), round(height - max(y0, y1)), round(x1), round(height - min(y0, y1))))
    return Chart(title, size, names, boxes, values=dict(zip(names, values)))

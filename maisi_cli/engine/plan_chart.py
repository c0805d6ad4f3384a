"""`maisi profiles plan --plot FILE.png`: the predicted GPU memory of each stage (diffusion loop, decode), its terms
stacked, against the profile's budget.

matplotlib is imported only here and only when a chart is drawn (its Agg backend: no display needed); the PNG is
written through a temporary file and renamed into place.
"""

from __future__ import annotations

import io
from pathlib import Path

from maisi_cli.gpu_memory import GIB, MemoryEstimate
from maisi_cli.io.files import write_output_file

WIDTH_PX, HEIGHT_PX, DPI = 800, 500, 100


def plan_memory_chart(estimate: MemoryEstimate, budget_bytes: int, path: Path, title: str = "") -> Path:
    """Draw the chart into `path` (a .png) and return it."""
    path = Path(path).expanduser()
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; set before pyplot is imported
    import matplotlib.pyplot as plt

    stages = {"diffusion loop": estimate.diffusion_terms, "decode": estimate.decode_terms}
    terms = list(dict.fromkeys(t for parts in stages.values() for t in parts))
    colours = plt.get_cmap("tab10")
    figure, axes = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    try:
        bottoms = [0.0] * len(stages)
        for number, term in enumerate(terms):
            heights = [parts.get(term, 0) / GIB for parts in stages.values()]
            axes.bar(list(stages), heights, bottom=bottoms, width=0.5, label=term, color=colours(number % 10))
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        for x, total in enumerate(bottoms):
            axes.text(x, total, f"{total:.1f} GiB", ha="center", va="bottom")
        budget = budget_bytes / GIB
        axes.axhline(budget, color="black", linestyle="--", linewidth=1.2)
        axes.text(-0.45, budget, f"budget {budget:.1f} GiB", ha="left", va="bottom")
        axes.set_ylim(0, max(budget, *bottoms) * 1.15)
        axes.set_ylabel("predicted GPU memory (GiB)")
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    write_output_file(path, buffer.getvalue(), "--plot")
    return path

"""`maisi qc IMAGE MASK`: organ HU medians of a CT against the statistics; exit 3 when an organ is out of range."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

def model_statistics_file(name: str) -> Path | None:
    """The organ statistics a model ships (spec `datasets.qc_statistics`), or None for the packaged ones."""
    from maisi_cli.engine.weights import locate_weight
    from maisi_cli.models import get_model

    spec = get_model(name)
    return locate_weight(spec, "qc_statistics", None).path if "qc_statistics" in spec.datasets else None


HELP = "Check a CT's organ HU medians against the statistics (exit 3 on failure)."


def qc(
    ctx: typer.Context,
    image: Path = typer.Argument(..., metavar="IMAGE",
                                 help="CT image in HU (NIfTI), e.g. sample_0000_image.nii.gz."),
    mask: Path = typer.Argument(..., metavar="MASK",
                                help="Its full label map (NIfTI, MAISI label ids), on the same grid."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="HU statistics JSON (default: the model's, else the "
                                         "packaged image_median_statistics.json)."),
    model: Optional[str] = typer.Option(None, "--model", help="Check against this model's own statistics when it "
                                        "ships some (e.g. demo: its phantoms' organ medians)."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    import numpy as np

    from maisi_cli.engine.qc import check_quality, load_statistics
    from maisi_cli.errors import QualityCheckFailed
    from maisi_cli.io.nifti import read_nifti

    output = render.output_of(ctx.obj, json_flag)
    if stats is not None and model is not None:
        from maisi_cli.errors import UsageError

        raise UsageError("--stats/--model: give one of them (--model uses the model's own statistics)")
    statistics = load_statistics(stats if model is None else model_statistics_file(model))
    image_data, image_affine = read_nifti(image, field="IMAGE", what="CT image")
    mask_data, mask_affine = read_nifti(mask, field="MASK", what="label map")
    report = check_quality(image_data, mask_data, statistics)
    if not np.allclose(image_affine, mask_affine, atol=1e-4):
        render.warning("IMAGE and MASK have different affines; the check compares them voxel by voxel", output)

    if output.json:
        render.print_json({"image": str(image), "mask": str(mask), **report.as_dict()})
    else:
        rows = [(r.organ, "-" if r.median is None else f"{r.median:.1f}", f"{r.low:.2f}", f"{r.high:.2f}",
                 r.voxels, r.verdict) for r in report.organs]
        title = f"quality check {'passed' if report.passed else 'FAILED'} (statistics: {report.statistics})"
        if report.non_finite_voxels:
            title += f": {report.non_finite_voxels} non-finite voxels (NaN or inf)"
        render.print_table(title, ("organ", "median HU", "low", "high", "voxels", "verdict"), rows)
    if not report.passed:
        raise QualityCheckFailed(f"IMAGE: '{image}' failed the quality check: {report.summary()}")

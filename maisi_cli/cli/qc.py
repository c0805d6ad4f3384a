"""`maisi qc IMAGE MASK`: organ HU medians of a CT against the statistics; exit 3 when an organ is out of range."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

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

    from maisi_cli import checks  # the API's qc and preview, without torch: the command starts quickly
    from maisi_cli.errors import QualityCheckFailed
    from maisi_cli.io.nifti import read_nifti_header

    output = render.output_of(ctx.obj, json_flag)
    report = checks.qc(image, mask, stats=stats, model=model)
    if not np.allclose(read_nifti_header(image, "IMAGE", "CT image").affine,
                       read_nifti_header(mask, "MASK").affine, atol=1e-4):
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

"""`maisi qc IMAGE [MASK]`: organ HU medians of a CT against the statistics; exit 3 when an organ is out of range."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

HELP = ("Check a CT's organ HU medians against the statistics (exit 3 on failure); --report draws each organ's HU "
        "against its training range.")


def qc(
    ctx: typer.Context,
    image: Path = typer.Argument(..., metavar="IMAGE",
                                 help="CT image in HU (NIfTI), e.g. sample_0000_image.nii.gz."),
    mask: Optional[Path] = typer.Argument(None, metavar="MASK",
                                          help="Its full label map (NIfTI, MAISI label ids), on the same grid "
                                               "(default: the one its sidecar sample_NNNN.json names, else "
                                               "<name>_label.nii.gz beside IMAGE)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="HU statistics JSON (default: the model's — --model, "
                                         "else the one IMAGE's sidecar names — else the packaged "
                                         "image_median_statistics.json)."),
    model: Optional[str] = typer.Option(None, "--model", help="Check against this model's own statistics when it "
                                        "ships some (e.g. demo: its phantoms' organ medians)."),
    report_png: Optional[Path] = typer.Option(None, "--report", metavar="FILE.png", help="Also draw the check: "
                                              "each organ's HU distribution against its training range, failing "
                                              "organs in red."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    import numpy as np

    from maisi_cli import checks  # the API's qc and preview, without torch: the command starts quickly
    from maisi_cli.errors import QualityCheckFailed
    from maisi_cli.io.nifti import read_nifti_header

    output = render.output_of(ctx.obj, json_flag)
    if report_png is not None:
        from maisi_cli.engine.report_plots import check_png_path

        check_png_path(report_png, "--report")
    report = checks.qc(image, mask, stats=stats, model=model,
                       on_warning=lambda message: render.warning(message, output))
    mask = mask if mask is not None else checks.default_mask(image, checks.info_for_image(image))
    if not np.allclose(read_nifti_header(image, "IMAGE", "CT image").affine,
                       read_nifti_header(mask, "MASK").affine, atol=1e-4):
        render.warning("IMAGE and MASK have different affines; the check compares them voxel by voxel", output)
    chart = None
    if report_png is not None:
        chart = draw(report_png, image, mask, report)

    if output.json:
        render.print_json({"image": str(image), "mask": str(mask), **report.as_dict(),
                           **({"report": chart.as_dict(report_png)} if chart is not None else {})})
    else:
        rows = [(r.organ, "-" if r.median is None else f"{r.median:.1f}", f"{r.low:.2f}", f"{r.high:.2f}",
                 r.voxels, r.verdict) for r in report.organs]
        whose = f"{report.statistics_note}: " if report.statistics_note else ""
        title = f"quality check {'passed' if report.passed else 'FAILED'} (statistics: {whose}{report.statistics})"
        if report.non_finite_voxels:
            title += f": {report.non_finite_voxels} non-finite voxels (NaN or inf)"
        render.print_table(title, ("organ", "median HU", "low", "high", "voxels", "verdict"), rows)
        if chart is not None:
            render.info(f"wrote {report_png} ({chart.size[0]}x{chart.size[1]} px, {len(chart.panels)} organ(s))",
                        output)
    if not report.passed:
        raise QualityCheckFailed(f"IMAGE: '{image}' failed the quality check: {report.summary()}")


def draw(out: Path, image: Path, mask: Path, report):
    """The report's picture: the statistics the check used (the same file), the volumes read again."""
    from maisi_cli.engine.qc import PACKAGED, load_statistics
    from maisi_cli.engine.qc_report import draw_report, report_subject
    from maisi_cli.engine.sample_info import info_for_image
    from maisi_cli.io.nifti import read_nifti

    statistics = load_statistics(None if report.statistics == PACKAGED else Path(report.statistics))
    image_data, _ = read_nifti(image, "IMAGE", "CT image")
    mask_data, _ = read_nifti(mask, "MASK", "label map")
    return draw_report(out, image_data, mask_data, report, statistics, report_subject(image, info_for_image(image)))

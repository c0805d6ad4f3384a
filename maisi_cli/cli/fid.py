"""`maisi fid REAL SYNTH`: 2.5D FID per plane (XY, YZ, ZX) and their average; runs under `torchrun` as well."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

HELP = ("2.5D FID between real and synthetic CT volumes, per plane and averaged (--nproc N for N local processes; "
        "works under torchrun). The RadImageNet ResNet-50 weights: `maisi weights download radimagenet-resnet50`.")


def fid(
    ctx: typer.Context,
    real: Path = typer.Argument(..., metavar="REAL", help="Real volumes: a folder of NIfTI files, a datalist "
                                ".json ({\"training\": [{\"image\": …}]} or a list of paths) or a .txt file with "
                                "one path a line; relative paths are read from the list's folder."),
    synth: Path = typer.Argument(..., metavar="SYNTH", help="Synthetic volumes, in the same forms as REAL."),
    planes: str = typer.Option("xy,yz,zx", "--planes", help="Planes to slice, comma-separated: xy, yz, zx."),
    extractor: Optional[Path] = typer.Option(None, "--extractor", metavar="FILE", help="Weights file of the "
                                             "extractor. For radimagenet-resnet50: a RadImageNet ResNet-50 state "
                                             "dict; default $MAISI_HOME/fid/RadImageNet-ResNet50_notop.pth, else "
                                             "the copy `maisi weights download radimagenet-resnet50` fetched."),
    extractor_name: str = typer.Option("radimagenet-resnet50", "--extractor-name", metavar="NAME",
                                       help="Feature extractor: the built-in radimagenet-resnet50, or a plugin "
                                       "registered under the entry-point group maisi.extractors."),
    target_shape: str = typer.Option("512x512x512", "--target-shape", help="Pad (-1000 HU) and centre-crop every "
                                     "volume to this shape; 'none' keeps each volume's shape."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="Resample to this spacing in mm first, e.g. "
                                          "1.0x1.0x1.0 (default: no resampling)."),
    center_slices_ratio: Optional[float] = typer.Option(None, "--center-slices-ratio", help="Keep the central "
                                                        "fraction of slices along each axis, e.g. 0.4 (default: all)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Slices per forward pass of the extractor."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache folder; re-runs reuse features of "
                                         "unchanged files and parameters."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    nproc: int = typer.Option(1, "--nproc", metavar="N", help="Split the files over N local processes (gloo on "
                              "the CPU, one GPU each with NCCL); the result equals one process. Not with torchrun."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png", help="Also draw a bar chart of the FID "
                                        "of each plane and their average."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    from maisi_cli import api
    from maisi_cli.config import parse_size, parse_spacing

    output = render.output_of(ctx.obj, json_flag)
    if plot is not None:  # before the features are computed: a bad name must not cost a run
        from maisi_cli.engine.report_plots import check_png_path

        check_png_path(plot, "--plot")
    with render.progress(output) as on_progress:
        report = api.fid(
            real, synth, planes=[p for p in planes.split(",") if p.strip()],
            target_shape=None if target_shape.strip().lower() == "none" else parse_size(target_shape, "--target-shape"),
            spacing=None if spacing is None else parse_spacing(spacing, "--spacing"),
            center_slices_ratio=center_slices_ratio, batch_size=batch_size, extractor=extractor,
            extractor_name=extractor_name, cache=cache, device=device, nproc=nproc, on_progress=on_progress,
            on_warning=lambda message: render.warning(message, output))
    if report is None:  # a torchrun rank other than 0: rank 0 prints the result
        return
    chart = None
    if plot is not None:
        from maisi_cli.engine.report_plots import fid_chart

        chart = fid_chart(plot, report.planes, report.average,
                          f"{report.real_volumes} real vs {report.synth_volumes} synthetic volumes "
                          f"({real.name} vs {synth.name})")
    if output.json:
        render.print_json({"real": str(real), "synth": str(synth), **report.as_dict(),
                           **({"plot": chart.as_dict(plot)} if chart is not None else {})})
    else:
        rows = [(plane.upper(), f"{value:.6g}", report.real_slices[plane], report.synth_slices[plane])
                for plane, value in report.planes.items()]
        rows.append(("average", f"{report.average:.6g}", "", ""))
        title = (f"FID: {report.real_volumes} real vs {report.synth_volumes} synthetic volumes, "
                 f"{report.features} features ({report.computed} computed, {report.cached} from cache)")
        render.print_table(title, ("plane", "FID", "real slices", "synth slices"), rows)
        if chart is not None:
            render.info(f"wrote {plot} ({chart.size[0]}x{chart.size[1]} px)", output)

"""`maisi preview IMAGE [MASK] --out FILE.png`: the three orthogonal planes of a CT with its labels as contours."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

HELP = ("Write one PNG of a CT's axial, coronal and sagittal planes (CT window), with the label map's organs as "
        "coloured contours and a legend of their names.")


def preview(
    ctx: typer.Context,
    image: Path = typer.Argument(..., metavar="IMAGE", help="CT image in HU (NIfTI), e.g. sample_0000_image.nii.gz."),
    mask: Optional[Path] = typer.Argument(None, metavar="MASK",
                                          help="Its label map (NIfTI, MAISI label ids) on the same grid: drawn as "
                                               "contours; the body (label 200) is not drawn."),
    out: Path = typer.Option(..., "--out", "-o", help="The PNG to write (FILE.png)."),
    window: str = typer.Option("soft-tissue", "--window", "-w",
                               help="CT window: soft-tissue (40,400), lung (-600,1500), bone (400,1800), "
                                    "liver (80,150), brain (40,80), or LEVEL,WIDTH in HU, e.g. 40,400."),
    slice_text: Optional[str] = typer.Option(None, "--slice", help="X,Y,Z voxel indices of the sagittal, coronal "
                                             "and axial planes in the RAS-reoriented grid (default: mid-planes)."),
    panel_size: int = typer.Option(256, "--panel-size", help="Pixels per panel side (64..2048)."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    from maisi_cli import checks  # the API's qc and preview, without torch: the command starts quickly

    output = render.output_of(ctx.obj, json_flag)
    result = checks.preview(image, mask, out, window=window, slice_index=slice_text, panel_size=panel_size)
    if output.json:
        render.print_json(result.as_dict(out))
    else:
        x, y, z = result.slice
        render.info(f"wrote {out} ({result.image.size[0]}x{result.image.size[1]} px; axial z={z}, coronal y={y}, "
                    f"sagittal x={x}; {len(result.labels)} label(s) drawn)", output)

"""`maisi preview IMAGE [MASK]`: the three orthogonal planes of a CT with its labels as contours; `maisi preview
--sheet RUN_DIR`: one contact sheet of every sample of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

HELP = ("Write one PNG of a CT's axial, coronal and sagittal planes (CT window), with the label map's organs as "
        "coloured contours, orientation letters and a legend of the labels shown; or, with --sheet RUN_DIR, one "
        "contact sheet of every sample of a run folder.")


def preview(
    ctx: typer.Context,
    image: Optional[Path] = typer.Argument(None, metavar="IMAGE", show_default=False,
                                           help="CT image in HU (NIfTI), e.g. sample_0000_image.nii.gz (not with "
                                                "--sheet)."),
    mask: Optional[Path] = typer.Argument(None, metavar="MASK",
                                          help="Its label map (NIfTI, MAISI label ids) on the same grid: drawn as "
                                               "contours; the body (label 200) is not drawn."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE.png", show_default=False,
                                       help="The PNG to write (default: beside the input, sample_0000_image.nii.gz "
                                            "→ sample_0000_preview.png; with --sheet, RUN_DIR/contact_sheet.png)."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", metavar="RUN_DIR", help="Draw one tile per sample of "
                                         "this run folder instead: its mid-axial plane with label contours, and "
                                         "the sample's index, seed and QC verdict under it."),
    window: str = typer.Option("soft-tissue", "--window", "-w",
                               help="CT window: soft-tissue (40,400), lung (-600,1500), bone (400,1800), "
                                    "liver (80,150), brain (40,80), or LEVEL,WIDTH in HU, e.g. 40,400."),
    slice_text: Optional[str] = typer.Option(None, "--slice", help="X,Y,Z voxel indices of the sagittal, coronal "
                                             "and axial planes in the RAS-reoriented grid (default: mid-planes)."),
    panel_size: Optional[int] = typer.Option(None, "--panel-size", show_default=False,
                                             help="Pixels per panel side, 64..2048 (default 256); with --sheet, per "
                                                  "tile, 64..1024 (default 192)."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    from maisi_cli.errors import UsageError

    output = render.output_of(ctx.obj, json_flag)
    if sheet is not None:
        if image is not None or mask is not None:
            raise UsageError("--sheet: draws every sample of RUN_DIR; drop IMAGE and MASK (or drop --sheet)")
        if slice_text is not None:
            raise UsageError("--slice: not with --sheet (each tile shows its sample's mid-axial plane)")
        from maisi_cli.engine.contact_sheet import DEFAULT_TILE, make_sheet

        drawn, written = make_sheet(sheet, out, window=window, tile=panel_size or DEFAULT_TILE)
        if output.json:
            render.print_json(drawn.as_dict(written))
        else:
            failed = sum(tile.verdict.startswith("QC FAILED") for tile in drawn.tiles)
            render.info(f"wrote {written} ({drawn.image.size[0]}x{drawn.image.size[1]} px; {len(drawn.tiles)} "
                        f"sample(s) in {drawn.layout.columns} column(s)"
                        + (f"; {failed} failed the quality check" if failed else "") + ")", output)
        return
    if image is None:
        raise UsageError("IMAGE: give a CT image (NIfTI), or --sheet RUN_DIR for a run folder's contact sheet")

    from maisi_cli import checks  # the API's qc and preview, without torch: the command starts quickly
    from maisi_cli.engine.preview import sample_preview_path

    out = out if out is not None else sample_preview_path(image)
    result = checks.preview(image, mask, out, window=window, slice_index=slice_text, panel_size=panel_size or 256)
    if output.json:
        render.print_json(result.as_dict(out))
    else:
        x, y, z = result.slice
        render.info(f"wrote {out} ({result.image.size[0]}x{result.image.size[1]} px; axial z={z}, coronal y={y}, "
                    f"sagittal x={x}; {len(result.labels)} label(s) drawn)", output)

"""`maisi convert RUN_DIR --format F`: a `maisi generate` folder's NIfTI pairs written again in another format."""

from __future__ import annotations

from pathlib import Path

import typer

from maisi_cli.cli import render

HELP = ("Write the pairs of a `maisi generate` folder (NIfTI) again in another format, beside them, as "
        "`generate --format` would have written them. Only complete samples whose files match their sidecar are "
        "converted; each sidecar then lists the files under converted.FORMAT, and a second run skips them.")


def convert(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="The --out folder of a `maisi generate` run."),
    output_format: str = typer.Option(..., "--format", help="nii, nrrd, dicom (extra maisi[dicom]) or nifti."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write again samples converted before."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    from maisi_cli.engine.convert import convert_folder
    from maisi_cli.engine.outputs import checked_format

    output = render.output_of(ctx.obj, json_flag)
    output_format = checked_format(output_format)
    with render.progress(output) as on_progress:
        report = convert_folder(run_dir, output_format, overwrite, on_progress)
    for refusal in report.refused:
        render.warning(f"not converted: {refusal}", output)
    if output.json:
        render.print_json(report.as_dict())
    else:
        render.info(f"{len(report.converted)} sample(s) written as {output_format} in {run_dir} "
                    f"({len(report.skipped)} already there, {len(report.refused)} not converted)", output)
    if report.refused:
        raise typer.Exit(1)

"""`maisi data nnunet`: an nnU-Net v2 raw dataset (and a MONAI datalist) from run folders (engine/nnunet.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

NNUNET_HELP = (
    "Write the samples of run folders as an nnU-Net v2 raw dataset, or add them to one.\n\n"
    "Each complete sample with a label map (its sidecar written, its files the sha256 the sidecar records: a folder "
    "still being copied is refused) becomes the case maisi_NNNN: OUT/imagesTr/maisi_NNNN_0000.nii.gz (the image's "
    "bytes) and OUT/labelsTr/maisi_NNNN.nii.gz (the kept labels renumbered 1..K, everything else background 0). "
    "OUT/dataset.json has one CT channel (nnU-Net's CT normalisation), the labels by name and numTraining; "
    "OUT/maisi_labels.json maps each nnU-Net id to its MAISI id and records each case's run folder, sample, seed, "
    "model and image sha256.\n\n"
    "Adding to an existing dataset continues the numbering with its label set (another set is refused, with the "
    "--labels that fits); a sample already in it (the same image sha256) is not added again. Image-only samples are "
    "skipped with a warning."
)


def nnunet_command(
    ctx: typer.Context,
    runs: list[Path] = typer.Argument(..., metavar="RUN_DIR", help="Run folders `maisi generate` wrote."),
    out: Path = typer.Option(..., "--out", "-o", help="The dataset folder, named DatasetNNN_Name as nnU-Net requires "
                             "(e.g. $nnUNet_raw/Dataset501_MaisiCT); made when missing, added to when it exists."),
    labels: str = typer.Option("all", "--labels", help="Labels to keep, in nnU-Net id order: all (every organ label "
                               "the samples hold, by MAISI id, without the body 200, which is the tissue around the "
                               "organs), all,body (with it), or names as `maisi labels` lists them (liver,spleen; "
                               "underscores and TotalSegmentator names too) in the order given."),
    datalist: Optional[Path] = typer.Option(None, "--datalist", help="Also write a MONAI datalist JSON of all the "
                                            "dataset's cases ({\"training\": [{image, label, fold}]}, paths relative "
                                            "to its folder, fold = case position mod 5)."),
    json_flag: bool = typer.Option(False, "--json", help="Print a summary as one JSON document."),
) -> None:
    from maisi_cli.engine.nnunet import write_nnunet_dataset

    output = render.output_of(ctx.obj, json_flag)
    with render.progress(output) as on_progress:
        run = write_nnunet_dataset(runs, out, labels, datalist, on_progress,
                                   on_warning=lambda message: render.warning(message, output))
    if output.json:
        render.print_json(run.as_dict())
        return
    names = [entry["name"] for entry in run.labels]
    kept = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
    render.info(f"{len(run.added)} case(s) added to {out} ({len(run.already)} already there), {run.num_training} in "
                f"all; labels 1..{len(names)}: {kept}" + (f"; datalist {run.datalist}" if run.datalist else ""), output)


"""`maisi convert RUN_DIR --format F`: the pairs of a folder `maisi generate` wrote in NIfTI, written again in another
format beside them, as `generate --format F` would have written them (the same bytes, DICOM UIDs included).

Only complete samples are converted: a sidecar whose image and label match the sha256 it records. The sidecar then
lists the converted files under `converted.F`, so a second `convert` skips what is done and a changed file is
noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maisi_cli.engine.outputs import (PairIdentity, first_changed_file, pair_paths, write_colour_tables, write_image,
                                      write_label, written_sha256)
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.errors import OutputError, UsageError
from maisi_cli.io.nifti import read_nifti
from maisi_cli.io.provenance import read_json, write_json

SIDECAR_PATTERN = "sample_*.json"


@dataclass
class ConversionReport:
    folder: Path
    output_format: str
    converted: list[str] = field(default_factory=list)  # sample stems written now
    skipped: list[str] = field(default_factory=list)  # converted before, files unchanged
    refused: list[str] = field(default_factory=list)  # "stem: why" for samples not complete or changed

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "format": self.output_format, "converted": self.converted,
                "skipped": self.skipped, "refused": self.refused}


@dataclass(frozen=True)
class WrittenSample:
    stem: str
    sidecar: Path
    document: dict[str, Any]
    source_format: str


def written_samples(folder: Path) -> list[WrittenSample]:
    """The samples whose sidecar is there, in name order."""
    samples = []
    for sidecar in sorted(folder.glob(SIDECAR_PATTERN)):
        document = read_json(sidecar)
        if not isinstance(document, dict) or "files_sha256" not in document:
            continue  # not a sample sidecar (or unreadable): no sample to convert
        samples.append(WrittenSample(sidecar.stem, sidecar, document, str(document.get("format", "nifti"))))
    return samples


def source_problem(folder: Path, sample: WrittenSample) -> str | None:
    """Why a sample cannot be converted (None when it can): its NIfTI files must match its sidecar."""
    if sample.source_format not in ("nifti", "nii"):
        return f"written as {sample.source_format}; convert reads NIfTI pairs (generate with --format nifti)"
    image, label = pair_paths(folder, sample.stem, sample.source_format)
    recorded = sample.document["files_sha256"]
    # an image-only model's sample records no label
    changed = first_changed_file((path, recorded[role]) for role, path in (("image", image), ("label", label))
                                 if role in recorded)
    return None if changed is None else f"{changed.name} is missing or does not match the sha256 its sidecar records"


def converted_before(folder: Path, sample: WrittenSample, output_format: str) -> bool:
    done = (sample.document.get("converted") or {}).get(output_format)
    if not isinstance(done, dict):
        return False
    image, label = pair_paths(folder, sample.stem, output_format)
    recorded = done.get("files_sha256") or {}
    return first_changed_file((path, recorded.get(role)) for role, path in (("image", image), ("label", label))
                              if role in sample.document["files_sha256"]) is None


def convert_sample(folder: Path, sample: WrittenSample, output_format: str) -> dict[str, Any]:
    """Write the sample's pair in `output_format`; the sidecar's `converted.<format>` entry."""
    document = sample.document
    image_path, label_path = pair_paths(folder, sample.stem, sample.source_format)
    index = int(document.get("sample_index", sample.stem.split("_")[-1]))
    digest = document.get("pair_settings_sha256") or document["run_settings_sha256"]
    model = document.get("model")
    identity = PairIdentity(f"{digest}:{index}", str(model.get("name", "") if isinstance(model, dict) else model),
                            int(document["sample_seed"]), index)
    target_image, target_label = pair_paths(folder, sample.stem, output_format)
    image, affine = read_nifti(image_path, "RUN_DIR", "CT image")
    files = write_image(target_image, image, affine, output_format, identity)
    files_sha256 = {"image": written_sha256(target_image, files)}
    del image
    if "label" in document["files_sha256"]:
        labels, _ = read_nifti(label_path, "RUN_DIR")
        label_files = write_label(target_label, labels, affine, output_format, identity, target_image)
        files.update(label_files)
        files_sha256["label"] = written_sha256(target_label, label_files)
        if output_format in ("nifti", "nii"):
            files.update(write_colour_tables(folder))
    return {"files_written": files, "files_sha256": files_sha256}


def convert_folder(folder: Path, output_format: str, overwrite: bool = False,
                   on_progress: ProgressCallback = no_progress) -> ConversionReport:
    """Convert every complete sample of `folder` to `output_format`; a sample that is not complete, or whose files
    changed since they were written, is named in the report and left as it is."""
    if not folder.is_dir():
        raise UsageError(f"RUN_DIR: '{folder}' is not a folder; give the --out folder of a `maisi generate` run")
    samples = written_samples(folder)
    if not samples:
        raise UsageError(f"RUN_DIR: '{folder}' holds no sample sidecars (sample_NNNN.json); give the --out folder of "
                         "a `maisi generate` run")
    report = ConversionReport(folder, output_format)
    for number, sample in enumerate(samples, 1):
        problem = source_problem(folder, sample)
        if problem is not None:
            report.refused.append(f"{sample.stem}: {problem}")
        elif sample.source_format == output_format:
            report.skipped.append(sample.stem)  # already in that format
        elif converted_before(folder, sample, output_format) and not overwrite:
            report.skipped.append(sample.stem)
        else:
            entry = convert_sample(folder, sample, output_format)
            converted = {**(sample.document.get("converted") or {}), output_format: entry}
            try:
                write_json(sample.sidecar, {**sample.document, "converted": converted})
            except OSError as error:
                raise OutputError(f"RUN_DIR: cannot update {sample.sidecar.name} ({error.strerror})") from None
            report.converted.append(sample.stem)
        on_progress(ProgressEvent("write", number, len(samples), subject="samples"))
    return report

"""What the sidecar of a generated sample (sample_NNNN.json beside sample_NNNN_image.nii.gz, written by
`maisi generate`) says about it, for the commands that take the sample's files by name: `maisi qc` (which model's
statistics to check against, the label map), `maisi preview` (seed and QC verdict in the title) and the contact
sheet of a run folder.

Lenient on purpose: a missing, unreadable or foreign JSON file is no sidecar (None), so a CT from anywhere else is
checked and drawn as before; the sidecar only adds details. No torch, Typer or rich.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# sample_0000_image.nii.gz → stem sample_0000 (every image suffix `maisi generate` writes: engine/outputs.py)
IMAGE_NAME = re.compile(r"(?P<stem>.+)_image(?:\.nii\.gz|\.nii|\.nrrd)?")
SIDECAR_NAME = re.compile(r"sample_(\d+)\.json")


def sidecar_path(image: Path) -> Path | None:
    """sample_0000_image.nii.gz → sample_0000.json beside it (None for a name that is not `<stem>_image...`)."""
    match = IMAGE_NAME.fullmatch(Path(image).name)
    return Path(image).with_name(match.group("stem") + ".json") if match else None


def read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def read_sidecar(image: Path) -> dict[str, Any] | None:
    """The sidecar of the sample whose image is `image`, or None when there is none (or it names another image)."""
    path = sidecar_path(image)
    if path is None or not path.is_file():
        return None
    document = read_json_object(path)
    if document is None or not isinstance(document.get("files"), dict):
        return None
    if document["files"].get("image") != Path(image).name:  # a copy renamed, or another sample's sidecar
        return None
    return document


@dataclass(frozen=True)
class SampleInfo:
    """The details of a sample the pictures show, from its sidecar."""

    sidecar: Path
    index: int | None
    seed: int | None  # the seed of the attempt whose files were kept
    model: str | None  # the model's name
    model_source: str | None  # "built-in", a plugin, or the spec file's path
    image: str | None  # file names in the sidecar's folder
    label: str | None
    output_format: str
    qc_passed: bool | None  # None: the check did not run
    qc_failed: tuple[str, ...]
    qc_statistics: str | None  # the statistics the check read (a path, or the packaged ones)

    @property
    def verdict(self) -> str:
        """'QC passed', 'QC FAILED (liver, lung)' or 'QC off'."""
        if self.qc_passed is None:
            return "QC off"
        return "QC passed" if self.qc_passed else f"QC FAILED ({', '.join(self.qc_failed) or 'see sidecar'})"

    def path_of(self, role: str) -> Path | None:
        name = self.image if role == "image" else self.label
        if not isinstance(name, str) or not name or Path(name).name != name:  # a file name in the folder only
            return None
        return self.sidecar.with_name(name)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def sample_info(sidecar: Path, document: dict[str, Any]) -> SampleInfo:
    files = document.get("files") if isinstance(document.get("files"), dict) else {}
    model = document.get("model") if isinstance(document.get("model"), dict) else {}
    qc = document.get("qc") if isinstance(document.get("qc"), dict) else None
    failed = qc.get("failed") if qc is not None and isinstance(qc.get("failed"), list) else []
    passed = qc.get("passed") if qc is not None and isinstance(qc.get("passed"), bool) else None
    statistics = qc.get("statistics") if qc is not None and isinstance(qc.get("statistics"), str) else None
    return SampleInfo(
        sidecar=sidecar, index=_int(document.get("sample_index")), seed=_int(document.get("sample_seed")),
        model=model.get("name") if isinstance(model.get("name"), str) else None,
        model_source=model.get("source") if isinstance(model.get("source"), str) else None,
        image=files.get("image"), label=files.get("label"),
        output_format=document.get("format") if isinstance(document.get("format"), str) else "nifti",
        qc_passed=passed, qc_failed=tuple(str(f) for f in failed), qc_statistics=statistics)


def info_for_image(image: Path) -> SampleInfo | None:
    """The SampleInfo of the sample whose image is `image`, or None when it has no sidecar."""
    document = read_sidecar(image)
    return None if document is None else sample_info(sidecar_path(image), document)  # type: ignore[arg-type]


def run_samples(run: Path) -> list[SampleInfo]:
    """The complete samples of a run folder (those with a sidecar), by index."""
    found = []
    for path in run.iterdir():
        match = SIDECAR_NAME.fullmatch(path.name)
        document = read_json_object(path) if match else None
        if document is not None and isinstance(document.get("files"), dict):
            info = sample_info(path, document)
            found.append((info.index if info.index is not None else int(match.group(1)), info))  # type: ignore
    return [info for _, info in sorted(found, key=lambda pair: pair[0])]

"""The QC report picture of one CT (engine/report_plots.qc_chart) for `maisi qc --report FILE.png` and, beside each
pair, `maisi generate --report` (sample_NNNN_qc.png).

For a generated sample the verdicts are the sidecar's — the check as it ran at generation, with the full condition
mask — and the distributions are read from the written files; for `maisi qc` both come from the check just run.
No torch, Typer or rich (matplotlib only inside report_plots' functions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maisi_cli.engine.qc import PACKAGED, QCReport, QCStatistics, load_statistics, organ_quantiles
from maisi_cli.engine.report_plots import Chart, qc_chart
from maisi_cli.engine.sample_info import IMAGE_NAME, SampleInfo, read_sidecar, sample_info, sidecar_path
from maisi_cli.errors import MaisiError, StatisticsError
from maisi_cli.io.nifti import read_nifti


def statistics_label(source: str, note: str | None = None) -> str:
    """How a report names the statistics: whose they are when known, else the file's name."""
    if source == PACKAGED:
        return "packaged statistics of the released CT data"
    name = Path(source).name
    return f"{note}: {name}" if note else name


def is_model_statistics(model: str, source: str) -> bool:
    """Whether `source` is the statistics file `model` ships (so a report can say whose they are)."""
    from maisi_cli.engine.weights import locate_weight
    from maisi_cli.models import get_model

    try:
        spec = get_model(model)
        if "qc_statistics" not in spec.datasets:
            return False
        return Path(locate_weight(spec, "qc_statistics", None).path).resolve() == Path(source).resolve()
    except (MaisiError, OSError):
        return False


def report_subject(image: Path, info: SampleInfo | None) -> str:
    """'sample 3, seed 123' for a generated sample, else the image's file name."""
    if info is not None and info.index is not None:
        return f"sample {info.index}" + (f", seed {info.seed}" if info.seed is not None else "")
    return Path(image).name


def draw_report(out: Path, image: np.ndarray, mask: np.ndarray, report: QCReport, statistics: QCStatistics,
                subject: str, option: str = "--report") -> Chart:
    """The QC report of `report` (the check of `image` under `mask` against `statistics`) written to `out`."""
    quantiles = organ_quantiles(image, mask, statistics)
    return qc_chart(out, report.as_dict()["organs"], quantiles, report.passed, subject,
                    statistics_label(report.statistics, report.statistics_note), report.non_finite_voxels, option)


def sample_report_path(image: Path) -> Path:
    """sample_0000_image.nii.gz → sample_0000_qc.png beside it."""
    match = IMAGE_NAME.fullmatch(image.name)
    stem = match.group("stem") if match else image.name.split(".")[0]
    return image.with_name(f"{stem}_qc.png")


def write_sample_report(image: Path, label: Path, missing_only: bool = False) -> Path | None:
    """`maisi generate --report`: sample_NNNN_qc.png beside a written pair, from its sidecar's QC record and its
    files. None when kept (`missing_only` and the file exists) or when the sample was not checked (no QC record)."""
    out = sample_report_path(image)
    if missing_only and out.is_file():
        return None
    document = read_sidecar(image)
    record = document.get("qc") if document is not None else None
    if not isinstance(record, dict) or not isinstance(record.get("organs"), list):
        return None
    info = sample_info(sidecar_path(image), document)  # type: ignore[arg-type]
    source = record.get("statistics") or PACKAGED
    try:
        statistics = load_statistics(None if source == PACKAGED else Path(source))
    except StatisticsError as error:
        raise MaisiError(f"--report: the statistics the sample was checked against are unreadable now ({error})") \
            from None
    image_data, _ = read_nifti(image, "IMAGE", "CT image")
    labels, _ = read_nifti(label, "MASK", "label map")
    quantiles = organ_quantiles(image_data, labels, statistics)
    note = f"model {info.model}" if info.model and is_model_statistics(info.model, source) else None
    qc_chart(out, record["organs"], quantiles, bool(record.get("passed")), report_subject(image, info),
             statistics_label(source, note), int(record.get("non_finite_voxels") or 0))
    return out

"""`maisi generate --manifest cases.json`: many condition masks in one run, the networks loaded once.

A manifest is a JSON list of cases, each `{"mask": ..., "size"?, "spacing"?, "seed"?, "name"?, "mask_labels"?,
"body_from"?}` (or `{"cases": [...]}`). Case `name` is written into `OUT/NAME/` exactly as

    maisi generate <the same options> --mask MASK [--size ...] [--spacing ...] [--seed ...] --out OUT/NAME

would write it: a case's fields replace the command line's, the others come from it. Paths are relative to the
manifest's folder. The samples of all cases are numbered in one sequence (case c, sample k is unit c·n + k for
n samples per case), and `--shard I/N` (or a SLURM array) takes the units u with u mod N = I, as it takes samples
in a run of one mask.

Every case of this shard is planned — its mask read, converted and checked — before any network loads, so a bad
case stops the run at once with one line naming it; the plans are then dropped (a plan holds its mask in memory)
and each case is planned again just before it runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maisi_cli.config import FloatTriple, Triple, parse_size, parse_spacing
from maisi_cli.engine.plan import GenerationPlan, SampleTask
from maisi_cli.engine.progress import ProgressCallback, no_progress
from maisi_cli.engine.qc import QCOptions
from maisi_cli.engine.run import GenerationReport, NetworkLoader, run_generation
from maisi_cli.engine.run_folder import plan_generation
from maisi_cli.engine.samples import WarningCallback
from maisi_cli.errors import MaisiError, UsageError, validation_message
from maisi_cli.io.files import opened_regular
from maisi_cli.request import GenerateRequest

CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".nrrd.gz")
MAX_MANIFEST_BYTES = 64 * 2**20  # a list of paths: anything larger is not a manifest


def _triple_text(value: Any) -> Any:
    """`[512, 512, 128]` or `512x512x128` (or one number for all three axes) → the text --size/--spacing parse."""
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return value


def _parsed(parse: Callable[[str], Any], value: Any) -> Any:
    """`parse_size`/`parse_spacing` of a case's value; their fix (which names the CLI option) as the field's."""
    try:
        return parse(str(_triple_text(value)))
    except MaisiError as error:
        raise ValueError(str(error).split(": ", 1)[-1]) from None


class ManifestCase(BaseModel):
    """One case of a manifest, as written (paths not yet resolved)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask: str = Field(min_length=1)
    size: Triple | None = None
    spacing: FloatTriple | None = None
    seed: int | None = Field(None, ge=0)
    name: str | None = None
    mask_labels: str | None = None
    body_from: str | None = None

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else _parsed(parse_size, value)

    @field_validator("spacing", mode="before")
    @classmethod
    def _spacing(cls, value: Any) -> Any:
        return None if value is None else _parsed(parse_spacing, value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not CASE_NAME.fullmatch(value) or value in (".", "..")):
            raise ValueError(f"'{value}' is not a folder name; use letters, digits, '.', '_' and '-' (at most 128, "
                             "not starting with '.' or '-')")
        return value


@dataclass(frozen=True)
class Case:
    """A case resolved: its position in the manifest, its folder name and the request it runs as."""

    number: int  # its position in the manifest, from 0
    name: str
    request: GenerateRequest
    units: tuple[int, ...]  # this shard's sample indices of the case

    @property
    def label(self) -> str:
        return f"case {self.number} ('{self.name}')"


def default_case_name(mask: str) -> str:
    """A mask's file name without its image suffix (`ct_042.nii.gz` → `ct_042`); a class folder's own name."""
    base = Path(mask).name
    for suffix in MASK_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base


def case_problem(error: Exception) -> str:
    """A pydantic problem, or a parse error of --size/--spacing's wording, as 'field: what is wrong'."""
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "case"
        message = validation_message(first)
        if first["type"] == "extra_forbidden":
            message = ("not a case field; a case holds mask, and optionally size, spacing, seed, name, mask_labels "
                       "and body_from")
        elif first["type"] == "missing":
            message = "required; give the case's label map, e.g. \"mask\": \"masks/ct_001.nii.gz\""
        return f"{field}: {message}"
    return str(error)


def read_manifest(path: Path) -> list[ManifestCase]:
    """The cases of a manifest file, each checked as written; any problem is one UsageError naming the case and the
    field."""
    where = f"--manifest: {path}"
    try:
        with opened_regular(path) as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{where} does not exist; give a JSON list of cases, e.g. "
                         "[{\"mask\": \"masks/ct_001.nii.gz\"}]") from None
    except OSError as error:
        raise UsageError(f"{where} cannot be read ({error.strerror or error}); give a regular JSON file") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{where} is over {MAX_MANIFEST_BYTES // 2**20} MiB; split it into several manifests")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{where} is not JSON ({error}); give a JSON list of cases") from None
    if isinstance(document, dict) and set(document) == {"cases"}:
        document = document["cases"]
    if not isinstance(document, list):
        raise UsageError(f"{where} holds a JSON {type(document).__name__}, not a list of cases; write "
                         "[{\"mask\": ...}, ...] or {\"cases\": [...]}")
    if not document:
        raise UsageError(f"{where} lists no cases; add at least one {{\"mask\": ...}}")
    cases = []
    for number, entry in enumerate(document):
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: case {number} is a JSON {type(entry).__name__}, not an object; write "
                             "{\"mask\": \"...\"}")
        try:
            cases.append(ManifestCase.model_validate(entry))
        except ValidationError as error:
            raise UsageError(f"{where}: case {number}: {case_problem(error)}") from None
    return cases


def resolve_cases(manifest: Path, cases: list[ManifestCase], request: GenerateRequest) -> list[Case]:
    """Each case as the request it runs as, with this shard's samples of it. `request` is the command line's:
    its --out is the manifest's folder (each case writes into OUT/NAME) and its --shard shards the manifest."""
    where = f"--manifest: {manifest}"
    if request.mask is not None:
        raise UsageError("--mask: the manifest gives each case's mask; drop --mask (or drop --manifest)")
    if request.anatomy_sizes:
        raise UsageError("--anatomy NAME:SIZE: generates the mask, and the manifest gives each case's mask; drop "
                         "the size (--anatomy NAME checks that each mask holds NAME) or --manifest")
    if request.mask_database is not None:
        raise UsageError("--mask-database: the manifest gives each case's mask; drop --mask-database")
    if request.body_from is not None and request.body_from != "labels":
        raise UsageError("--body-from: with --manifest only 'labels' applies to every case; give each case's CT as "
                         "its \"body_from\" in the manifest")
    root = manifest.parent
    shard_index, shard_count = request.shard
    per_case = request.num_samples
    seen: dict[str, int] = {}
    resolved = []
    for number, case in enumerate(cases):
        name = case.name or default_case_name(case.mask)
        if not CASE_NAME.fullmatch(name) or name in (".", ".."):
            raise UsageError(f"{where}: case {number}: name: '{name}' (from its mask's file name) is not a folder "
                             "name; give the case a \"name\" of letters, digits, '.', '_' and '-'")
        if name.lower() in seen:  # case-insensitive file systems would merge the two folders
            raise UsageError(f"{where}: case {number}: name: '{name}' is also case {seen[name.lower()]}'s; give each "
                             "case its own \"name\"")
        seen[name.lower()] = number
        body_from = case.body_from if case.body_from is not None else request.body_from
        if body_from is not None and body_from != "labels":
            body_from = str(root / Path(body_from).expanduser())
        case_request = request.model_copy(update={
            "mask": root / Path(case.mask).expanduser(),
            "size": case.size if case.size is not None else request.size,
            "spacing": case.spacing if case.spacing is not None else request.spacing,
            "seed": case.seed if case.seed is not None else request.seed,
            "mask_labels": case.mask_labels if case.mask_labels is not None else request.mask_labels,
            "body_from": body_from,
            "out": Path(request.out) / name,
            "shard": (0, 1),
        })
        units = tuple(k for k in range(per_case) if (number * per_case + k) % shard_count == shard_index)
        resolved.append(Case(number, name, case_request, units))
    return resolved


def case_error(case: Case, manifest: Path, error: MaisiError) -> MaisiError:
    """The error of a case, as the same kind (its exit code kept), naming the manifest and the case first."""
    renamed = type(error)(f"--manifest: {manifest}: {case.label}: {error}")
    renamed.exit_code = error.exit_code
    return renamed


def plan_case(case: Case, manifest: Path, qc: QCOptions | None, dry_run: bool = False) -> GenerationPlan:
    """The plan of this shard's samples of a case in its folder (complete ones skipped, as a run of one mask);
    `dry_run`: the model's files not downloaded yet are listed, not refused."""
    units = set(case.units)
    try:
        plan = plan_generation(case.request, qc, keep=lambda task: task.index in units, dry_run=dry_run)
    except MaisiError as error:
        raise case_error(case, manifest, error) from None
    plan.warnings = [f"{case.label}: {message}" for message in plan.warnings]
    return plan


@dataclass
class ManifestPlan:
    """The checked cases of this shard. The case plans themselves are not kept (each holds its mask in memory):
    their descriptions and counts are."""
    manifest: Path
    cases: list[Case]  # the cases with samples in this shard
    described: list[dict[str, Any]]  # each case's plan, as `GenerationPlan.describe` gives it
    pending_counts: list[int]  # samples each case has still to write
    warnings: list[str]
    qc: QCOptions | None = None

    @property
    def pending(self) -> int:
        return sum(self.pending_counts)

    def describe(self) -> dict[str, Any]:
        return {"manifest": str(self.manifest),
                "cases": [{"case": c.number, "name": c.name, "out": str(c.request.out), "plan": d}
                          for c, d in zip(self.cases, self.described)],
                "warnings": list(self.warnings), **self.downloads()}

    def downloads(self) -> dict[str, Any]:
        """A dry run's files not downloaded yet, once for all cases (one model), and the command that fetches
        them: {"downloads": [...], "download_command": ...}."""
        files: dict[str, dict[str, Any]] = {}
        command = None
        for described in self.described:
            files.update({d["file"]: d for d in described.get("downloads") or []})
            command = command or described.get("download_command")
        return {"downloads": list(files.values()), "download_command": command}


def plan_manifest(manifest: Path, request: GenerateRequest, qc: QCOptions | None = None,
                  dry_run: bool = False) -> ManifestPlan:
    """Every case of this shard planned and checked (each mask read, converted and fitted), before any network
    loads; the first bad case stops it with one line naming the case and the field. `dry_run`: the model's files
    not downloaded yet are listed (`ManifestPlan.downloads`), not refused."""
    cases = [c for c in resolve_cases(manifest, read_manifest(manifest), request) if c.units]
    described, pending, warnings = [], [], []
    for case in cases:
        plan = plan_case(case, manifest, qc, dry_run)
        described.append(plan.describe())
        pending.append(len(plan.pending))
        warnings += plan.warnings
        del plan  # one mask in memory at a time
    return ManifestPlan(manifest, cases, described, pending, warnings, qc)


@dataclass
class CaseReport:
    case: Case
    report: GenerationReport

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case.number, "name": self.case.name, "out": str(self.case.request.out),
                **self.report.as_dict()}


def run_manifest(plan: ManifestPlan, networks: NetworkLoader, on_progress: ProgressCallback = no_progress,
                 on_warning: WarningCallback = lambda message: None,
                 on_written: Callable[[SampleTask], None] | None = None,
                 on_case: Callable[[Case, GenerationReport], None] = lambda case, report: None) -> list[CaseReport]:
    """Each case in turn into its folder, with the networks `networks` gives (a loader that keeps them, such as
    the Python API's `Generator.networks`, loads them once). Each case is planned again when its turn comes, so one
    mask at a time is held in memory."""
    reports = []
    for case in plan.cases:
        case_plan = plan_case(case, plan.manifest, plan.qc)
        report = run_generation(case_plan, networks,
                                lambda event, case=case: on_progress(replace(event, case=case.name)),
                                lambda message, case=case: on_warning(f"{case.label}: {message}"), on_written)
        reports.append(CaseReport(case, report))
        on_case(case, report)
        del case_plan
    return reports

"""A `maisi generate` request resolved into a checked plan, before any network is built or any file is written.

`plan_samples` checks everything about the request itself (model rules, device, precision, memory, the mask
source); engine/run_folder.py's `plan_generation` adds the output folder: which samples are complete, and a refusal
when the folder holds a run with other settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maisi_cli.config import FloatTriple, Triple, format_triple, maisi_home
from maisi_cli.decode_plan import DecodePlan
from maisi_cli.engine.backends import check_backend
from maisi_cli.engine.masks.body import BodyEnvelopeOptions
from maisi_cli.engine.masks.database import read_database, region_indices
from maisi_cli.engine.masks.generation import (check_size_requests, controlled_label_ids, read_size_table,
                                               size_condition, target_tumour_label)
from maisi_cli.engine.masks.regions import body_region_indices
from maisi_cli.engine.masks.sources import (DatabaseMaskSource, FileMaskSource, GeneratedMaskSource, MaskSource,
                                            NoMaskSource, array_mask_source, database_source)
from maisi_cli.engine.masks.user import (BodyEnvelope, UserMask, prepare_user_mask, user_mask_from_path,
                                         user_mask_grid)
from maisi_cli.engine.masks.validation import field_of_view_warning
from maisi_cli.engine.memory import HostMemoryEstimate, check_generation_memory, resolve_profile
from maisi_cli.engine.outputs import pair_paths
from maisi_cli.engine.qc import QCOptions, QCStatistics, load_statistics
from maisi_cli.engine.runtime import resolve_device, resolve_precision
from maisi_cli.engine.seeds import derive_sample_seed
from maisi_cli.engine.store import RepoFile
from maisi_cli.engine.weights import (WeightFile, find_weight, locate_weight, missing_files_command,
                                     missing_files_error, repo_file)
from maisi_cli.errors import MaskError, UsageError, WeightsError
from maisi_cli.gpu_memory import estimate_peak_memory
from maisi_cli.label_schemes import label_scheme
from maisi_cli.levers import plan_levers
from maisi_cli.labels import label_id
from maisi_cli.models import MASK_COMPONENTS, ModelSpec, get_model
from maisi_cli.profiles import Profile
from maisi_cli.request import GenerateRequest


@dataclass(frozen=True)
class SampleTask:
    index: int
    seed: int
    image: Path
    label: Path | None  # None: an image-only model writes no label file
    sidecar: Path
    complete: bool

    @property
    def paths(self) -> list[Path]:
        """The sample's files, the sidecar (written last) last."""
        return [p for p in (self.image, self.label, self.sidecar) if p is not None]

    @property
    def file_names(self) -> list[str]:
        return [p.name for p in self.paths]

    def files_exist(self) -> bool:
        """Every file of the sample is there: it is complete (the sidecar is written last)."""
        return all(p.is_file() for p in self.paths)


@dataclass
class PlanFiles:
    """The weight and data files a plan reads, found as it is made. A file not here is noted (`missing`) instead of
    refused at once, so one message names them all; a dry run plans on without them and lists the downloads."""

    model: ModelSpec
    weights_dir: Path | None
    missing: list[RepoFile] = field(default_factory=list)

    def find(self, component: str) -> WeightFile | None:
        found = find_weight(self.model, component, self.weights_dir)
        if found is None:
            item = repo_file(self.model, component)
            if item not in self.missing:
                self.missing.append(item)
        return found


@dataclass
class Download:
    """A file a run needs that is not here yet: what `maisi weights download` would fetch, and its size when known
    (engine/hub.py `expected_size`)."""

    file: RepoFile
    size: int | None
    size_source: str  # lock | spec | hub | offline | hub: <why not>

    def document(self) -> dict[str, Any]:
        return {"component": self.file.component, "file": self.file.repo_name, "kind": self.file.kind,
                "size": self.size, "size_source": self.size_source}


@dataclass(frozen=True)
class PendingMaskSource:
    """A dry run's mask source whose data files are not downloaded yet: it says what it would do and makes no
    mask (a plan holding one is never run: `plan_samples` refuses missing files unless it is a dry run)."""

    kind: str
    details: dict[str, Any]
    waiting_for: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, **self.details, "not downloaded": ", ".join(self.waiting_for)}

    def prepare(self, loaded: Any) -> None:
        raise WeightsError(f"mask source: {', '.join(self.waiting_for)} not downloaded (a dry run's plan)")

    def mask_for(self, index: int, attempt: int, on_progress: Any = None) -> Any:
        raise WeightsError(f"mask source: {', '.join(self.waiting_for)} not downloaded (a dry run's plan)")


@dataclass
class GenerationPlan:
    request: GenerateRequest
    model: ModelSpec
    profile: Profile
    device: str
    precision: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    latent_shape: tuple[int, int, int, int]
    steps: int
    decode: DecodePlan
    mask_source: MaskSource
    anatomy_ids: tuple[int, ...]
    samples: list[SampleTask]
    weights: list[WeightFile]
    warnings: list[str] = field(default_factory=list)
    qc: QCOptions = field(default_factory=QCOptions)
    qc_statistics: QCStatistics | None = None  # None: the quality check is off
    guidance: float | None = None  # classifier-free guidance scale; None: off
    qc_note: str | None = None  # why the quality check is off although it was asked for (an image-only model)
    host_memory: HostMemoryEstimate | None = None  # predicted peak host memory (engine/memory.py)
    downloads: list[Download] = field(default_factory=list)  # a dry run's files that are not here yet
    download_command: str | None = None  # the one command that fetches them

    @property
    def pending(self) -> list[SampleTask]:
        return [s for s in self.samples if not s.complete]

    def memory_estimate(self) -> dict[str, Any]:
        """Predicted peak GPU memory (fp16) of the diffusion loop and of the decode (maisi_cli/gpu_memory.py), and
        whether it fits the profile's budget."""
        estimate = estimate_peak_memory(self.model, self.size, self.decode,
                                        guided=self.guidance is not None).as_dict()
        budget = self.profile.budget_bytes
        estimate["budget_gib"] = round(budget / 2**30, 3) if budget else None
        estimate["fits"] = (estimate["peak_gib"] * 2**30 <= budget) if budget else None
        return estimate

    def describe(self) -> dict[str, Any]:
        """The resolved plan as plain data (for --dry-run and the run report)."""
        return {
            "model": self.model.name,
            "model_source": self.model.source,
            "scheduler": self.model.scheduler_kind,
            "profile": self.profile.name,
            "device": self.device,
            "precision": self.precision,
            "backend": self.request.backend,
            "size": list(self.size),
            "spacing": list(self.spacing),
            "latent_shape": list(self.latent_shape),
            "steps": self.steps,
            "decode": self.decode.model_dump(),
            "memory": self.memory_estimate(),
            "host_memory": self.host_memory.as_dict() if self.host_memory is not None else None,
            "mask": self.mask_source.describe(),
            "image_only": self.model.image_only,
            "output_intensity": self.model.output_intensity,
            "guidance": self.guidance,
            "anatomy": list(self.request.anatomy),
            "anatomy_sizes": dict(self.request.anatomy_sizes),
            "body_regions": list(self.request.body_regions),
            "label_mode": None if self.model.image_only else self.request.label_mode,
            "out": str(self.request.out),
            "seed": self.request.seed,
            "num_samples": self.request.num_samples,
            "shard": f"{self.request.shard[0]}/{self.request.shard[1]}",
            "weights": {w.component: str(w.path) for w in self.weights},
            "downloads": [d.document() for d in self.downloads],
            "download_command": self.download_command,
            "samples": [
                {"index": s.index, "seed": s.seed, "status": "complete" if s.complete else "to write",
                 "files": s.file_names}
                for s in self.samples
            ],
            "levers": plan_levers(self).on(),
            "warnings": list(self.warnings),
            "qc": {"enabled": self.qc_statistics is not None, "strict": self.qc.strict,
                   "max_attempts": self.qc.max_attempts if self.qc_statistics is not None else 1,
                   "statistics": self.qc_statistics.source if self.qc_statistics is not None else None,
                   **({"note": self.qc_note} if self.qc_note else {})},
        }


def sample_paths(out: Path, index: int, num_samples: int, output_format: str = "nifti") -> tuple[Path, Path, Path]:
    """(image, label, sidecar) of sample `index` in `output_format` (engine/outputs.py)."""
    stem = f"sample_{index:0{max(4, len(str(num_samples - 1)))}d}"
    image, label = pair_paths(out, stem, output_format)
    return image, label, out / f"{stem}.json"


def sample_tasks(request: GenerateRequest, image_only: bool = False) -> list[SampleTask]:
    """This shard's samples (index k belongs to shard k mod N), at their paths under --out, none complete yet."""
    shard_index, shard_count = request.shard
    tasks = []
    for index in range(shard_index, request.num_samples, shard_count):
        image, label, sidecar = sample_paths(request.out, index, request.num_samples, request.output_format)
        tasks.append(SampleTask(index, derive_sample_seed(request.seed, index), image,
                                None if image_only else label, sidecar, False))
    return tasks


def plan_samples(request: GenerateRequest, qc: QCOptions | None = None,
                 mask: UserMask | None = None, dry_run: bool = False) -> GenerationPlan:
    """The checked plan of the request's samples, whatever the folder holds. `qc` defaults to the CLI's defaults
    (check on, 3 attempts, packaged statistics); `mask` is a label map given in memory (the Python API), in place
    of `request.mask`. Files of the model that are not here are refused together, in one WeightsError; with
    `dry_run` the plan is made without them and lists them as `downloads`, with their sizes (the hub is asked
    when the spec and the lock do not know a size)."""
    qc = qc or QCOptions()
    model = get_model(request.model)
    files = PlanFiles(model, request.weights_dir)
    warnings: list[str] = []
    user_mask = mask
    if user_mask is None and request.mask is not None and not model.image_only and not request.anatomy_sizes:
        # its header only (the grid may follow it)
        user_mask = user_mask_from_path(request.mask, label_scheme(request.mask_labels))
    size, spacing, grid_note = request_grid(request, model, user_mask)
    if grid_note:
        warnings.append(grid_note)
    lifted = model.check_request(size, spacing, request.allow_any_size)
    warnings += [f"{p} (allowed by --allow-any-size)" for p in lifted]
    steps = request.steps or model.default_steps
    if model.scheduler_kind == "ddpm" and steps < model.default_steps:
        warnings.append(f"--steps: {steps} DDPM steps is fewer than the {model.default_steps} it was trained for; "
                        "quality is not guaranteed")
    if model.image_only:
        refuse_mask_options(request, model, qc)
    guidance = resolve_guidance(request, model)
    if request.mask_labels.lower() != "maisi" and request.mask is None and mask is None:
        raise UsageError("--mask-labels: says how to read --mask; give --mask FILE, or drop --mask-labels")
    if request.body_from is not None and request.mask is None and mask is None:
        raise UsageError("--body-from: adds the body label to --mask; give --mask FILE, or drop --body-from")
    if request.body_regions and not model.uses_body_region:
        raise UsageError(f"--body-region: model {model.name} takes no body-region input; drop it (the ddpm models "
                         "use it)")
    regions = region_indices(request.body_regions)
    device = resolve_device(request.device)
    profile = resolve_profile(request.profile, device)
    if request.backend == "onnx" and request.precision is None:
        precision = "fp32"  # the exported graphs are fp32
    else:
        precision = resolve_precision(request.precision, profile, device)
    if request.backend != "torch":
        check_backend(request.backend, device, request.precision, request.onnx_dir, model)
        if guidance is not None:
            raise UsageError(f"--guidance: runs with --backend torch only (the {request.backend} graphs take one "
                             "sample per call); drop --guidance or --backend")
    anatomy_ids = tuple(label_id(name) for name in request.anatomy)
    latent_shape = model.latent_shape(size)
    split_axis = int(model.definition("autoencoder").get("dim_split", 1))
    decode = profile.decode_plan(latent_shape[1:], size, split_axis=split_axis, spec=model)

    weights = [found for component in model.image_components if (found := files.find(component)) is not None]
    mask_grid = None
    if user_mask is not None and not request.anatomy_sizes:  # sized from its header, before it is read
        # before the mask sources (a database's resampled candidates are read while planning)
        mask_grid = user_mask_grid(user_mask, size, spacing)
    host_memory = check_generation_memory(model, size, decode, device, precision, profile.name,
                                          guided=guidance is not None, mask=mask_grid,
                                          samples=len(sample_tasks(request, model.image_only)))  # writer holds one
    qc_note = None
    if model.image_only:
        source: MaskSource = NoMaskSource()
        if qc.enabled:
            qc_note = (f"off: it checks organ HU of CT against a condition mask, and model {model.name} is "
                       "image-only")
            qc = qc.model_copy(update={"enabled": False})
    elif request.anatomy_sizes:
        source, anatomy_ids, mask_weights = generated_source(request, model, size, spacing, device, precision,
                                                             profile, files)
        weights += mask_weights
    elif user_mask is not None:
        source = user_source(request, model, user_mask, size, spacing, anatomy_ids, warnings)
    else:
        source = database_mask_source(request, model, size, spacing, anatomy_ids, regions, device, files)
    if request.label_mode == "requested" and not anatomy_ids:
        raise UsageError("--label-mode requested: name the anatomies to keep with --anatomy NAME")
    qc_statistics = None
    if qc.enabled:
        statistics = qc_statistics_file(model, qc, request, files)
        if statistics is not None or "qc_statistics" not in model.datasets:
            qc_statistics = load_statistics(statistics)  # fails now
        else:
            qc_note = f"on once {model.datasets['qc_statistics']} is downloaded"
    downloads, command = [], None
    if files.missing:
        if not dry_run:
            raise missing_files_error(model, files.missing, request.weights_dir)
        downloads, command = planned_downloads(model, files.missing)

    plan = GenerationPlan(
        request=request, model=model, profile=profile, device=device, precision=precision, size=size,
        spacing=spacing, latent_shape=latent_shape, steps=steps, decode=decode, mask_source=source,
        anatomy_ids=anatomy_ids, samples=sample_tasks(request, model.image_only), weights=weights,
        warnings=warnings, qc=qc, qc_statistics=qc_statistics, guidance=guidance, qc_note=qc_note,
        host_memory=host_memory, downloads=downloads, download_command=command,
    )
    return plan


def planned_downloads(model: ModelSpec, missing: list[RepoFile]) -> tuple[list[Download], str | None]:
    """(each missing file with its expected size, the command that fetches them) for a dry run."""
    from maisi_cli.engine.hub import expected_sizes  # huggingface_hub: only when something is to download

    sizes = expected_sizes(missing)
    command = missing_files_command(model, missing)
    return [Download(item, size.bytes, size.source) for item, size in zip(missing, sizes)], command


def refuse_mask_options(request: GenerateRequest, model: ModelSpec, qc: QCOptions) -> None:
    """An image-only model takes no condition mask and writes no label file: the options about them are usage
    errors, named one at a time."""
    given = (
        ("--mask", request.mask is not None),
        ("--mask-labels", request.mask_labels.lower() != "maisi"),
        ("--anatomy", bool(request.anatomy or request.anatomy_sizes)),
        ("--mask-database", request.mask_database is not None),
        ("--mask-steps", request.mask_steps is not None),
        ("--label-mode requested", request.label_mode == "requested"),
        ("--body-region", bool(request.body_regions)),
        ("--strict-qc", qc.strict),
        ("--stats", qc.stats is not None),
    )
    for option, present in given:
        if present:
            raise UsageError(f"model {model.name} generates images only (no ControlNet): drop {option}")
    if model.uses_body_region:
        raise UsageError(f"model {model.name}: an image-only model with body-region inputs is not supported (its "
                         "regions would come from a mask); set include_body_region false in its spec")


def resolve_guidance(request: GenerateRequest, model: ModelSpec) -> float | None:
    """The classifier-free guidance scale: `--guidance`, else the spec's `cfg_guidance_scale`; on above 0 (upstream's
    rule), None when off. With a ControlNet it is tumour-presence guidance (the unconditional half is conditioned on
    the mask without its tumours); an image-only model guides on its modality class, so it needs that input."""
    scale = request.guidance if request.guidance is not None else model.guidance_scale
    if scale is None or scale <= 0:
        return None
    if model.image_only and not model.uses_modality:
        raise UsageError(f"--guidance: model {model.name} has no modality class input (num_class_embeds) to guide "
                         "on; drop it")
    return float(scale)


def qc_statistics_file(model: ModelSpec, qc: QCOptions, request: GenerateRequest,
                       files: PlanFiles | None = None) -> Path | None:
    """`--stats FILE`, else the model's own organ statistics (the demo ships those of its phantoms), else None: the
    packaged statistics of the released CT data. With `files`, the model's own file when it is not here: None,
    noted as missing."""
    if qc.stats is not None:
        return qc.stats
    if "qc_statistics" in model.datasets:
        if files is None:
            return locate_weight(model, "qc_statistics", request.weights_dir).path
        found = files.find("qc_statistics")
        return found.path if found is not None else None
    return None


def request_grid(request: GenerateRequest, model: ModelSpec,
                 user_mask: UserMask | None) -> tuple[Triple, FloatTriple, str | None]:
    """(size, spacing, a warning or None): --size/--spacing, else a user's mask's own grid when the model takes it
    (the nearest grid it takes, with a warning naming both, when not), else the model's default."""
    if request.size is not None or request.spacing is not None or user_mask is None:
        size = request.size or model.default_size
        return size, request.spacing or model.default_spacing(size), None
    own_size, own_spacing = user_mask.own_grid()
    problems = model.grid_problems(own_size, own_spacing)
    if not problems or (request.allow_any_size and not any(s % model.size_multiple for s in own_size)):
        return own_size, own_spacing, None
    size, spacing = model.nearest_grid(own_size, own_spacing)
    return size, spacing, (
        f"--mask: '{user_mask.name}' is {format_triple(own_size)} at {format_triple(own_spacing)} mm, a grid model "
        f"{model.name} does not take ({problems[0].split(': ', 1)[-1]}); generating at {format_triple(size)} at "
        f"{format_triple(spacing)} mm, the nearest grid it takes (give --size and --spacing to choose another)")


def body_envelope(request: GenerateRequest) -> BodyEnvelope | None:
    """`--body-from CT.nii.gz | labels` as the mask step that adds the body label."""
    if request.body_from is None:
        return None
    if request.body_from == "labels":
        return BodyEnvelope("labels")
    return BodyEnvelope("ct", Path(request.body_from).expanduser(), BodyEnvelopeOptions())


def user_source(request: GenerateRequest, model: ModelSpec, user_mask: UserMask, size: Triple, spacing: FloatTriple,
                anatomy_ids: tuple[int, ...], warnings: list[str]) -> FileMaskSource:
    """The user's map (a file, a class folder or an array) read, converted, given its body, checked and fitted;
    its warnings added to `warnings`."""
    if request.mask_database is not None:
        raise UsageError("--mask-database: drop it when --mask gives the condition mask")
    scheme = label_scheme(request.mask_labels)
    body = body_envelope(request)
    prepared = prepare_user_mask(user_mask, scheme, body, size, spacing, require_body=model.modality == "ct")
    warnings += prepared.warnings
    fov = field_of_view_warning(prepared.counts, size, spacing, model.size_rules.min_fov_xy_mm_body, model.name)
    if fov:
        warnings.append(fov)
    if user_mask.kind == "array":
        assert user_mask.array is not None
        source: FileMaskSource = array_mask_source(user_mask.array, user_mask.header.affine, prepared.mask, scheme,
                                                   body)
    else:
        source = FileMaskSource(user_mask.path, prepared.mask, scheme=scheme.name, body=body)
    return checked_source(source, request, model, anatomy_ids)


def checked_source(source: FileMaskSource, request: GenerateRequest, model: ModelSpec,
                   anatomy_ids: tuple[int, ...]) -> FileMaskSource:
    """A user's mask (a file, or an array given to the Python API) holds every --anatomy named, and body regions
    can be read from it when the model needs them: checked now, not after loading the networks."""
    present = set(np.unique(source.mask.labels).tolist())
    for name, ident in zip(request.anatomy, anatomy_ids):
        if ident not in present:
            raise MaskError(f"--anatomy: '{name}' (label {ident}) is not in the mask '{source.path}'; "
                            "drop it or use a mask that has it")
    if model.uses_body_region and not request.body_regions:
        body_region_indices(source.mask.labels)
    return source


def database_mask_source(request: GenerateRequest, model: ModelSpec, size: tuple[int, int, int],
                         spacing: tuple[float, float, float], anatomy_ids: tuple[int, ...], regions: tuple[int, ...],
                         device: str, files: PlanFiles) -> DatabaseMaskSource | PendingMaskSource:
    """Candidates from `--mask-database FILE` (masks relative to its folder), else from the model's released
    database and mask archive (unpacked under MAISI_HOME when first used, never while planning), or, for a model
    whose spec names no archive (the bundled demo), masks relative to its database file."""
    archive = None
    if request.mask_database is not None:
        database = request.mask_database.expanduser()
    else:
        if "mask_database" not in model.datasets:
            raise UsageError(f"--mask: model {model.name} ships no candidate-mask database; pass --mask FILE or "
                             "--mask-database FILE")
        found = [files.find(c) for c in ("mask_database", "mask_archive") if c in model.datasets]
        if any(f is None for f in found):  # not downloaded: planned on (a dry run), refused with the rest after
            return PendingMaskSource("database", {"database": model.datasets["mask_database"]},
                                     tuple(model.datasets[c] for c, f in zip(("mask_database", "mask_archive"),
                                                                             found) if f is None))
        database = found[0].path
        archive = found[1].path if len(found) > 1 else None
    entries = read_database(database)
    return database_source(database, entries, anatomy_ids, regions, size, spacing, request.seed, request.num_samples,
                           request.augment, device, root=None if archive else database.parent, archive=archive,
                           cache_root=maisi_home() / "masks", allow_outside=request.allow_outside_database)


def generated_source(request: GenerateRequest, model: ModelSpec, size: tuple[int, int, int],
                     spacing: tuple[float, float, float], device: str, precision: str, profile: Profile,
                     files: PlanFiles) -> tuple[GeneratedMaskSource | PendingMaskSource, tuple[int, ...],
                                                list[WeightFile]]:
    """(the mask generator for `--anatomy NAME:SIZE`, the controlled anatomies — they become the requested labels —,
    the mask networks' weight files)."""
    if request.mask is not None or request.mask_database is not None:
        raise UsageError("--anatomy NAME:SIZE generates the mask; drop --mask / --mask-database")
    if not all(component in model.weights for component in MASK_COMPONENTS):
        raise UsageError(f"--anatomy NAME:SIZE: model {model.name} has no mask generator; name the anatomy without "
                         "a size (masks from its database) or pass --mask FILE")
    requests = check_size_requests(request.anatomy_sizes)
    table_file = files.find("anatomy_size_conditions")
    mask_weights = [found for c in MASK_COMPONENTS if (found := files.find(c)) is not None]
    if table_file is None or len(mask_weights) < len(MASK_COMPONENTS):  # planned on without them (a dry run)
        waiting = tuple(item.repo_name for item in files.missing
                        if item.component in ("anatomy_size_conditions", *MASK_COMPONENTS))
        return (PendingMaskSource("generated", {"anatomy": dict(request.anatomy_sizes)}, waiting),
                tuple(controlled_label_ids(requests)), mask_weights)
    table = read_size_table(table_file.path)
    condition = size_condition(requests, table)
    mask_steps = request.mask_steps or int(model.network["mask_generation_noise_scheduler"].get(
        "num_train_timesteps", 1000))
    source = GeneratedMaskSource(
        spec=model, requests=requests, condition=condition, target_tumour=target_tumour_label(condition),
        controlled_ids=tuple(controlled_label_ids(requests)), size=size, spacing=spacing, seed=request.seed,
        steps=mask_steps, device=device, precision=precision, profile=profile,
    )
    return source, source.controlled_ids, mask_weights

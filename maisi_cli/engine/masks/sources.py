"""Where each sample's condition mask comes from: the user's file, the candidate-mask database, or the mask
generator. A source answers `mask_for(index, attempt)`; a quality-check retry asks for the next attempt.

Every answer depends on (run seed, sample index, attempt) alone, so any sharding gives the same masks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from maisi_cli.config import FloatTriple, Triple, format_triple
from maisi_cli.engine.decode import LatentDecoder, decode_latents
from maisi_cli.engine.masks.archive import inspect_archive, is_unpacked, mask_root, unpack_archive, unpack_target
from maisi_cli.engine.masks.augment import augment_mask
from maisi_cli.engine.masks.database import (MaskDatabaseError, MaskEntry, climbs_out, find_candidates, outside_error,
                                             resolves_outside, shuffled)
from maisi_cli.engine.masks.generation import GENERATED_SPACING, channels_to_labels, post_process, sample_mask_latents
from maisi_cli.engine.masks.class_folder import sha256_of_class_folder
from maisi_cli.engine.masks.user import BodyEnvelope, ConditionMask, fit_to_grid, load_condition_mask
from maisi_cli.engine.networks import LoadedModel, build_scheduler
from maisi_cli.engine.postprocess import ras_affine
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.sampling import initial_noise
from maisi_cli.engine.seeds import derive_attempt_seed, derive_sample_seed
from maisi_cli.errors import MaskError
from maisi_cli.io.files import sha256_of_input
from maisi_cli.label_schemes import LabelScheme, label_scheme
from maisi_cli.models import ModelSpec
from maisi_cli.profiles import Profile


class MaskSource(Protocol):
    """Where a run's condition masks come from. `prepare` is given the loaded networks (the mask generator takes
    its own) before the first `mask_for`; each answer depends on (run seed, sample index, attempt) alone."""

    kind: str

    def describe(self) -> dict[str, Any]: ...

    def prepare(self, loaded: LoadedModel) -> None: ...

    def mask_for(self, index: int, attempt: int, on_progress: ProgressCallback = no_progress) -> SampleMask: ...


@dataclass(frozen=True)
class SampleMask:
    mask: ConditionMask | None  # None: an image-only model (NoMaskSource)
    provenance: dict[str, Any]  # the sidecar's `mask_source`
    regions: tuple[int, int] | None = None  # (top, bottom) body regions when the source knows them


def missing_anatomy(labels: np.ndarray, anatomy_ids: Sequence[int]) -> list[int]:
    present = set(np.unique(labels).tolist())
    return [a for a in anatomy_ids if a not in present]


@dataclass
class FileMaskSource:
    """The same user label map for every sample and attempt: a NIfTI file or a folder of per-class files."""
    path: Path
    mask: ConditionMask
    kind: str = "file"
    _sha256: str | None = None
    scheme: str = "maisi"  # --mask-labels: the scheme its class ids were converted from
    body: BodyEnvelope | None = None  # --body-from: how its body label was added

    def describe(self) -> dict[str, Any]:
        described = {"type": self.kind, "path": str(self.path), "resampled": self.mask.resampled}
        if self.body is not None:
            described["body_from"] = self.body.method if self.body.ct is None else str(self.body.ct)
        return described

    def prepare(self, loaded: LoadedModel) -> None:
        """Nothing to take from the loaded networks."""
    def content_sha256(self) -> str:
        """sha256 of the mask file (of a class folder: of its file names and contents), read once (afresh: a digest
        cached by mtime could name another version of it); the sidecars and the output folder's record
        (engine/run_folder.py) name the mask by it."""
        if self._sha256 is None:
            self._sha256 = sha256_of_class_folder(self.path) if self.path.is_dir() else sha256_of_input(self.path)
        return self._sha256

    def mask_for(self, index: int, attempt: int, on_progress: ProgressCallback = no_progress) -> SampleMask:
        return SampleMask(self.mask, {
            "type": self.kind, "path": str(self.path), "sha256": self.content_sha256(),
            "resampled": self.mask.resampled,
            "original_shape": list(self.mask.original_shape),
            "original_spacing": [round(s, 6) for s in self.mask.original_spacing],
            **self.scheme_record(),
        })

    def scheme_record(self) -> dict[str, Any]:
        """The label scheme its ids came in and the classes it could not map (nothing for MAISI's own ids), and
        how its body label was added (nothing when it had one)."""
        record: dict[str, Any] = {}
        if self.scheme != "maisi":
            record["labels"] = {"scheme": self.scheme,
                                "unmapped": [{"id": i, "name": n, "voxels": v} for i, n, v in self.mask.unmapped]}
        if self.body is not None:
            record["body"] = self.body_record()
        return record

    def body_record(self) -> dict[str, Any]:
        """--body-from as recorded: the method, the CT by path and content, the algorithm's parameters."""
        assert self.body is not None
        record = self.body.describe()
        if self.body.ct is not None:
            record["ct_sha256"] = sha256_of_input(self.body.ct)
        return record


@dataclass
class ArrayMaskSource(FileMaskSource):
    """A label map given in memory (the Python API's `mask=`), the same for every sample and attempt; named in the
    sidecar and the run record by the sha256 of its labels, shape and affine as given."""
    kind: str = "array"

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "resampled": self.mask.resampled}

    def content_sha256(self) -> str:
        assert self._sha256 is not None, "ArrayMaskSource is made by array_mask_source"
        return self._sha256

    def mask_for(self, index: int, attempt: int, on_progress: ProgressCallback = no_progress) -> SampleMask:
        return SampleMask(self.mask, {
            "type": self.kind, "sha256": self.content_sha256(), "resampled": self.mask.resampled,
            "original_shape": list(self.mask.original_shape),
            "original_spacing": [round(s, 6) for s in self.mask.original_spacing],
            **self.scheme_record(),
        })


def array_mask_source(labels: np.ndarray, affine: np.ndarray, mask: ConditionMask, scheme: LabelScheme,
                      body: BodyEnvelope | None = None) -> ArrayMaskSource:
    """The in-memory label map as prepared (engine/masks/user.py `prepare_user_mask`), named by its content."""
    digest = hashlib.sha256()
    for part in (str(labels.dtype), str(labels.shape), np.ascontiguousarray(labels).tobytes(),
                 np.asarray(affine, dtype=np.float64).tobytes()):
        digest.update(part.encode() if isinstance(part, str) else part)
    return ArrayMaskSource(Path("<array>"), mask, _sha256=digest.hexdigest(), scheme=scheme.name, body=body)


@dataclass
class NoMaskSource:
    """An image-only model (no ControlNet): no condition mask, no label file."""
    kind: str = "none"

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "reason": "image-only model (no ControlNet)"}

    def prepare(self, loaded: LoadedModel) -> None:
        """Nothing to take from the loaded networks."""
    def mask_for(self, index: int, attempt: int, on_progress: ProgressCallback = no_progress) -> SampleMask:
        return SampleMask(None, {"type": self.kind})


@dataclass
class DatabaseMaskSource:
    """Candidate masks from a database, in an order fixed by the run seed; sample k takes candidate k, its retry a
    takes candidate k + a·N (N samples), so samples get different masks as in the reference, whatever the shard.

    The masks are read from `root`, a folder, or from `archive`, unpacked under `cache_root` only when the source is
    first used (`prepare` or `mask_for`), so planning and --dry-run write nothing. Every candidate must lie inside
    the folder its masks are read from, links followed, unless `allow_outside`.
    """
    database: Path
    candidates: list[MaskEntry]
    resample: bool
    size: Triple
    spacing: FloatTriple
    anatomy_ids: tuple[int, ...]
    seed: int
    num_samples: int
    augment: bool = True
    device: str = "cpu"
    root: Path | None = None  # None until the archive is unpacked
    archive: Path | None = None
    cache_root: Path | None = None
    allow_outside: bool = False
    kind: str = "database"
    order: list[MaskEntry] = field(init=False, default_factory=list)
    _ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        """Check at plan time all that needs no unpacking: the paths as written, the archive's directory; a folder
        is checked, and its resampled candidates tried, at once."""
        if self.root is None and self.archive is None:
            raise ValueError("DatabaseMaskSource needs a root folder or an archive")
        if not self.allow_outside:
            for entry in self.candidates:
                if climbs_out(entry.pseudo_label_filename):
                    raise outside_error(self.database, entry.pseudo_label_filename,
                                        str(self.root) if self.root is not None else "the unpacked mask archive")
        if self.root is not None:
            self.ready()
        elif not is_unpacked(self.archive, self.cache_root):
            inspect_archive(self.archive)

    def ready(self) -> None:
        """Unpack the archive (first use only), check that every candidate resolves inside the mask folder, keep
        the candidates that survive resampling, and fix their order."""
        if self._ready:
            return
        if self.root is None:
            unpacked = unpack_archive(self.archive, self.cache_root)
            self.root = mask_root(unpacked, self.candidates[0].pseudo_label_filename)
        if not self.allow_outside:
            for entry in self.candidates:
                if resolves_outside(self.root, entry.pseudo_label_filename):
                    raise outside_error(self.database, entry.pseudo_label_filename, str(self.root))
        if self.resample:
            self.candidates = surviving_candidates(self.root, self.candidates, self.anatomy_ids, self.size,
                                                   self.spacing, max(2 * self.num_samples, 5))
        self.order = shuffled(self.candidates, self.seed)
        self._ready = True

    def describe(self) -> dict[str, Any]:
        described = {"type": self.kind, "database": str(self.database), "candidates": len(self.candidates),
                     "match": "closest (resampled)" if self.resample else "exact", "augment": self.augment}
        if self.archive is not None:
            described["archive"] = str(self.archive)
            described["unpacked"] = self.unpacked_text()
        return described

    def unpacked_text(self) -> str:
        target = unpack_target(self.archive, self.cache_root)
        if self._ready or is_unpacked(self.archive, self.cache_root):
            return f"in {target}"
        return f"not yet: would be unpacked into {target} on first use"

    def prepare(self, loaded: LoadedModel) -> None:
        """Nothing to take from the loaded networks; the masks are made ready now, before any sample."""
        self.ready()

    def entry_for(self, index: int, attempt: int) -> tuple[int, MaskEntry]:
        self.ready()
        position = (index + attempt * self.num_samples) % len(self.order)
        return position, self.order[position]

    def mask_for(self, index: int, attempt: int, on_progress: ProgressCallback = no_progress) -> SampleMask:
        position, entry = self.entry_for(index, attempt)
        path = self.root / entry.pseudo_label_filename
        mask = load_condition_mask(path, self.size, self.spacing, entry_scheme(entry))
        lost = missing_anatomy(mask.labels, self.anatomy_ids)
        if lost:
            raise MaskError(f"mask database: candidate '{entry.pseudo_label_filename}' lost labels {lost} when "
                            f"resampled to {format_triple(self.size)}; ask for a size nearer the database's")
        labels = mask.labels
        if self.augment:
            labels = augment_mask(labels, derive_attempt_seed(self.seed, index, attempt) % 2**32, self.device)
        regions = entry.region_span() if not mask.resampled else None
        return SampleMask(
            ConditionMask(labels, mask.affine, mask.resampled, mask.original_shape, mask.original_spacing),
            {"type": self.kind, "database": str(self.database), "entry": entry.pseudo_label_filename,
             "candidate": position, "resampled": mask.resampled, "augmented": self.augment},
            regions,
        )


def entry_scheme(entry: MaskEntry) -> LabelScheme | None:
    """The label scheme a database entry's map is in (None: MAISI's ids)."""
    return None if entry.mask_labels == "maisi" else label_scheme(entry.mask_labels, "mask database")


def surviving_candidates(root: Path, candidates: Sequence[MaskEntry], anatomy_ids: Sequence[int], size: Triple,
                         spacing: FloatTriple, wanted: int) -> list[MaskEntry]:
    """The first `wanted` candidates, closest first, that keep every requested label once resampled (reference
    `find_closest_masks`)."""
    survivors = []
    for entry in candidates:
        path = root / entry.pseudo_label_filename
        if not path.is_file():
            raise MaskDatabaseError(f"mask database: '{entry.pseudo_label_filename}' is listed but missing "
                                    f"under {root}; unpack the mask archive again")
        if not missing_anatomy(load_condition_mask(path, size, spacing, entry_scheme(entry)).labels, anatomy_ids):
            survivors.append(entry)
        if len(survivors) >= wanted:
            break
    if not survivors:
        raise MaskDatabaseError(f"mask database: every close candidate loses a requested label when resampled to "
                                f"{format_triple(size)} at {format_triple(spacing)} mm; ask for a size nearer "
                                "the database's or pass --mask FILE")
    return survivors


def database_source(database: Path, entries: Sequence[MaskEntry], anatomy_ids: Sequence[int],
                    regions: Sequence[int], size: Triple, spacing: FloatTriple, seed: int, num_samples: int,
                    augment: bool, device: str, *, root: Path | None = None, archive: Path | None = None,
                    cache_root: Path | None = None, allow_outside: bool = False) -> DatabaseMaskSource:
    """Exact matches when there are enough; else the closest candidates that keep every requested label once
    resampled, at most max(2·N, 5) of them (tried when the masks are at hand: at once from a folder, on first use
    from an archive). The masks are read from `root`, or from `archive` unpacked under `cache_root`."""
    candidates, resample = find_candidates(entries, anatomy_ids, regions, size, spacing, num_samples)
    return DatabaseMaskSource(database, list(candidates), resample, size, spacing, tuple(anatomy_ids), seed,
                              num_samples, augment, device, root=root, archive=archive, cache_root=cache_root,
                              allow_outside=allow_outside)


@dataclass
class GeneratedMaskSource:
    """A new label map per sample and attempt from the mask DDPM, conditioned on the organ/tumour size vector,
    then post-processed and resampled from its native 1.5 mm grid to the requested one (reference §10)."""
    spec: ModelSpec
    requests: list[tuple[str, float]]
    condition: np.ndarray
    target_tumour: int | None
    controlled_ids: tuple[int, ...]
    size: Triple
    spacing: FloatTriple
    seed: int
    steps: int
    device: str
    precision: str
    profile: Profile  # for the mask decode plan
    kind: str = "generated"
    _loaded: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "sizes": dict(self.requests), "condition": [round(float(v), 6) for v in self.condition],
                "target_tumour": self.target_tumour, "mask_steps": self.steps}

    def prepare(self, loaded: LoadedModel) -> None:
        """Take the mask VAE and mask DDPM UNet the pipeline loaded (with the image networks, so their files are
        hashed and locked the same way)."""
        vae = loaded.networks["mask_generation_autoencoder"]
        decoder = loaded.networks.get("mask_generation_decoder")  # --backend onnx: the exported decoder
        if decoder is None:
            decoder = LatentDecoder(vae, loaded.scale_factors["mask_generation_diffusion"]).to(
                next(vae.parameters()).device)
        self._loaded = {
            "unet": loaded.networks["mask_generation_diffusion"],
            "decoder": decoder,
            "scheduler": build_scheduler(self.spec, "mask_generation_noise_scheduler"),
        }

    def latent_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.spec.network["mask_generation_latent_shape"])

    def mask_for(self, index: int, attempt: int, on_progress: ProgressCallback = no_progress) -> SampleMask:
        if self._loaded is None:
            raise RuntimeError("GeneratedMaskSource.prepare() must run before mask_for()")
        loaded = self._loaded
        seed = derive_sample_seed(derive_attempt_seed(self.seed, index, attempt), 2)  # apart from the image noise
        device = torch.device(self.device)
        latent_shape = self.latent_shape()
        noise = initial_noise(latent_shape, seed).to(device=device,
                                                    dtype=torch.float16 if self.precision == "fp16" else torch.float32)
        generator = torch.Generator(device=device).manual_seed(derive_sample_seed(seed, 1))
        latents = sample_mask_latents(loaded["unet"], loaded["scheduler"], self.condition, noise, self.steps,
                                      self.precision, generator,
                                      lambda done, total: on_progress(ProgressEvent("mask", done, total, sample=index,
                                                                                    attempt=attempt)))
        native = tuple(s * 4 for s in latent_shape[1:])
        plan = self.profile.decode_plan(latent_shape[1:], native, split_axis=int(
            self.spec.definition("mask_generation_autoencoder").get("dim_split", 1)))
        logits = decode_latents(loaded["decoder"], latents, plan, precision=self.precision, clip=False)
        channels = torch.argmax(logits, dim=1)[0].numpy()  # softmax keeps the argmax: the reference's softmax is moot
        labels = post_process(channels_to_labels(channels), self.target_tumour)
        fitted, affine, resampled = fit_to_grid(labels, ras_affine(GENERATED_SPACING), self.size, self.spacing)
        lost = missing_anatomy(fitted, self.controlled_ids)
        if lost:
            raise MaskError(f"generated mask: labels {lost} fall outside {format_triple(self.size)} at "
                            f"{format_triple(self.spacing)} mm; raise the size or the spacing (the mask model draws "
                            "a 384 mm cube)")
        mask = ConditionMask(fitted, affine, resampled, tuple(labels.shape), GENERATED_SPACING)  # type: ignore[arg-type]
        return SampleMask(mask, {"type": self.kind, "sizes": dict(self.requests), "seed": seed,
                                 "target_tumour": self.target_tumour, "mask_steps": self.steps,
                                 "condition": [round(float(v), 6) for v in self.condition], "resampled": resampled})

"""Find, fingerprint and load checkpoints in the released MAISI layouts.

Layouts (reference-inference.md §3.2):
- autoencoders: a bare state dict;
- diffusion UNets: {"unet_state_dict": …, "scale_factor": 0-dim tensor, …};
- ControlNet: {"controlnet_state_dict": …, …}.
Files are looked up under their repository names (e.g. `models/autoencoder_v1.pt`) in `--weights-dir` /
`MAISI_WEIGHTS_DIR`, then in maisi's import store, then in the Hugging Face cache (engine/store.py: where those two
are and their sha256 lock; engine/hub.py fetches into them). Every load is `torch.load(weights_only=True)`.

What is loaded is what was checked: `load_verified` reads a file once, hashes exactly those bytes, holds them to the
lock and hands the same bytes to torch.load, so the digest a sidecar records is the digest of the weights that ran
(a file swapped between a hash and a second read, or a cache keyed by size and mtime, cannot say otherwise).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maisi_cli.engine.store import (RepoFile, check_locked, download_command, fetch_command, managed_copies,
                                    model_files, model_reference)
from maisi_cli.errors import WeightsError
from maisi_cli.io.files import write_atomic
from maisi_cli.models import ModelSpec

STATE_DICT_KEYS = {
    "diffusion_unet": "unet_state_dict",
    "mask_generation_diffusion": "unet_state_dict",
    "controlnet": "controlnet_state_dict",
}
HAS_SCALE_FACTOR = {"diffusion_unet", "mask_generation_diffusion"}


# Where a file was found: a folder the user named, maisi's import store, the Hugging Face cache, or an absolute
# path in the spec. Only the store and the cache are maisi's to manage, so only they are held to the sha256 lock.
MANAGED_SOURCES = ("store", "hf-cache")


@dataclass(frozen=True)
class WeightFile:
    component: str
    repo_name: str  # path inside the Hugging Face repository, e.g. models/autoencoder_v1.pt
    path: Path
    source: str = "path"  # weights-dir | bundled | store | hf-cache | path


@dataclass(frozen=True)
class VerifiedLoad:
    """What `load_verified` put into a network: the sha256 of the bytes it loaded, and the layout's extras."""

    sha256: str
    extras: dict[str, Any]


def weights_dir_from_env(weights_dir: Path | None) -> Path | None:
    if weights_dir is not None:
        return weights_dir.expanduser()
    env = os.environ.get("MAISI_WEIGHTS_DIR")
    return Path(env).expanduser() if env else None


def first_sentence(error: BaseException, limit: int = 120) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return (text.split(". ")[0] or type(error).__name__)[:limit]


def locate_file(item: RepoFile, weights_dir: Path | None = None) -> tuple[Path, str] | None:
    """(path, where) of the copy a repository file is read from, or None. A model's file: `--weights-dir` /
    `MAISI_WEIGHTS_DIR` (or an absolute name in the spec), the package itself (a bundled model), maisi's import
    store, the Hugging Face cache. A single file (the FID extractor): the copy brought by hand, then the cache."""
    if item.spec is None:
        hand_placed = item.hand_placed
        if hand_placed is not None and hand_placed.is_file():
            return hand_placed, "hand-placed"
        return next(managed_copies(item), None)
    weights_dir = weights_dir_from_env(weights_dir)
    if weights_dir is not None and (weights_dir / item.repo_name).is_file():
        return weights_dir / item.repo_name, "weights-dir"
    if Path(item.repo_name).is_absolute():
        return (Path(item.repo_name), "path") if Path(item.repo_name).is_file() else None
    bundled = item.spec.bundled_file(item.repo_name)
    if bundled is not None:
        return bundled, "bundled"
    return next(managed_copies(item), None)


def repo_file(spec: ModelSpec, component: str) -> RepoFile:
    """The repository file of one component (a `weights` or `datasets` key); a WeightsError when the spec names
    none."""
    files = {item.component: item for item in model_files(spec)}
    if component not in files:
        if component == "controlnet":  # the MR models of MAISI v2 (plugin maisi-mr): no ControlNet is released
            raise WeightsError(f"model {spec.name} is image-only: its spec names no ControlNet weights (it "
                               "generates images without a condition mask); use a model with a ControlNet "
                               "(`maisi models`) for anything that needs one")
        raise WeightsError(f"model {spec.name}: its spec names no file for '{component}'")
    return files[component]


def find_weight(spec: ModelSpec, component: str, weights_dir: Path | None) -> WeightFile | None:
    """The file for one component, or None when no copy is here (not downloaded yet)."""
    item = repo_file(spec, component)
    found = locate_file(item, weights_dir)
    return WeightFile(component, item.repo_name, found[0], found[1]) if found is not None else None


def locate_weight(spec: ModelSpec, component: str, weights_dir: Path | None) -> WeightFile:
    """The file for one component (a `weights` key, or a `datasets` key such as mask_database), or a WeightsError
    naming it and the command that fetches it."""
    found = find_weight(spec, component, weights_dir)
    if found is not None:
        return found
    repo_name = repo_file(spec, component).repo_name
    weights_dir = weights_dir_from_env(weights_dir)
    if not spec.hf_repo:
        raise WeightsError(f"weights: {repo_name} ({spec.name} {component}) is missing; "
                           f"put it under {weights_dir or '--weights-dir'}")
    where = f"in {weights_dir}, " if weights_dir else ""
    raise WeightsError(
        f"weights: {repo_name} ({spec.name} {component}) is missing {where}in maisi's store and in the Hugging Face "
        f"cache for {spec.hf_repo}; fetch it with: {fetch_command(spec, component)}"
    )


def missing_files_error(spec: ModelSpec, missing: list[RepoFile], weights_dir: Path | None) -> WeightsError:
    """One line naming every file of `spec` a run needs that is not here, and the one command that fetches them all
    (the whole model's when none of its files is here)."""
    names = ", ".join(item.repo_name for item in missing)
    weights_dir = weights_dir_from_env(weights_dir)
    command = missing_files_command(spec, missing)
    if command is None:
        return WeightsError(f"weights: missing {names} ({spec.name}) — put them under "
                            f"{weights_dir or '--weights-dir'}")
    where = f"{weights_dir}, " if weights_dir else ""
    return WeightsError(f"weights: missing {names} ({spec.name}; not in {where}maisi's store or the Hugging Face cache "
                        f"for {spec.hf_repo}) — run `{command}`")


def missing_files_command(spec: ModelSpec, missing: list[RepoFile]) -> str | None:
    """The command that fetches `missing` (the model's plain download when it is all of its files); None for a
    model with no repository."""
    if not spec.hf_repo:
        return None
    if {item.component for item in missing} == {item.component for item in model_files(spec)}:
        return f"maisi weights download {model_reference(spec)}"
    return download_command(missing)


READ_BLOCK = 16 << 20  # large enough that a call per block costs nothing, small enough to hash while cache-hot


def read_hashed(path: Path) -> tuple[io.BytesIO, str]:
    """The whole file in memory and the sha256 of exactly those bytes, from one read.

    Each block is read straight into the BytesIO's own storage (allocated once at the file's size) and hashed there
    while it is fresh in the CPU's cache, so torch.load later parses the very bytes that were hashed: no second read
    of the file, and no copy of the whole before torch.load makes its tensors."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            buffer = io.BytesIO()
            if size:  # one allocation of the final size: writing its last byte sizes the storage
                buffer.seek(size - 1)
                buffer.write(b"\0")
            digest = hashlib.sha256()
            with buffer.getbuffer() as storage:
                filled = 0
                while filled < size:
                    got = handle.readinto(storage[filled:filled + READ_BLOCK])
                    if not got:
                        break
                    digest.update(storage[filled:filled + got])
                    filled += got
            grew = handle.read(1)
    except OSError as error:
        raise WeightsError(f"weights: {path} cannot be read ({first_sentence(error)})") from None
    if filled != size or grew:
        raise WeightsError(f"weights: {path} changed size while it was read (is a copy still being written?); "
                           "run again once it is complete")
    buffer.seek(0)
    return buffer, digest.hexdigest()


def check_lock(weight: WeightFile, spec: ModelSpec, digest: str) -> None:
    """A file in maisi's store or the Hugging Face cache whose repository name has an entry in the sha256 lock must
    match it, else a WeightsError naming the file and the command that re-fetches it. Other files (a
    `--weights-dir` folder, no lock entry) are used as they are."""
    if weight.source not in MANAGED_SOURCES or not spec.hf_repo:
        return
    check_locked(RepoFile(weight.component, weight.repo_name, repo=spec.hf_repo, revision=spec.hf_revision, spec=spec),
                 weight.path, digest)


def read_checkpoint(path: Path, data: io.BytesIO) -> Any:
    """torch.load with weights_only=True of `data`, the bytes read from `path`; anything else in the file is
    refused with a clear message."""
    import torch  # only to read or write a checkpoint: `maisi models` and `weights list` import this module

    magic = data.read(4)
    data.seek(0)
    if magic != b"PK\x03\x04":  # the zip archive of torch.save (the legacy format was refused by mmap before, too)
        raise WeightsError(f"weights: {path} is not a readable PyTorch checkpoint (not the zip archive torch.save "
                           "writes); fetch it again")
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"weights: {path} holds pickled Python objects, not only tensors; maisi loads checkpoints with "
            f"weights_only=True: re-save it as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise WeightsError(
            f"weights: {path} is not a readable PyTorch checkpoint ({first_sentence(error)}); fetch it again"
        ) from None


def state_dict_of(checkpoint: Any, component: str, path: Path, spec: ModelSpec) -> dict[str, Any]:
    """The state dict inside a checkpoint in the released layout for `component`."""
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"weights: {path} holds a {type(checkpoint).__name__}, not a state dict")
    key = STATE_DICT_KEYS.get(component)
    if key is None:
        return checkpoint
    if key not in checkpoint:
        found = ", ".join(list(checkpoint)[:4])
        raise WeightsError(
            f"weights: {path} is not a {spec.name} {component} checkpoint: it has no '{key}' entry "
            f"(it has {found}…)"
        )
    return checkpoint[key]


def check_keys(network: Any, state_dict: dict[str, Any], component: str, path: Path, spec: ModelSpec) -> None:
    """Strict key and shape check with a message naming the file, the model and the first differing keys."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [
        f"{k} {tuple(state_dict[k].shape)} in the file vs {tuple(v.shape)} in the network"
        for k, v in expected.items()
        if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    if reshaped:
        parts.append(f"{len(reshaped)} of another shape (first: {reshaped[0]})")
    raise WeightsError(f"weights: {path} does not fit {spec.name} {component}: keys {'; '.join(parts)}")


def load_verified(network: Any, weight: WeightFile, spec: ModelSpec,
                  read: tuple[io.BytesIO, str] | None = None) -> VerifiedLoad:
    """Load one checkpoint into `network` (strict) from a single read of its file: the bytes are hashed, held to
    the sha256 lock (`check_lock`), and those same bytes are unpickled with torch.load(weights_only=True). Returns
    their sha256 (what a sidecar records) and the extras of the released layout (scale_factor).

    Memory: while it runs, the file's bytes and the tensors torch.load makes from them are both held (about twice
    the file's size beside the network), and both are released when it returns. Callers load one file at a time so
    the peak stays at the largest file's bytes plus its tensors rather than the sum over all files (torch.load's
    mmap, which avoided the copy, reads the file a second time: what it maps need not be what was hashed).
    `read`: the file's (bytes, sha256) from `read_hashed`, when the caller read it already (`built_and_read`)."""
    data, digest = read if read is not None else read_hashed(weight.path)
    check_lock(weight, spec, digest)
    checkpoint = read_checkpoint(weight.path, data)
    del data  # the tensors are torch's own copies; the file's bytes are not needed past here
    state_dict = state_dict_of(checkpoint, weight.component, weight.path, spec)
    check_keys(network, state_dict, weight.component, weight.path, spec)
    network.load_state_dict(state_dict, strict=True)
    extras: dict[str, Any] = {}
    if weight.component in HAS_SCALE_FACTOR:
        if "scale_factor" not in checkpoint:
            raise WeightsError(f"weights: {weight.path} has no 'scale_factor' entry; {weight.component} needs one")
        extras["scale_factor"] = scale_factor_of(checkpoint["scale_factor"], weight)
    return VerifiedLoad(digest, extras)


def built_and_read(build: Callable[[], Any], weight: WeightFile) -> tuple[Any, tuple[io.BytesIO, str]]:
    """(`build()`, `read_hashed(weight.path)`), the file read and hashed in a second thread while the network is
    built: hashlib releases the GIL, so the hash (about 1 s a GB on one core) hides behind the network's
    construction instead of adding to the load (bench/weight_hash_cost.py)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="maisi-read") as pool:
        reading = pool.submit(read_hashed, weight.path)
        network = build()
        return network, reading.result()


def load_into(network: Any, weight: WeightFile, spec: ModelSpec) -> dict[str, Any]:
    """Load a checkpoint into `network` (strict, as `load_verified`). Returns the extras the released layout
    carries (scale_factor)."""
    return load_verified(network, weight, spec).extras


def scale_factor_of(value: Any, weight: WeightFile) -> Any:
    """A checkpoint's `scale_factor` as a 0-dim float32 tensor: one finite number, else a WeightsError."""
    import torch  # only to read or write a checkpoint: `maisi models` and `weights list` import this module

    if isinstance(value, torch.Tensor):
        is_number = value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    else:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number:
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:40]
        raise WeightsError(f"weights: {weight.path} has a 'scale_factor' of {shown}, not one number; "
                           f"{weight.component} checkpoints carry the latent scale as a 0-dim tensor")
    scale = torch.as_tensor(value, dtype=torch.float32).reshape(())
    if not torch.isfinite(scale):
        raise WeightsError(f"weights: {weight.path} has a 'scale_factor' of {scale.item()}, not a finite number; "
                           f"{weight.component} checkpoints carry the latent scale as a 0-dim tensor")
    return scale


def weight_status(spec: ModelSpec, weights_dir: Path | None = None,
                  datasets: bool = False) -> list[tuple[str, str, Path | None]]:
    """(component, repository name, local path or None) for every weight file of a model (and, with
    `datasets=True`, every data file of its repository after them)."""
    status = []
    for item in model_files(spec):
        if item.kind == "weights" or datasets:
            found = locate_file(item, weights_dir)
            status.append((item.component, item.repo_name, found[0] if found else None))
    return status


def save_released_checkpoint(network: Any, component: str, path: Path, scale_factor: float | None = None,
                             **extras: Any) -> None:
    """Save `network` in the released layout of `component` (atomically): what `load_into` reads back."""
    import torch  # only to read or write a checkpoint: `maisi models` and `weights list` import this module

    state_dict = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    key = STATE_DICT_KEYS.get(component)
    if key is None:
        payload: dict[str, Any] = state_dict
    else:
        payload = {key: state_dict, **extras}
        if component in HAS_SCALE_FACTOR:
            if scale_factor is None:
                raise ValueError(f"{component} checkpoints carry a scale_factor")
            payload["scale_factor"] = torch.tensor(float(scale_factor))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())

"""Find, fingerprint and load checkpoints in the released MAISI layouts.

Layouts (reference-inference.md §3.2):
- autoencoders: a bare state dict;
- diffusion UNets: {"unet_state_dict": …, "scale_factor": 0-dim tensor, …};
- ControlNet: {"controlnet_state_dict": …, …}.
Files are looked up under their repository names (e.g. `models/autoencoder_v1.pt`) in `--weights-dir` /
`MAISI_WEIGHTS_DIR`, then in maisi's import store, then in the Hugging Face cache (engine/hub.py manages the last two
and their sha256 lock). Every load is `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maisi_cli.config import maisi_home
from maisi_cli.errors import WeightsError
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

    def verified_sha256(self, spec: ModelSpec) -> str:
        """sha256 of the file; a WeightsError when a locked file no longer matches its lock (see verified_sha256)."""
        return verified_sha256(self, spec)


def weights_dir_from_env(weights_dir: Path | None) -> Path | None:
    if weights_dir is not None:
        return weights_dir.expanduser()
    env = os.environ.get("MAISI_WEIGHTS_DIR")
    return Path(env).expanduser() if env else None


def model_reference(spec: ModelSpec) -> str:
    """How to name the model on the command line: its name, or the spec file it was read from."""
    return spec.source if spec.source.endswith(".json") else spec.name


def fetch_command(spec: ModelSpec, component: str) -> str:
    """The command that downloads one file of a model."""
    return f"maisi weights download {model_reference(spec)} --component {component}"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def first_sentence(error: BaseException, limit: int = 120) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return (text.split(". ")[0] or type(error).__name__)[:limit]


def locate_file(spec: ModelSpec, repo_name: str, weights_dir: Path | None) -> tuple[Path, str] | None:
    """(path, source) of one repository file of a model, or None. Order: `--weights-dir` / `MAISI_WEIGHTS_DIR`
    (or an absolute name in the spec), the package itself (a bundled model), maisi's import store, the Hugging Face
    cache."""
    weights_dir = weights_dir_from_env(weights_dir)
    if weights_dir is not None and (weights_dir / repo_name).is_file():
        return weights_dir / repo_name, "weights-dir"
    if Path(repo_name).is_absolute():
        return (Path(repo_name), "path") if Path(repo_name).is_file() else None
    bundled = spec.bundled_file(repo_name)
    if bundled is not None:
        return bundled, "bundled"
    if spec.hf_repo:
        from maisi_cli.engine.hub import cached_file, store_dir

        stored = store_dir(spec.hf_repo, spec.hf_revision) / repo_name
        if stored.is_file():
            return stored, "store"
        cached = cached_file(spec, repo_name)
        if cached is not None:
            return cached, "hf-cache"
    return None


def locate_weight(spec: ModelSpec, component: str, weights_dir: Path | None) -> WeightFile:
    """The file for one component (a `weights` key, or a `datasets` key such as mask_database), or a WeightsError
    naming it and the command that fetches it."""
    files = {**spec.weights, **spec.datasets}
    if component not in files:
        if component == "controlnet":  # the MR models of MAISI v2 (plugin maisi-mr): no ControlNet is released
            raise WeightsError(f"model {spec.name} is image-only: its spec names no ControlNet weights (it "
                               "generates images without a condition mask); use a model with a ControlNet "
                               "(`maisi models`) for anything that needs one")
        raise WeightsError(f"model {spec.name}: its spec names no file for '{component}'")
    repo_name = files[component]
    found = locate_file(spec, repo_name, weights_dir)
    if found is not None:
        return WeightFile(component, repo_name, found[0], found[1])
    weights_dir = weights_dir_from_env(weights_dir)
    if not spec.hf_repo:
        raise WeightsError(f"weights: {repo_name} ({spec.name} {component}) is missing; "
                           f"put it under {weights_dir or '--weights-dir'}")
    where = f"in {weights_dir}, " if weights_dir else ""
    raise WeightsError(
        f"weights: {repo_name} ({spec.name} {component}) is missing {where}in maisi's store and in the Hugging Face "
        f"cache for {spec.hf_repo}; fetch it with: {fetch_command(spec, component)}"
    )


def _sha256_cache_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_sha256_cache() -> dict[str, str]:
    try:
        return json.loads((maisi_home() / "sha256-cache.json").read_text())
    except (OSError, ValueError):
        return {}


def remember_sha256(path: Path, digest: str) -> None:
    """Record a digest computed elsewhere (e.g. while copying) so `sha256_of` need not re-read the file."""
    cache_file = maisi_home() / "sha256-cache.json"
    cache = _read_sha256_cache()
    cache[_sha256_cache_key(path)] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, cache_file)
    except OSError:
        pass  # a read-only home only costs re-hashing


def sha256_of(path: Path, fresh: bool = False) -> str:
    """sha256 of a file, remembered under MAISI_HOME by (path, size, mtime) so large checkpoints hash once.
    `fresh=True` reads the file again whatever the cache says (`maisi weights verify`)."""
    key = _sha256_cache_key(path)
    if not fresh:
        cached = _read_sha256_cache().get(key)
        if cached:
            return cached
    digest = hash_file(path)
    remember_sha256(path, digest)
    return digest


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (no cache: `sha256_of` remembers large checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_sha256(weight: WeightFile, spec: ModelSpec) -> str:
    """sha256 of a weight file before it is loaded. A file in maisi's store or the Hugging Face cache whose
    repository name has an entry in the sha256 lock must match it, else a WeightsError naming the file and the
    command that re-fetches it. Other files (a `--weights-dir` folder, no lock entry) are hashed and used."""
    digest = sha256_of(weight.path)
    if weight.source not in MANAGED_SOURCES or not spec.hf_repo:
        return digest
    from maisi_cli.engine.hub import lock_path, read_lock

    entry = read_lock(spec.hf_repo, spec.hf_revision).get(weight.repo_name)
    if entry and entry.get("sha256") != digest:
        raise WeightsError(
            f"weights: {weight.path} ({spec.name} {weight.component}) no longer matches the sha256 locked in "
            f"{lock_path(spec.hf_repo, spec.hf_revision)} (changed or corrupt); re-fetch it with: "
            f"{fetch_command(spec, weight.component)} --force"
        )
    return digest


def read_checkpoint(path: Path) -> Any:
    """torch.load with weights_only=True; anything else in the file is refused with a clear message."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


def load_into(network: Any, weight: WeightFile, spec: ModelSpec) -> dict[str, Any]:
    """Load a checkpoint into `network` (strict). Returns the extras the released layout carries (scale_factor)."""
    import torch

    checkpoint = read_checkpoint(weight.path)
    state_dict = state_dict_of(checkpoint, weight.component, weight.path, spec)
    check_keys(network, state_dict, weight.component, weight.path, spec)
    network.load_state_dict(state_dict, strict=True)
    extras: dict[str, Any] = {}
    if weight.component in HAS_SCALE_FACTOR:
        if "scale_factor" not in checkpoint:
            raise WeightsError(f"weights: {weight.path} has no 'scale_factor' entry; {weight.component} needs one")
        extras["scale_factor"] = torch.as_tensor(checkpoint["scale_factor"], dtype=torch.float32).reshape(())
    return extras


def weight_status(spec: ModelSpec, weights_dir: Path | None = None,
                  datasets: bool = False) -> list[tuple[str, str, Path | None]]:
    """(component, repository name, local path or None) for every weight file of a model (and, with
    `datasets=True`, every data file of its repository after them)."""
    files = {**spec.weights, **(spec.datasets if datasets else {})}
    status = []
    for component, repo_name in files.items():
        found = locate_file(spec, repo_name, weights_dir)
        status.append((component, repo_name, found[0] if found else None))
    return status


def save_released_checkpoint(network: Any, component: str, path: Path, scale_factor: float | None = None,
                             **extras: Any) -> None:
    """Save `network` in the released layout of `component` (atomically): what `load_into` reads back."""
    import io

    import torch

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
    from maisi_cli.io.nifti import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())

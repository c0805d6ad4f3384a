"""Find, fingerprint and load checkpoints in the released MAISI layouts.

Layouts (reference-inference.md §3.2):
- autoencoders: a bare state dict;
- diffusion UNets: {"unet_state_dict": …, "scale_factor": 0-dim tensor, …};
- ControlNet: {"controlnet_state_dict": …, …}.
Files are looked up under their repository names (e.g. `models/autoencoder_v1.pt`) in `--weights-dir` /
`MAISI_WEIGHTS_DIR`, else in the Hugging Face cache. Every load is `torch.load(weights_only=True)`.
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


@dataclass(frozen=True)
class WeightFile:
    component: str
    repo_name: str  # path inside the Hugging Face repository, e.g. models/autoencoder_v1.pt
    path: Path


def weights_dir_from_env(weights_dir: Path | None) -> Path | None:
    if weights_dir is not None:
        return weights_dir.expanduser()
    env = os.environ.get("MAISI_WEIGHTS_DIR")
    return Path(env).expanduser() if env else None


def fetch_command(spec: ModelSpec, repo_name: str, weights_dir: Path | None) -> str:
    target = f" --local-dir {weights_dir}" if weights_dir else ""
    revision = f" --revision {spec.hf_revision}" if spec.hf_revision != "main" else ""
    return f"hf download {spec.hf_repo} {repo_name}{revision}{target}"


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


def locate_weight(spec: ModelSpec, component: str, weights_dir: Path | None) -> WeightFile:
    """The file for one component, or a WeightsError naming it and the command that fetches it."""
    if component not in spec.weights:
        raise WeightsError(f"model {spec.name}: its spec names no weight file for '{component}'")
    repo_name = spec.weights[component]
    weights_dir = weights_dir_from_env(weights_dir)
    candidates = []
    if weights_dir is not None:
        candidates.append(weights_dir / repo_name)
    elif Path(repo_name).is_absolute():
        candidates.append(Path(repo_name))
    for candidate in candidates:
        if candidate.is_file():
            return WeightFile(component, repo_name, candidate)
    if weights_dir is None and spec.hf_repo:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.hf_repo, repo_name, revision=spec.hf_revision, cache_dir=hf_hub_cache())
        if isinstance(cached, str):
            return WeightFile(component, repo_name, Path(cached))
    where = f"in {weights_dir}" if weights_dir else f"in the Hugging Face cache for {spec.hf_repo}"
    fix = fetch_command(spec, repo_name, weights_dir) if spec.hf_repo else f"put it under {weights_dir or '--weights-dir'}"
    raise WeightsError(f"weights: {repo_name} ({spec.name} {component}) is missing {where}; fetch it with: {fix}")


def sha256_of(path: Path) -> str:
    """sha256 of a file, remembered under MAISI_HOME by (path, size, mtime) so large checkpoints hash once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = maisi_home() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, cache_file)
    except OSError:
        pass  # a read-only home only costs re-hashing
    return cache[key]


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


def weight_status(spec: ModelSpec, weights_dir: Path | None = None) -> list[tuple[str, str, Path | None]]:
    """(component, repository name, local path or None) for every weight file of a model."""
    status = []
    for component, repo_name in spec.weights.items():
        try:
            status.append((component, repo_name, locate_weight(spec, component, weights_dir).path))
        except WeightsError:
            status.append((component, repo_name, None))
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

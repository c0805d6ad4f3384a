"""What every `maisi train …` engine shares besides the loop (loop.py): its config (file + flags), AMP,
torch.distributed helpers, seeds and RNG states, atomic saving, and the checks of --out / --resume / --init with the
run's identity.

Reference: reference-training-fid-trt.md §3, §5. Differences from the reference, on purpose:
- a CPU path with the gloo backend (the reference only knows NCCL on CUDA);
- the global rank comes from RANK (not LOCAL_RANK), the device index from LOCAL_RANK, so multi-node runs work;
- a `DistributedSampler` shards the data (the reference pre-partitions lists per rank);
- a real resume: the reference saves no optimiser or scheduler state.

Everything saved is tensors, numbers, strings, lists and dicts, so every file loads with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import pickle
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.nn.parallel import DistributedDataParallel

from maisi_cli.engine.runtime import Runtime
from maisi_cli.errors import MaisiError, UsageError, first_validation_problem, missing_option
from maisi_cli.io.documents import read_document
from maisi_cli.io.files import write_atomic


class TrainingError(MaisiError):
    """Training cannot start or continue (empty data, a resume file that does not fit, …)."""


# --- config ----------------------------------------------------------------------------------------------------
class TrainConfig(BaseModel):
    """Options every training command has. A `--config FILE` (JSON or TOML, flat keys as the field names) sets
    them; flags given on the command line override the file."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    amp: bool | None = None  # None: on when the device is CUDA
    amp_dtype: Literal["fp16", "bf16"] | None = None  # None: fp16 on CUDA, bf16 on the CPU
    resume: bool = False
    num_workers: int = Field(0, ge=0)


def read_config_file(path: Path) -> dict[str, Any]:
    """A `--config` file: TOML when it ends in .toml, else JSON; a table/object of options."""
    return read_document(path, "--config", shape="a table/object of options")


def build_config(cls: type[BaseModel], config_file: Path | None, flags: dict[str, Any],
                 required: dict[str, str] | None = None) -> Any:
    """`cls` from the file's keys, overridden by the flags that were given (None = not given). `required`: what to
    give for a required setting left out, by name (e.g. out: "the output folder, e.g. --out runs/vae")."""
    values = read_config_file(config_file) if config_file is not None else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls.model_validate(values)
    except ValidationError as error:
        field, problem = first_validation_problem(error)
        if error.errors()[0]["type"] == "missing" and field in flags:
            raise missing_option(field, (required or {}).get(field), config_file) from None
        if error.errors()[0]["type"] == "extra_forbidden" and config_file is not None:
            # A typo in the file: name the key and the nearest real setting, not a flag that does not exist.
            close = difflib.get_close_matches(field, list(cls.model_fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; the settings are: {', '.join(cls.model_fields)}"
            raise UsageError(f"--config {config_file}: key '{field}' is not a setting of this command{hint}") from None
        if field not in flags and config_file is not None:
            # A config-only key (no flag of that name): name the key and the file, not a flag that does not exist.
            raise UsageError(f"--config {config_file}: key '{field}': {problem}") from None
        source = f" (from --config {config_file} or its flag)" if config_file else ""
        raise UsageError(f"--{field.replace('_', '-')}: {problem}{source}") from None


# --- devices, AMP, distributed ------------------------------------------------------------------------------------
def all_reduce(tensor: torch.Tensor, runtime: Runtime, average: bool = False) -> torch.Tensor:
    """Sum (or mean) over ranks, in place; a no-op in a single process. gloo has no AVG, so the mean is sum/world."""
    if runtime.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if average:
            tensor /= runtime.world_size
    return tensor


def amp_settings(requested: bool | None, dtype_name: str | None, device: torch.device) -> tuple[bool, torch.dtype]:
    """(enabled, dtype). CUDA: on by default, fp16 unless `amp_dtype` says bf16. CPU: off by default; `--amp` runs
    bf16 autocast there (a CPU with bf16 arithmetic trains the demo's networks 2–3.5× as fast as fp32, see
    bench/results/train_cpu_amp.json); fp16 autocast on the CPU is refused (few, slow kernels)."""
    if device.type == "cuda":
        return (True if requested is None else requested), (torch.bfloat16 if dtype_name == "bf16" else torch.float16)
    if not requested:
        return False, torch.bfloat16
    if dtype_name == "fp16":
        raise UsageError('--amp: on the CPU mixed precision is bf16; set amp_dtype = "bf16" (or leave it out) in '
                         "--config, or drop --amp")
    return True, torch.bfloat16


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, enabled: bool, dtype: torch.dtype, **options: float) -> torch.amp.GradScaler:
    """A GradScaler, active only for fp16 on CUDA (bf16 needs none); a disabled one is a cheap pass-through.
    `options`: GradScaler's init_scale, growth_factor, …"""
    return torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16 and device.type == "cuda",
                                **options)


def wrap_ddp(module: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """DDP around `module` when distributed. Callers keep the unwrapped module for attributes and saving: DDP does not
    forward attributes such as `num_class_embeds` to `.module` (the reference reads them through the wrapper, an
    AttributeError under multi-GPU — reference §5; fixed here by never reading them from the wrapper)."""
    if runtime.world_size <= 1:
        return module
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- RNG states as tensors (so weights_only loading works) --------------------------------------------------------
def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "numpy_has_gauss": int(numpy_state[3]),
        "numpy_gauss": float(numpy_state[4]),
        "python_version": int(python_state[0]),
        "python": torch.tensor(python_state[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# --- files --------------------------------------------------------------------------------------------------------
def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def load_state(path: Path, what: str) -> dict[str, Any]:
    """A file saved by `save_atomic`, loaded with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"--resume: '{path}' ({what}) does not exist; start without --resume") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise TrainingError(f"--resume: '{path}' ({what}) is not a readable training state "
                            f"({str(error).splitlines()[0][:120]})") from None
    if not isinstance(state, dict):
        raise TrainingError(f"--resume: '{path}' ({what}) holds a {type(state).__name__}, not a training state")
    return state


def run_identity(trainer: str, spec: Any, component: str) -> dict[str, str]:
    """What a `train_state.pt` belongs to: the trainer kind, the model name and a hash of the trained network's
    definition (its `<component>_def` with the `@` references it uses resolved), so `--resume` can refuse a state
    written by another trainer or for another network."""
    network = spec.network

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@") and value[1:] in network:
            return resolve(network[value[1:]])
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    definition = resolve(network.get(f"{component}_def", {}))
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
    return {"trainer": trainer, "model": str(spec.name), "network_hash": digest}


def check_identity(state: dict[str, Any], identity: dict[str, str], path: Path) -> None:
    """One-line TrainingError when `state` (a loaded train_state.pt) was written by another trainer, for another
    model or for another network definition. States without a recorded identity (older runs) pass."""
    recorded = state.get("identity")
    if not isinstance(recorded, dict):
        return
    names = {"trainer": "trainer", "model": "model", "network_hash": "network definition (hash)"}
    for key, label in names.items():
        if key in recorded and str(recorded[key]) != identity[key]:
            raise TrainingError(f"--resume: '{path}' was written for {label} '{recorded[key]}', this run is "
                                f"{label} '{identity[key]}'; start a new --out or drop --resume")


def start_or_resume(config: Any, checkpoint_path: Path, state_path: Path,
                    identity: dict[str, str]) -> dict[str, Any] | None:
    """Check the output folder against --resume / --init before anything is built or written; return the resume
    state (None for a fresh run). A fresh run never overwrites an earlier one."""
    out = state_path.parent
    if config.resume and getattr(config, "init", None) is not None:
        raise TrainingError("--resume and --init: pick one (resume continues --out, init starts from a checkpoint)")
    if config.resume and not (checkpoint_path.is_file() and state_path.is_file()):
        raise TrainingError(f"--resume: '{out}' holds no {checkpoint_path.name} and {state_path.name} to resume "
                            "from; drop --resume")
    if not config.resume and state_path.exists():
        raise TrainingError(f"--out: '{out}' already holds a training run; pass --resume to continue it or pick "
                            "another --out")
    return load_resume_state(state_path, identity) if config.resume else None


def load_resume_state(path: Path, identity: dict[str, str]) -> dict[str, Any]:
    """`load_state` + `check_identity`: call before anything is built or written."""
    state = load_state(path, "training state")
    check_identity(state, identity, path)
    return state

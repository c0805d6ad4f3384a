"""GPU speed levers: the switches a profile (`[levers]` in profiles/*.toml) or the `MAISI_LEVERS` environment variable
turns on. Every lever is off by default, because each one can change the output's float rounding (cuDNN algorithm
choice, memory layout, fused kernels, window blending); with all of them off a run is byte-identical to the
reference path (bench/behaviour_sha256.py --check).

- `cudnn_benchmark` (CUDA): `torch.backends.cudnn.benchmark` while the networks run (cuDNN times its algorithms
  for each new shape and keeps the fastest);
- `channels_last`: the VAE decoder's weights and input in `torch.channels_last_3d`;
- `compile`: `torch.compile` of the UNet and ControlNet (`compile_mode`, `compile_backend`);
- `cuda_graphs` (CUDA): the fixed-shape denoising step replayed as CUDA graphs, `torch.compile(mode=
  "reduce-overhead")` of the UNet and ControlNet (implies `compile`);
- `decode_overlap`: the sliding-window overlap of the VAE decode instead of the profile table's (the reference
  files use 0.25 to 0.6666; the seam measure, engine/seams.py, barely moves from 0.4 to 0.5);
- `decode_plan = "planner"` (GPU profiles): the memory planner's fastest decode plan within the profile's budget,
  also for the sizes the profile's table holds.

Compiled graphs are cached by PyTorch's inductor in `TORCHINDUCTOR_CACHE_DIR` (default `/tmp/torchinductor_$USER`):
point it at a persistent folder to reuse them across runs. A lever that cannot run where the run goes (a CUDA-only
lever on the CPU, `compile` of an exported `--backend onnx|trt` graph) is dropped with a note in the run's record.

No torch here: the registries (profiles.py) read it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maisi_cli.errors import UsageError, first_validation_problem

ENV = "MAISI_LEVERS"
CUDA_ONLY = ("cudnn_benchmark", "cuda_graphs")
SWITCHES = ("cudnn_benchmark", "channels_last", "compile", "cuda_graphs")
EXAMPLES = {"decode_overlap": "0.4", "decode_plan": "planner", "compile_mode": "max-autotune",
            "compile_backend": "inductor"}


class Levers(BaseModel):
    """The levers of one run. All off: the reference numerics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cudnn_benchmark: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: Literal["default", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"  # torch.compile's backend; "eager"/"aot_eager" trace without code generation
    cuda_graphs: bool = False
    decode_overlap: float | None = Field(default=None, ge=0.0, lt=1.0)
    decode_plan: Literal["table", "planner"] = "table"

    @property
    def any_on(self) -> bool:
        return self != Levers()

    def on(self) -> list[str]:
        """The levers that are on, as `MAISI_LEVERS` writes them."""
        names = [name for name in SWITCHES if getattr(self, name)]
        if self.compile and self.compile_mode != "default":
            names.append(f"compile_mode={self.compile_mode}")
        if (self.compile or self.cuda_graphs) and self.compile_backend != "inductor":
            names.append(f"compile_backend={self.compile_backend}")
        if self.decode_overlap is not None:
            names.append(f"decode_overlap={self.decode_overlap:g}")
        if self.decode_plan != "table":
            names.append(f"decode_plan={self.decode_plan}")
        return names

    def for_device(self, device_type: str, backend: str = "torch") -> tuple[Levers, list[str]]:
        """(the levers that run on this device and backend, a note for each one dropped)."""
        drop: dict[str, Any] = {}
        notes = []
        if device_type != "cuda":
            for name in CUDA_ONLY:
                if getattr(self, name):
                    drop[name] = False
                    notes.append(f"{name}: needs a CUDA GPU, ignored on {device_type}")
        if backend != "torch":
            for name in ("compile", "cuda_graphs", "channels_last"):
                if getattr(self, name) and name not in drop:
                    drop[name] = False
                    notes.append(f"{name}: acts on torch networks, ignored with --backend {backend}")
        return self.model_copy(update=drop), notes


def parse_levers(text: str, field_name: str = ENV) -> Levers:
    """`MAISI_LEVERS` text → Levers: comma-separated names switched on (`compile,cuda_graphs`), `name=value` for the
    valued ones (`decode_overlap=0.4`, `decode_plan=planner`, `compile_mode=max-autotune`), or `off` for none."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items in ([], ["off"], ["none"]):
        return Levers()
    fields: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in Levers.model_fields:
            raise UsageError(f"{field_name}: unknown lever '{name}'; known: {', '.join(Levers.model_fields)} "
                             "(comma-separated, e.g. cudnn_benchmark,compile or decode_overlap=0.4; 'off' for none)")
        if not value:
            if name not in SWITCHES:
                raise UsageError(f"{field_name}: lever '{name}' needs a value, e.g. {name}={EXAMPLES[name]}")
            fields[name] = True
        elif name == "decode_overlap" and value.strip().lower() in ("none", "table"):
            fields[name] = None
        else:
            fields[name] = value.strip()
    try:
        return Levers.model_validate(fields)
    except ValidationError as error:
        where, problem = first_validation_problem(error)
        raise UsageError(f"{field_name}: lever '{where}': {problem}") from None


def effective_levers(profile_levers: Levers | None, profile_name: str = "") -> tuple[Levers, str]:
    """(the run's levers, where they came from): `MAISI_LEVERS` when set (it replaces the profile's), else the
    profile's `[levers]` table."""
    text = os.environ.get(ENV)
    if text is not None and text.strip():
        return parse_levers(text), ENV
    return profile_levers or Levers(), f"profile {profile_name}".strip()


@contextlib.contextmanager
def use_levers(text: str | None) -> Iterator[None]:
    """The Python API's override: `MAISI_LEVERS` = `text` while inside (checked first; None: unset, the profile's
    levers), restored after. Levers act when a Generator loads its networks: make the Generator inside."""
    if text is not None:
        parse_levers(text)
    before = os.environ.get(ENV)
    if text is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = text
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def plan_levers(plan: Any) -> Levers:
    """The levers a generation plan runs with (its profile's, or MAISI_LEVERS)."""
    return effective_levers(plan.profile.levers, plan.profile.name)[0]

"""The GPU speed levers (maisi_cli/levers.py) applied to a plan's loaded networks.

- the UNet and ControlNet are wrapped in `LeveredNetwork`: cuDNN benchmark mode while they run, `torch.compile`
  (with CUDA graphs as `mode="reduce-overhead"`), and the seconds of each first call per input shape (tracing and
  compilation) recorded as compile time;
- the VAE decoder (`LatentDecoder`) gets its weights and input in channels-last-3d, and cuDNN benchmark mode while
  `decode_latents` runs (engine/decode.py reads `decoder.levers`);
- the decode overlap and plan levers act where the decode plan is made (profiles.Profile.decode_plan).

With every lever off nothing is wrapped or converted: the networks are the ones the reference path runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from maisi_cli.levers import Levers, effective_levers


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """`torch.backends.cudnn.benchmark` set while inside (and restored), only when asked: off leaves it untouched."""
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _signature(args: tuple, kwargs: dict[str, Any]) -> tuple:
    """The input shapes and dtypes a compiled graph is specialised on."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype, value.device.type, value.is_inference()
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        return None

    return tuple(describe(a) for a in args), tuple(sorted((k, describe(v)) for k, v in kwargs.items()))


class LeveredNetwork:
    """A UNet or ControlNet run with levers: same call, same attributes (read and set through to the network, so
    `sampling.condition_embedded_once` still swaps the ControlNet's condition embedding), optionally compiled.

    `marks_step`: with CUDA graphs, the network called first in each denoising step tells PyTorch a new step
    begins (`torch.compiler.cudagraph_mark_step_begin`), so the graphs' output buffers of the previous step, already
    consumed by then, can be reused."""

    def __init__(self, network: torch.nn.Module, levers: Levers, record: dict[str, Any], name: str,
                 marks_step: bool = False):
        own = {"_network": network, "_levers": levers, "_record": record, "_name": name, "_seen": set(),
               "_marks_step": marks_step and levers.cuda_graphs, "_call": network}
        for key, value in own.items():
            object.__setattr__(self, key, value)
        if levers.compile or levers.cuda_graphs:
            mode = "reduce-overhead" if levers.cuda_graphs else levers.compile_mode
            # dynamic=False: the denoising loop's shapes are fixed; a new size compiles its own graph
            object.__setattr__(self, "_call", torch.compile(network, mode=mode, backend=levers.compile_backend,
                                                            dynamic=False))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._network, name, value)

    @property
    def network(self) -> torch.nn.Module:
        return self._network

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self._call is not self._network
        latents = kwargs.get("x")
        if compiled and isinstance(latents, torch.Tensor) and torch.is_inference_mode_enabled() \
                and not latents.is_inference():
            # The first step's noise was made outside inference mode, every later latent inside: a graph guards on
            # that, so without this copy (exact, one latent) the first two steps would compile twice.
            kwargs["x"] = latents.clone()
        first = compiled and (key := _signature(args, kwargs)) not in self._seen
        with cudnn_benchmark(self._levers.cudnn_benchmark):
            if self._marks_step:
                torch.compiler.cudagraph_mark_step_begin()
            if not first:
                return self._call(*args, **kwargs)
            device = next((v.device for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            output = self._call(*args, **kwargs)
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self._seen.add(key)
            seconds = time.perf_counter() - start
            compile_s = self._record.setdefault("compile_s", {})
            compile_s[self._name] = round(compile_s.get(self._name, 0.0) + seconds, 3)
            return output


def run_levers(plan: Any, backend: str) -> tuple[Levers, dict[str, Any] | None]:
    """(the levers this plan's networks run with, the record the sidecar carries under backend.levers, None when
    none was asked for): the profile's `[levers]` or MAISI_LEVERS, less what the device or backend cannot run (each
    with a note)."""
    requested, source = effective_levers(plan.profile.levers, plan.profile.name)
    if not requested.any_on:
        return requested, None
    applied, notes = requested.for_device(torch.device(plan.device).type, backend)
    record: dict[str, Any] = {"source": source, "on": applied.on(), "notes": notes}
    if requested != applied:
        record["requested"] = requested.on()
    return applied, record


def apply_levers(levers: Levers, record: dict[str, Any], unet: Any, controlnet: Any, decoder: Any
                 ) -> tuple[Any, Any, Any]:
    """(unet, controlnet, decoder) with the levers applied; the same objects when none is on. Compilation itself
    happens at each network's first call (recorded in `record["compile_s"]`)."""
    network_levers = levers.cudnn_benchmark or levers.compile or levers.cuda_graphs
    if network_levers and isinstance(unet, torch.nn.Module):
        unet = LeveredNetwork(unet, levers, record, "unet", marks_step=controlnet is None)
    if network_levers and isinstance(controlnet, torch.nn.Module):
        controlnet = LeveredNetwork(controlnet, levers, record, "controlnet", marks_step=True)
    if isinstance(decoder, torch.nn.Module) and hasattr(decoder, "levers"):  # a LatentDecoder, not an exported graph
        decoder.levers = levers
        if levers.channels_last:
            decoder.to(memory_format=torch.channels_last_3d)
    return unet, controlnet, decoder

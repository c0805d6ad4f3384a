"""Build MAISI networks and schedulers from a model spec, with MONAI's own classes only.

The spec's `_target_` strings are matched against an allow-list (never imported by name from data), and `@key`
values are looked up among the spec's top-level constants, as MONAI's ConfigParser would, without evaluating code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution, MaisiGroupNorm3D

from maisi_cli.errors import UsageError
from maisi_cli.models import ALLOWED_TARGETS, ModelSpec


def resolve_definition(constants: dict[str, Any], definition: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """(class, keyword arguments) for one `*_def` block."""
    target = definition.get("_target_")
    if target not in ALLOWED_TARGETS:
        raise UsageError(
            f"network definition: '_target_' {target!r} is not a MONAI MAISI class maisi can build; "
            f"use one of {', '.join(sorted(t.rsplit('.', 1)[1] for t in ALLOWED_TARGETS))}"
        )
    kwargs = {}
    for key, value in definition.items():
        if key == "_target_":
            continue
        if isinstance(value, str) and value.startswith("@"):
            if value[1:] not in constants:
                raise UsageError(f"network definition: '{key}' refers to '{value}', which the spec does not define")
            value = constants[value[1:]]
        kwargs[key] = value
    module_name, class_name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name), kwargs


def device_overrides(kwargs: dict[str, Any], device: torch.device, precision: str) -> dict[str, Any]:
    """Switch off what MONAI cannot run here; the state-dict keys are the same either way.

    - flash attention: MONAI's MAISI UNet refuses it without CUDA;
    - norm_float16 (VAE GroupNorm output cast to fp16): fails in fp32, so only on a GPU in fp16.
    """
    adjusted = dict(kwargs)
    if "use_flash_attention" in adjusted:
        adjusted["use_flash_attention"] = bool(adjusted["use_flash_attention"]) and device.type == "cuda"
    if "norm_float16" in adjusted:
        adjusted["norm_float16"] = bool(adjusted["norm_float16"]) and device.type == "cuda" and precision == "fp16"
    return adjusted


def build_network(spec: ModelSpec, component: str, device: torch.device | str = "cpu",
                  precision: str = "fp32") -> torch.nn.Module:
    """An untrained network of `component` on the CPU in eval mode (weights are loaded next, then moved)."""
    device = torch.device(device)
    cls, kwargs = resolve_definition(spec.network, spec.definition(component))
    network = cls(**device_overrides(kwargs, device, precision))
    return network.eval()


def build_scheduler(spec: ModelSpec, key: str = "noise_scheduler") -> Any:
    cls, kwargs = resolve_definition(spec.network, spec.network[key])
    return cls(**kwargs)


def set_tp_splits(autoencoder: torch.nn.Module, splits: int) -> None:
    """Tensor-parallel splits of every MaisiConvolution (MONAI reads `num_splits` at each forward)."""
    for module in autoencoder.modules():
        if isinstance(module, MaisiConvolution):
            module.num_splits = splits


def _fused_group_norm_forward(norm: torch.nn.GroupNorm, input: torch.Tensor) -> torch.Tensor:
    """What `MaisiGroupNorm3D.forward` computes (fp32 statistics and normalisation; fp16 output with norm_float16,
    where MONAI applies the affine after the cast and this before it), in one call of torch's group_norm kernel
    instead of MONAI's Python loop over the groups."""
    with torch.autocast(input.device.type, enabled=False):
        weight = None if norm.weight is None else norm.weight.float()
        bias = None if norm.bias is None else norm.bias.float()
        output = torch.nn.functional.group_norm(input.float(), norm.num_groups, weight, bias, norm.eps)
    return output.half() if norm.norm_float16 else output


def fuse_group_norms(autoencoder: torch.nn.Module) -> int:
    """Run every `MaisiGroupNorm3D` of the VAE through torch's fused group_norm; returns how many it changed.

    MONAI normalises one group at a time to bound the memory of whole-body volumes on a GPU. At training sizes that
    loop was a third of a step: in bf16 on 2 CPU cores the demo VAE's training step went from 1.4 s to 0.9 s
    (bench/README.md). Same function and the same state-dict keys; results agree to float rounding
    (tests/unit/test_networks.py).
    """
    changed = 0
    for module in autoencoder.modules():
        if isinstance(module, MaisiGroupNorm3D):
            module.forward = _fused_group_norm_forward.__get__(module)
            changed += 1
    return changed


@dataclass
class LoadedModel:
    unet: torch.nn.Module  # or a backend's stand-in with the same call
    controlnet: torch.nn.Module | None  # None: an image-only model
    decoder: torch.nn.Module
    scheduler: Any  # a MONAI RFlowScheduler or DDPMScheduler
    weight_hashes: dict[str, dict[str, str]]
    networks: dict[str, torch.nn.Module]  # every loaded network by component, the mask generator's included
    scale_factors: dict[str, torch.Tensor]  # component → scale factor, for the diffusion UNets
    backend: dict[str, Any] = field(default_factory=lambda: {"name": "torch"})  # engine/backends.py's record

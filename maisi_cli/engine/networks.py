"""Build MAISI networks and schedulers from a model spec, with MONAI's own classes only.

The spec's `_target_` strings are matched against an allow-list (never imported by name from data), and `@key`
values are looked up among the spec's top-level constants, as MONAI's ConfigParser would, without evaluating code.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

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
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    for module in autoencoder.modules():
        if isinstance(module, MaisiConvolution):
            module.num_splits = splits

"""TensorRT through MONAI's `trt_compile`, with engines cached per input shape.

The reference (reference-training-fid-trt.md §8) patches the networks with `trt_compile` and keeps one static
engine beside each checkpoint, built for the first call's shapes: another output size then fails. Here every
compiled component dispatches on its inputs' shapes: the engine for a shape lives under
MAISI_HOME/trt/<component>-<key>.plan, key = sha256 of (weights sha256, component, input shapes, precision,
TensorRT version), so a new size builds (once) a new engine, and new weights or a new TensorRT never reuse a stale one.

The reference's module choices: the ControlNet whole (export_args dynamo False, report True; output_lists
[[-1], []]), the diffusion UNet whole, only the `decoder` submodule of both autoencoders, the mask DDPM UNet whole;
precision fp16, builder_optimization_level 5, precision_constraints obey (trt_compile's defaults).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from maisi_cli.config import maisi_home
from maisi_cli.engine.decode import LatentDecoder
from maisi_cli.engine.export import condition_examples, load_sources, unet_condition_names, unet_residual_shapes
from maisi_cli.engine.graph_parts import NETWORK_OF, SCALE_OF, export_latent_shape, require_tensorrt, tensorrt_version
from maisi_cli.engine.sampling import autocast_for

# trt_compile arguments per component, as the reference's configs/config_trt.json.
REFERENCE_ARGS: dict[str, dict[str, Any]] = {
    "controlnet": {"export_args": {"dynamo": False, "report": True}, "output_lists": [[-1], []]},
    "unet": {},
    "vae-decoder": {},
    "mask-unet": {},
    "mask-decoder": {},
}
# Which module of the loaded network is compiled (None: the whole network).
SUBMODULE = {"controlnet": None, "unet": None, "vae-decoder": "decoder", "mask-unet": None, "mask-decoder": "decoder"}


def shapes_of(value: Any) -> Any:
    """Shapes of the tensors in a call's arguments (nested lists kept), None for anything else."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [int(s) for s in value.shape]
    if isinstance(value, (list, tuple)):
        return [shapes_of(v) for v in value]
    return None


def engine_key(weights_sha256: str, component: str, input_shapes: dict[str, Any], precision: str,
               trt_version: str) -> str:
    """The engine cache key: sha256 of the weights' sha256, the component, every input's shape, the precision and
    the TensorRT version. Inputs that are not tensors (None) do not count."""
    document = {
        "weights_sha256": weights_sha256,
        "component": component,
        "input_shapes": {name: shape for name, shape in sorted(input_shapes.items()) if shape is not None},
        "precision": precision,
        "tensorrt": trt_version,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def engine_root() -> Path:
    return maisi_home() / "trt"


def call_shapes(module: Any, argv: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    names = [p for p in inspect.signature(module.forward).parameters]
    shapes = {names[i] if i < len(names) else f"arg{i}": shapes_of(v) for i, v in enumerate(argv)}
    shapes |= {name: shapes_of(v) for name, v in kwargs.items()}
    return shapes


class ShapeCachedTrt(torch.nn.Module):
    """Runs `inner` through one MONAI TrtCompiler per input-shape key (built on first use, then loaded from
    MAISI_HOME/trt). A module, so it can replace a submodule (the autoencoder's decoder) in place."""

    def __init__(self, inner: Any, component: str, weights_sha256: str, precision: str = "fp16",
                 args: dict[str, Any] | None = None, trt_version: str | None = None):
        super().__init__()
        self.inner = inner
        self.component = component
        self.weights_sha256 = weights_sha256
        self.precision = precision
        self.args = dict(args or {})
        self.trt_version = trt_version or tensorrt_version() or "none"
        self._compilers: dict[str, Any] = {}
        self.engines: dict[str, str] = {}  # key → plan path, for the run's record

    def compiler_for(self, key: str, shapes: dict[str, Any]) -> Any:
        # MONAI's TensorRT compiler works only with the maisi[trt] extra (tensorrt, polygraphy): imported on first use
        from monai.networks.trt_compiler import TrtCompiler

        if key not in self._compilers:
            root = engine_root()
            root.mkdir(parents=True, exist_ok=True)
            plan = root / f"{self.component}-{key[:32]}.plan"
            (root / f"{self.component}-{key[:32]}.json").write_text(json.dumps(
                {"component": self.component, "weights_sha256": self.weights_sha256, "input_shapes": shapes,
                 "precision": self.precision, "tensorrt": self.trt_version}, indent=2))
            arguments = {"method": "onnx", "precision": self.precision,
                         "build_args": {"builder_optimization_level": 5, "precision_constraints": "obey"}}
            arguments |= self.args
            self._compilers[key] = TrtCompiler(self.inner, str(plan), **arguments)
            self.engines[key] = str(plan)
        return self._compilers[key]

    def forward(self, *argv, **kwargs):
        shapes = call_shapes(self.inner, argv, kwargs)
        key = engine_key(self.weights_sha256, self.component, shapes, self.precision, self.trt_version)
        return self.compiler_for(key, shapes).forward(self.inner, argv, kwargs)


def compile_component(network: Any, component: str, weights_sha256: str, precision: str = "fp16") -> Any:
    """`network` with the reference's module (the whole network or its `decoder`) running through TensorRT; the
    network object itself is returned for a whole-network component wrapped, for an autoencoder patched."""
    submodule = SUBMODULE[component]
    args = REFERENCE_ARGS[component]
    if submodule is None:
        return ShapeCachedTrt(network, component, weights_sha256, precision, args)
    setattr(network, submodule, ShapeCachedTrt(getattr(network, submodule), component, weights_sha256, precision,
                                                args))
    return network


def build_engines(spec: Any, components: tuple[str, ...], weights_dir: Path | None, size: tuple[int, int, int],
                  precision: str = "fp16", device: str = "cuda") -> dict[str, list[str]]:
    """`maisi export trt`: compile `components` and call each once at `size`'s shapes, so their engines are built
    (or found) under MAISI_HOME/trt. Returns {component: [plan paths]}."""
    require_tensorrt("maisi export trt", device)
    networks, scales, weights = load_sources(spec, components, weights_dir, device, precision)
    target = torch.device(device)
    built: dict[str, list[str]] = {}
    for component in components:
        name = NETWORK_OF[component]
        network = networks[name]
        latent = export_latent_shape(spec, component, size)
        x = torch.randn((1, *latent), device=target)
        t = torch.tensor([500.0], device=target)
        with torch.inference_mode(), autocast_for(target, precision):
            if component == "unet":
                conditions = {k: v.to(target) for k, v in condition_examples(
                    [n for n in ("class_labels", "spacing_tensor", "top_region_index_tensor",
                                 "bottom_region_index_tensor") if _unet_takes(network, n)],
                    torch.Generator().manual_seed(0)).items()}
                mid, down = unet_residual_shapes(network, {"x": x, "timesteps": t, **conditions})
                compiled = compile_component(network, component, weights[name]["sha256"], precision)
                compiled(x=x, timesteps=t, down_block_additional_residuals=[torch.zeros(s, device=target)
                                                                            for s in down],
                         mid_block_additional_residual=torch.zeros(mid, device=target), **conditions)
            elif component == "controlnet":
                channels = int(spec.definition("controlnet").get("conditioning_embedding_in_channels", 8))
                cond = torch.zeros((1, channels, *(s * int(spec.vae_downsample) for s in latent[1:])), device=target)
                compiled = compile_component(network, component, weights[name]["sha256"], precision)
                extra = {"class_labels": torch.tensor([1], device=target)} \
                    if getattr(network, "num_class_embeds", None) is not None else {}
                compiled(x=x, timesteps=t, controlnet_cond=cond, **extra)
            elif component == "mask-unet":
                compiled = compile_component(network, component, weights[name]["sha256"], precision)
                compiled(x=x, timesteps=t, context=torch.zeros((1, 1, 10), device=target))
            else:
                compiled = compile_component(network, component, weights[name]["sha256"], precision)
                LatentDecoder(compiled, scales[SCALE_OF[component]]).to(target)(x)
        wrapper = compiled if isinstance(compiled, ShapeCachedTrt) else getattr(compiled, SUBMODULE[component])
        built[component] = sorted(wrapper.engines.values())
    return built


def _unet_takes(unet: Any, name: str) -> bool:
    return name in unet_condition_names(unet)

"""Inference backends for `maisi generate --backend torch|onnx|trt`.

Each backend hands the unchanged denoising loop (engine/sampling.denoise), mask loop and decoder (engine/decode)
objects with the same call signatures as the PyTorch networks, so the loop is not forked:
- onnx: onnxruntime sessions over graphs exported by engine/export.py, from `--onnx-dir DIR` (a `maisi export
  onnx` folder, checked against the weights' sha256) or from MAISI_HOME/onnx, exported there on first use;
- trt: MONAI's `trt_compile` per component, engines cached per input shape (engine/trt.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maisi_cli.config import maisi_home
from maisi_cli.engine.decode import LatentDecoder
from maisi_cli.engine.export import (component_entry, component_key, export_component, manifest_header, run_session,
                                     session_for)
from maisi_cli.engine.graph_parts import (DEFAULT_OPSET, NETWORK_OF, PARTS, SCALE_OF, SOURCES, export_latent_shape,
                                          read_manifest, require_onnx, require_tensorrt, write_manifest)
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.store import model_reference
from maisi_cli.engine.trt import compile_component
from maisi_cli.errors import UsageError

BACKENDS = ("torch", "onnx", "trt")


def check_backend(backend: str, device: str, precision: str | None, onnx_dir: Path | None = None,
                  spec: Any = None) -> None:
    """Refuse what a backend cannot run, before anything is loaded."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend: '{backend}' is not a backend; use torch, onnx or trt")
    if backend == "onnx":
        require_onnx("--backend onnx")
        if precision not in (None, "fp32"):
            raise UsageError(f"--backend onnx: the exported graphs are fp32; drop --precision {precision} or use "
                             "--precision fp32")
        if onnx_dir is not None and read_manifest(onnx_dir) is None:
            raise UsageError(f"--onnx-dir: {onnx_dir} holds no readable manifest.json; export the graphs with: "
                             f"{export_command(spec, 'all', onnx_dir)}")
    if backend == "trt":
        require_tensorrt("--backend trt", device)


# --- onnxruntime stand-ins for the PyTorch networks --------------------------------------------------------------
class OnnxGraph:
    """One onnxruntime session: torch tensors in (by input name), torch float tensors out on `device`."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = path
        self.session = session_for(path, device)
        self.input_names = [node.name for node in self.session.get_inputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __call__(self, inputs: dict[str, Any], device: Any) -> list[Any]:
        missing = [name for name in self.input_names if inputs.get(name) is None]
        if missing:
            raise ValueError(f"{self.path.name}: inputs {', '.join(missing)} are missing")
        return [torch.from_numpy(array).to(device) for array in run_session(self.session, inputs)]


class OnnxUNet:
    """Called as the loop calls DiffusionModelUNetMaisi / DiffusionModelUNet."""

    def __init__(self, graph: OnnxGraph):
        self.graph = graph

    def __call__(self, x, timesteps, down_block_additional_residuals=None, mid_block_additional_residual=None,
                 **conditions):
        inputs = {"x": x, "timesteps": timesteps, **conditions}
        if mid_block_additional_residual is not None:
            inputs["mid"] = mid_block_additional_residual
        for i, residual in enumerate(down_block_additional_residuals or []):
            inputs[f"down_{i}"] = residual
        return self.graph(inputs, x.device)[0].to(x.dtype)


class OnnxEmbedding:
    def __init__(self, graph: OnnxGraph):
        self.graph = graph

    def __call__(self, controlnet_cond):
        return self.graph({"controlnet_cond": controlnet_cond}, controlnet_cond.device)[0]


class OnnxControlNet:
    """Called as the loop calls ControlNetMaisi. `controlnet_cond_embedding` is an attribute, as in MONAI, so the
    loop's `condition_embedded_once` caches the embedded condition per sample and the step graph takes it."""

    def __init__(self, embedding: OnnxGraph, step: OnnxGraph):
        self.controlnet_cond_embedding = OnnxEmbedding(embedding)
        self.step = step

    def __call__(self, x, timesteps, controlnet_cond, conditioning_scale: float = 1.0, class_labels=None):
        embedded = self.controlnet_cond_embedding(controlnet_cond)
        outputs = self.step({"x": x, "timesteps": timesteps, "condition": embedded, "class_labels": class_labels},
                            x.device)
        outputs = [o.to(x.dtype) * conditioning_scale if conditioning_scale != 1.0 else o.to(x.dtype)
                   for o in outputs]
        return outputs[1:], outputs[0]


class OnnxDecoder:
    """Stands in for engine/decode.LatentDecoder: latents (scaled space) → decoder output."""

    def __init__(self, graph: OnnxGraph):
        self.graph = graph

    def __call__(self, z):
        return self.graph({"z": z}, z.device)[0]


# --- locating or exporting the graphs ----------------------------------------------------------------------------
def export_command(spec: Any, component: str, folder: Path) -> str:
    return f"maisi export onnx --model {model_reference(spec)} --component {component} --out {folder}"


def graphs_from_folder(folder: Path, component: str, weights: dict[str, dict[str, str]], spec: Any) -> dict[str, Path]:
    """{part: path} of `component` in a `maisi export onnx` folder, after checking its source weights' sha256."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise UsageError(f"--onnx-dir: {folder} holds no readable manifest.json; export the graphs with: "
                         f"{export_command(spec, 'all', folder)}")
    entry = manifest["components"].get(component)
    if not isinstance(entry, dict):
        raise UsageError(f"--onnx-dir: {folder} has no {component} graph; export it with: "
                         f"{export_command(spec, component, folder)}")
    for name in SOURCES[component]:
        recorded = (entry.get("weights") or {}).get(name, {}).get("sha256")
        if recorded != weights[name]["sha256"]:
            raise UsageError(f"--onnx-dir: the {component} graph in {folder} was exported from other {name} weights "
                             f"(sha256 {str(recorded)[:12]}…, these are {weights[name]['sha256'][:12]}…); "
                             f"export it again with: {export_command(spec, component, folder)}")
    paths = {}
    for part in PARTS[component]:
        path = folder / f"{part}.onnx"
        if not path.is_file():
            raise UsageError(f"--onnx-dir: {path} is missing; export it again with: "
                             f"{export_command(spec, component, folder)}")
        paths[part] = path
    return paths


def cache_root() -> Path:
    return maisi_home() / "onnx"


def cached_graphs(component: str, networks: dict[str, Any], scale_factors: dict[str, Any],
                  weights: dict[str, dict[str, str]], spec: Any,
                  on_export: ProgressCallback = no_progress) -> dict[str, Path]:
    """{part: path} under MAISI_HOME/onnx/<component>-<key>, exported there first when missing."""
    key = component_key(component, {name: w["sha256"] for name, w in weights.items()}, spec)
    folder = cache_root() / f"{component}-{key[:24]}"
    manifest = read_manifest(folder)
    paths = {part: folder / f"{part}.onnx" for part in PARTS[component]}
    entry = (manifest or {}).get("components", {}).get(component) or {}
    if entry.get("key") == key and all(p.is_file() for p in paths.values()):
        return paths
    on_export(ProgressEvent("export", 0, 1, subject=f"onnx {component}"))
    scale = scale_factors.get(SCALE_OF.get(component, ""))
    latent = export_latent_shape(spec, component)
    exported = export_component(component, networks, scale, latent, spec, folder)
    document = manifest_header(spec, DEFAULT_OPSET)
    document["components"][component] = component_entry(component, weights, key, exported, scale)
    write_manifest(folder, document)
    on_export(ProgressEvent("export", 1, 1, subject=f"onnx {component}"))
    return paths


def onnx_networks(spec: Any, networks: dict[str, Any], scale_factors: dict[str, Any],
                  weights: dict[str, dict[str, str]], device: str, onnx_dir: Path | None = None,
                  on_export: ProgressCallback = no_progress) -> tuple[dict[str, Any], dict[str, Any]]:
    """({component: onnxruntime stand-in}, backend record for the sidecar) for the loaded networks."""
    components = [c for c in ("controlnet", "unet", "vae-decoder", "mask-unet", "mask-decoder")
                  if all(name in networks for name in SOURCES[c])]
    stand_ins: dict[str, Any] = {}
    files: dict[str, str] = {}
    providers: list[str] = []
    for component in components:
        if onnx_dir is not None:
            paths = graphs_from_folder(onnx_dir, component, weights, spec)
        else:
            paths = cached_graphs(component, networks, scale_factors, weights, spec, on_export)
        graphs = {part: OnnxGraph(path, device) for part, path in paths.items()}
        files |= {part: str(path) for part, path in paths.items()}
        providers = next(iter(graphs.values())).providers
        if component == "controlnet":
            stand_ins[component] = OnnxControlNet(graphs["controlnet_embedding"], graphs["controlnet"])
        elif component in ("unet", "mask-unet"):
            stand_ins[component] = OnnxUNet(next(iter(graphs.values())))
        else:
            stand_ins[component] = OnnxDecoder(next(iter(graphs.values())))
    return stand_ins, {"name": "onnx", "providers": providers, "files": files}


# --- swapping the loaded networks --------------------------------------------------------------------------------
def network_device(backend: str, device: str) -> str:
    """Where the PyTorch networks are loaded: the CPU for onnx (they are only exported, once), else the run's."""
    return "cpu" if backend == "onnx" else device


def apply_backend(backend: str, spec: Any, networks: dict[str, Any], scale_factors: dict[str, Any],
                  weights: dict[str, dict[str, str]], device: str, precision: str, onnx_dir: Path | None = None,
                  on_export: ProgressCallback = no_progress) -> tuple[dict[str, Any], dict[str, Any]]:
    """({component: what the loops call instead of the PyTorch network}, the backend's record for the sidecar).
    Components: unet, controlnet, vae-decoder and, with a mask generator, mask-unet and mask-decoder."""
    if backend == "onnx":
        return onnx_networks(spec, networks, scale_factors, weights, device, onnx_dir, on_export)
    if backend == "trt":
        version = require_tensorrt("--backend trt", device)
        compiled: dict[str, Any] = {}
        for component in ("controlnet", "unet", "vae-decoder", "mask-unet", "mask-decoder"):
            name = NETWORK_OF[component]
            if name not in networks:
                continue
            network = compile_component(networks[name], component, weights[name]["sha256"], precision)
            if component.endswith("decoder"):
                network = LatentDecoder(network, scale_factors[SCALE_OF[component]]).to(device)
            compiled[component] = network
        return compiled, {"name": "trt", "tensorrt": version, "precision": precision}
    return {}, {"name": "torch"}

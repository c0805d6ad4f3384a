"""ONNX export of the MAISI networks: graph wrappers with plain tensor inputs, the export itself (torch's dynamo
exporter, opset 18, dynamic spatial axes; the TorchScript exporter for the VAE decoders, see GraphSpec.exporter), a
check against PyTorch, and the manifest entries of a folder of exported graphs (engine/graph_parts.py reads and
writes the manifest; the names of components, parts and their weight files are there too).

Components and their graphs ("parts"):
- unet: (x, timesteps, [class_labels], [spacing_tensor], [top/bottom_region_index_tensor], mid, down_0..down_k) → out;
  the ControlNet residuals are inputs, as the denoising loop passes them.
- controlnet: two graphs, because the loop embeds the condition once per sample and runs the rest per step
  (sampling.condition_embedded_once): `controlnet_embedding` (8 bit planes at image resolution → embedded
  condition at latent resolution) and `controlnet` (x, timesteps, embedded condition, [class_labels]) → (mid, down_*).
- vae-decoder / mask-decoder: latents → decoder output, `decode(z / scale_factor)` as engine/decode.LatentDecoder,
  with the diffusion model's scale factor baked in (so its checkpoint is a source of the graph too).
- mask-unet: the mask DDPM UNet, (x, timesteps, context) → out.

onnx, onnxruntime and torch.export are imported where they are used: onnx and onnxruntime are an optional extra
(maisi[onnx]), and torch.export is slow to import and needed only to export.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi_cli._version import __version__
from maisi_cli.engine.decode import LatentDecoder
from maisi_cli.engine.graph_parts import (COMPONENTS, DEFAULT_OPSET, NETWORK_OF, SCALE_OF, SOURCES, export_latent_shape,
                                          read_manifest, require_onnx, tensorrt_version, write_manifest)
from maisi_cli.engine.networks import build_network, resolve_definition, set_tp_splits
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.store import hash_file
from maisi_cli.engine.weights import built_and_read, load_verified, locate_weight
from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.io.files import check_replaceable, writable_folder, write_error

SPATIAL = (2, 3, 4)
# onnxruntime CPU vs PyTorch fp32 on random inputs: measured ≤ 2e-5 on the tiny and full-size networks (max |diff|
# of outputs of order 1); an export whose difference exceeds this is refused.
EXPORT_TOLERANCE = 1e-3


class ExportError(MaisiError):
    """A network could not be exported, or its graph does not match PyTorch."""


# --- graph wrappers ----------------------------------------------------------------------------------------------
def unet_condition_names(unet: Any) -> list[str]:
    """The UNet's optional inputs, in graph order, as the loop passes them (samples.condition_inputs)."""
    names = []
    if getattr(unet, "num_class_embeds", None) is not None:
        names.append("class_labels")
    if getattr(unet, "include_spacing_input", False):
        names.append("spacing_tensor")
    if getattr(unet, "include_top_region_index_input", False):
        names.append("top_region_index_tensor")
    if getattr(unet, "include_bottom_region_index_input", False):
        names.append("bottom_region_index_tensor")
    return names


class UNetGraph(torch.nn.Module):
    """(x, timesteps, *conditions, mid, *down) → noise/velocity prediction."""

    def __init__(self, unet: Any, condition_names: list[str], residuals: int):
        super().__init__()
        self.unet = unet
        self.condition_names = list(condition_names)
        self.residuals = residuals

    def forward(self, x, timesteps, *rest):
        count = len(self.condition_names)
        conditions = dict(zip(self.condition_names, rest[:count]))
        extra = {}
        if self.residuals:
            mid, down = rest[count], list(rest[count + 1:])
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x=x, timesteps=timesteps, **conditions, **extra)


def controlnet_step_module(controlnet: Any) -> Any:
    """A shallow copy of the ControlNet whose condition embedding is the identity: it takes the embedded condition,
    as the loop's ControlNet does once `condition_embedded_once` has cached it. The weights are shared."""
    step = copy.copy(controlnet)
    step._modules = dict(controlnet._modules)
    step._modules["controlnet_cond_embedding"] = torch.nn.Identity()
    step.use_checkpointing = False
    return step


class ControlNetGraph(torch.nn.Module):
    """(x, timesteps, embedded condition, [class_labels]) → (mid, *down)."""

    def __init__(self, controlnet: Any, class_labels: bool):
        super().__init__()
        self.controlnet = controlnet_step_module(controlnet)
        self.class_labels = class_labels

    def forward(self, x, timesteps, condition, *rest):
        extra = {"class_labels": rest[0]} if self.class_labels else {}
        down, mid = self.controlnet(x=x, timesteps=timesteps, controlnet_cond=condition, **extra)
        return (mid, *down)


class ControlNetEmbeddingGraph(torch.nn.Module):
    def __init__(self, controlnet: Any):
        super().__init__()
        self.embedding = controlnet.controlnet_cond_embedding

    def forward(self, controlnet_cond):
        return self.embedding(controlnet_cond)


class MaskUNetGraph(torch.nn.Module):
    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, context):
        return self.unet(x=x, timesteps=timesteps, context=context)


# --- example inputs ----------------------------------------------------------------------------------------------
@dataclass
class GraphSpec:
    """One graph to export: its module, example inputs (names → tensors), output names, dynamic input axes."""

    part: str
    module: Any
    inputs: dict[str, Any]
    outputs: list[str]
    dynamic: dict[str, tuple[int, ...]]
    # "legacy" (TorchScript) for the VAE decoders: the dynamo exporter traces their per-group GroupNorm loops for
    # minutes at full size (292 s vs about 20 s, bench/onnx_cpu.py); the dynamo exporter is the fallback.
    exporter: str = "dynamo"


def _generator(seed: int):
    return torch.Generator().manual_seed(seed)


def unet_residual_shapes(unet: Any, inputs: dict[str, Any]) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """(mid shape, [down shapes]) of the ControlNet residuals the UNet takes at this input size: the shapes of its own
    down-block outputs and middle block, from one forward pass."""
    captured: dict[str, Any] = {}
    original = unet._apply_down_blocks

    def spy(h, emb, context, residuals):
        h, samples = original(h, emb, context, residuals)
        captured["down"] = [tuple(s.shape) for s in samples]
        return h, samples

    hook = unet.middle_block.register_forward_hook(lambda m, a, out: captured.__setitem__("mid", tuple(out.shape)))
    unet._apply_down_blocks = spy
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        del unet._apply_down_blocks
        hook.remove()
    return captured["mid"], captured["down"]


def condition_examples(names: list[str], generator: Any) -> dict[str, Any]:
    values = {}
    for name in names:
        if name == "class_labels":
            values[name] = torch.tensor([1], dtype=torch.long)
        elif name == "spacing_tensor":
            values[name] = torch.tensor([[150.0, 150.0, 150.0]]) + torch.rand((1, 3), generator=generator) * 100
        else:  # body-region one-hot ×100
            values[name] = torch.zeros((1, 4))
            values[name][0, int(torch.randint(0, 4, (1,), generator=generator))] = 100.0
    return values


def graph_specs(component: str, networks: dict[str, Any], scale_factor: Any, latent_shape: tuple[int, ...],
                spec: Any, seed: int = 0) -> list[GraphSpec]:
    """The graphs of one component with random example inputs at `latent_shape` (C, x, y, z)."""
    generator = _generator(seed)
    x = torch.randn((1, *latent_shape), generator=generator)
    t = torch.tensor([412.0])
    spatial = {"x": SPATIAL}
    if component == "unet":
        unet = networks["diffusion_unet"]
        names = unet_condition_names(unet)
        conditions = condition_examples(names, generator)
        mid_shape, down_shapes = unet_residual_shapes(unet, {"x": x, "timesteps": t, **conditions})
        residuals = {"mid": torch.randn(mid_shape, generator=generator) * 0.1}
        residuals |= {f"down_{i}": torch.randn(s, generator=generator) * 0.1 for i, s in enumerate(down_shapes)}
        inputs = {"x": x, "timesteps": t, **conditions, **residuals}
        dynamic = spatial | {name: SPATIAL for name in residuals}
        return [GraphSpec("unet", UNetGraph(unet, names, len(down_shapes)), inputs, ["out"], dynamic)]
    if component == "controlnet":
        controlnet = networks["controlnet"]
        embedding = ControlNetEmbeddingGraph(controlnet)
        channels = controlnet.controlnet_cond_embedding.conv_in.conv.in_channels \
            if hasattr(controlnet.controlnet_cond_embedding.conv_in, "conv") \
            else controlnet.controlnet_cond_embedding.conv_in.in_channels
        factor = int(spec.vae_downsample)
        cond = (torch.rand((1, channels, *(s * factor for s in latent_shape[1:])), generator=generator) > 0.5).float()
        with torch.no_grad():
            embedded = embedding(cond)
        has_class = getattr(controlnet, "num_class_embeds", None) is not None
        inputs = {"x": x, "timesteps": t, "condition": embedded}
        if has_class:
            inputs["class_labels"] = torch.tensor([1], dtype=torch.long)
        graph = ControlNetGraph(controlnet, has_class)
        with torch.no_grad():
            outputs = graph(*inputs.values())
        names = ["mid"] + [f"down_{i}" for i in range(len(outputs) - 1)]
        return [
            GraphSpec("controlnet_embedding", embedding, {"controlnet_cond": cond}, ["condition"],
                      {"controlnet_cond": SPATIAL}),
            GraphSpec("controlnet", graph, inputs, names, spatial | {"condition": SPATIAL}),
        ]
    if component in ("vae-decoder", "mask-decoder"):
        autoencoder = networks[NETWORK_OF[component]]
        set_tp_splits(autoencoder, 1)  # tensor-parallel splitting only saves memory; the graph does it whole
        decoder = LatentDecoder(autoencoder, scale_factor).eval()
        return [GraphSpec(component.replace("-", "_"), decoder, {"z": x}, ["image" if component == "vae-decoder"
                                                                           else "logits"], {"z": SPATIAL},
                          exporter="legacy")]
    if component == "mask-unet":
        _, kwargs = resolve_definition(spec.network, spec.definition("mask_generation_diffusion"))
        context = torch.rand((1, 1, int(kwargs.get("cross_attention_dim") or 10)), generator=generator)
        return [GraphSpec("mask_unet", MaskUNetGraph(networks["mask_generation_diffusion"]),
                          {"x": x, "timesteps": torch.tensor([733.0]), "context": context}, ["out"], spatial)]
    raise UsageError(f"--component: '{component}' is not a component; use {', '.join(COMPONENTS)} or all")


# --- export and check --------------------------------------------------------------------------------------------
def _dynamic_shapes(graph: GraphSpec) -> tuple:
    """dynamo's `dynamic_shapes` for a forward(x, timesteps, *rest): varargs grouped into one tuple."""
    from torch.export import Dim  # slow to import, and needed only to export

    def axes(name: str):
        return {axis: Dim.AUTO for axis in graph.dynamic[name]} if name in graph.dynamic else None

    names = list(graph.inputs)
    parameters = [p for p in inspect.signature(graph.module.forward).parameters.values()]
    fixed = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    shapes = [axes(name) for name in names[:len(fixed)]]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        shapes.append(tuple(axes(name) for name in names[len(fixed):]))
    return tuple(shapes)


@contextlib.contextmanager
def quiet_export():
    """The dynamo exporter prints progress lines on stdout and warns; a CLI's stdout must stay clean."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(graph: GraphSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write `graph` as ONNX at `path` (weights inside the file when they fit 2 GB, else beside it as
    `<name>.data`)."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in graph.module.parameters())
    if graph.exporter == "legacy":
        try:
            with torch.no_grad(), quiet_export():
                torch.onnx.export(graph.module, tuple(graph.inputs.values()), str(path), dynamo=False,
                                  opset_version=opset, input_names=list(graph.inputs), output_names=graph.outputs,
                                  dynamic_axes={name: {axis: f"{name}_{axis}" for axis in axes}
                                                for name, axes in graph.dynamic.items()})
            return
        except Exception:  # the TorchScript exporter is deprecated: fall back to dynamo
            path.unlink(missing_ok=True)
    try:
        with torch.no_grad(), quiet_export():
            program = torch.onnx.export(
                graph.module, tuple(graph.inputs.values()), dynamo=True, opset_version=opset,
                input_names=list(graph.inputs), output_names=graph.outputs,
                dynamic_shapes=_dynamic_shapes(graph), external_data=False, verbose=False,
            )
            program.save(str(path), external_data=parameter_bytes > 1.8e9)
    except Exception as error:  # the exporter raises many types; one line names the graph
        text = str(error).strip().splitlines()
        raise ExportError(f"export: the {graph.part} graph could not be exported to ONNX "
                          f"({type(error).__name__}: {text[0][:200] if text else ''})") from error


def onnx_providers(device: str = "cpu") -> list[str]:
    """onnxruntime execution providers: TensorRT and CUDA first when onnxruntime-gpu sees a GPU and the run is on
    one, the CPU provider always (onnxruntime falls back to it silently; the session reports what it used)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = []
    if device.startswith("cuda"):
        if "TensorrtExecutionProvider" in available and tensorrt_version() is not None:
            chosen.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" in available:
            chosen.append("CUDAExecutionProvider")
    return chosen + ["CPUExecutionProvider"]


def session_for(path: Path, device: str = "cpu") -> Any:
    import onnxruntime as ort  # the optional extra maisi[onnx], as in every onnx/onnxruntime import here

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle worker threads sleep instead of spinning: on a shared CPU spinning steals the cores from everyone else.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=onnx_providers(device))


def run_session(session: Any, inputs: dict[str, Any]) -> list[Any]:
    """Run with torch tensors in, numpy arrays out (inputs cast to the graph's own dtypes)."""
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16,
              "tensor(int32)": np.int32}
    feeds = {}
    for node in session.get_inputs():
        value = inputs[node.name]
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        feeds[node.name] = np.ascontiguousarray(array.astype(dtypes.get(node.type, array.dtype), copy=False))
    return session.run(None, feeds)


def max_abs_difference(graph: GraphSpec, path: Path) -> float:
    """max |onnxruntime CPU − PyTorch| over every output, on the graph's example inputs."""
    with torch.no_grad():
        expected = graph.module(*graph.inputs.values())
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    got = run_session(session_for(path), graph.inputs)
    if len(got) != len(expected):
        raise ExportError(f"export: the {graph.part} graph gives {len(got)} outputs, PyTorch {len(expected)}")
    return max(float(np.max(np.abs(g - e.float().numpy()))) for g, e in zip(got, expected))


def describe_io(nodes: Any) -> list[dict[str, Any]]:
    """[{name, dtype, shape}] of graph inputs or outputs; a dynamic axis is its symbol's name (a string)."""
    return [{"name": n.name, "dtype": n.type.removeprefix("tensor(").rstrip(")"),
             "shape": [d if isinstance(d, int) else str(d) for d in n.shape]} for n in nodes]


def export_component(component: str, networks: dict[str, Any], scale_factor: Any, latent_shape: tuple[int, ...],
                     spec: Any, folder: Path, opset: int = DEFAULT_OPSET,
                     on_part: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export one component's graphs into `folder` (atomically: a temporary folder renamed file by file) and
    return its manifest entry: files, inputs, outputs, export shapes, max |diff| against PyTorch."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".export-{component}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    parts = []
    try:
        for graph in graph_specs(component, networks, scale_factor, latent_shape, spec):
            if on_part is not None:
                on_part(graph.part)
            start = time.perf_counter()
            path = staging / f"{graph.part}.onnx"
            export_graph(graph, path, opset)
            seconds = time.perf_counter() - start
            difference = max_abs_difference(graph, path)
            if not difference <= EXPORT_TOLERANCE:
                raise ExportError(f"export: the {graph.part} graph differs from PyTorch by {difference:.3g} "
                                  f"(over {EXPORT_TOLERANCE:g}); it was not kept")
            session = session_for(path)
            parts.append({
                "part": graph.part, "file": path.name,
                "inputs": describe_io(session.get_inputs()), "outputs": describe_io(session.get_outputs()),
                "export_shapes": {k: list(v.shape) for k, v in graph.inputs.items()},
                "dynamic_axes": {k: list(v) for k, v in graph.dynamic.items()},
                "max_abs_diff": difference, "export_seconds": round(seconds, 2),
                "file_sha256": hash_file(path), "bytes": _size_with_data(path),
            })
        for item in sorted(staging.iterdir()):
            check_replaceable(folder / item.name)
            os.replace(item, folder / item.name)
    except OSError as error:  # a full disk or a folder gone read-only while exporting: one line
        raise write_error(error, folder) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"parts": parts, "latent_shape": list(latent_shape)}


def _size_with_data(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# --- keys, manifests and the cache -------------------------------------------------------------------------------
def component_key(component: str, weights_sha256: dict[str, str], spec: Any, opset: int = DEFAULT_OPSET) -> str:
    """What an exported graph depends on: the source weights' sha256, the component, the network definition, the
    opset, maisi's and torch's versions and the dynamic axes. The ONNX cache is keyed by its sha256."""
    document = {
        "component": component,
        "weights": {name: weights_sha256[name] for name in SOURCES[component]},
        "definition": spec.definition(NETWORK_OF[component]),
        "opset": opset,
        "maisi": __version__,
        "torch": torch.__version__.split("+")[0],
        "dynamic_axes": list(SPATIAL),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def manifest_header(spec: Any, opset: int) -> dict[str, Any]:
    import onnx
    import onnxruntime

    return {"format": "maisi-onnx/1", "maisi_version": __version__, "model": spec.name,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "opset": opset,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "tolerance": EXPORT_TOLERANCE, "components": {}}


def component_entry(component: str, weights: dict[str, Any], key: str, exported: dict[str, Any],
                    scale_factor: Any) -> dict[str, Any]:
    """`weights`: weight component → {"file", "sha256"}."""
    entry = {"key": key, "weights": {name: {"file": weights[name]["file"], "sha256": weights[name]["sha256"]}
                                     for name in SOURCES[component]}, **exported}
    if scale_factor is not None:
        entry["scale_factor"] = float(scale_factor)
    return entry


# --- `maisi export onnx` -----------------------------------------------------------------------------------------
def load_sources(spec: Any, components: tuple[str, ...], weights_dir: Path | None, device: str = "cpu",
                 precision: str = "fp32") -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, str]]]:
    """(networks, scale factors, {weight component: {"file", "sha256"}}) of the weight files `components` need,
    hashed (against the lock) and loaded with torch.load(weights_only=True)."""
    names = list(dict.fromkeys(name for component in components for name in SOURCES[component]))
    networks, scales, weights = {}, {}, {}
    for name in names:
        weight = locate_weight(spec, name, weights_dir)
        network, read = built_and_read(lambda name=name: build_network(spec, name, device, precision), weight)
        loaded = load_verified(network, weight, spec, read)  # the sha256 of the bytes loaded, not of an earlier read
        weights[name] = {"file": weight.repo_name, "sha256": loaded.sha256}
        if "scale_factor" in loaded.extras:
            scales[name] = loaded.extras["scale_factor"]
        networks[name] = network.to(device)
    return networks, scales, weights


def check_opset(opset: int) -> None:
    import onnx.defs

    newest = int(onnx.defs.onnx_opset_version())
    if not DEFAULT_OPSET <= opset <= newest:
        raise UsageError(f"--opset: {opset} is not supported; the dynamo exporter writes opset {DEFAULT_OPSET} to "
                         f"{newest}")


def export_onnx(spec: Any, components: tuple[str, ...], out: Path, weights_dir: Path | None = None,
                size: tuple[int, int, int] | None = None, opset: int = DEFAULT_OPSET,
                on_progress: ProgressCallback = no_progress) -> dict[str, Any]:
    """Export `components` of `spec` into `out` and write (or update) its manifest.json; returns the manifest."""
    require_onnx("maisi export onnx")
    check_opset(opset)
    writable_folder(out, "--out")  # before the networks load: a read-only --out fails at once
    networks, scales, weights = load_sources(spec, components, weights_dir)
    previous = read_manifest(out)
    document = manifest_header(spec, opset)
    if previous is not None and previous.get("model") == spec.name:
        document["components"] = dict(previous["components"])  # other components exported before stay listed
    for i, component in enumerate(components):
        on_progress(ProgressEvent("export", i, len(components), subject=component))
        key = component_key(component, {name: w["sha256"] for name, w in weights.items()}, spec, opset)
        scale = scales.get(SCALE_OF.get(component, ""))
        exported = export_component(component, networks, scale, export_latent_shape(spec, component, size), spec,
                                    out, opset)
        document["components"][component] = component_entry(component, weights, key, exported, scale)
        write_manifest(out, document)  # after each component: an interrupted export keeps what is done
        on_progress(ProgressEvent("export", i + 1, len(components), subject=component))
    return document

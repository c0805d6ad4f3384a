"""`maisi export onnx|trt`: the networks as ONNX graphs (with a manifest) or as TensorRT engines in MAISI_HOME.

Kept light: torch, onnx and onnxruntime load only inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

app = typer.Typer(help="Export the networks: ONNX graphs for onnxruntime, TensorRT engines (see --backend of "
                  "`maisi generate`).", no_args_is_help=True)

COMPONENT_HELP = "unet, controlnet, vae-decoder, mask-unet, mask-decoder (comma-separated) or all."


def _size(size: Optional[str]):
    from maisi_cli.config import parse_size

    return parse_size(size) if size else None


@app.command("onnx")
def onnx_command(
    ctx: typer.Context,
    model: str = typer.Option("rflow-ct", "--model", "-m", help="Model name or alias, or a spec .json."),
    component: str = typer.Option("all", "--component", "-c", help=COMPONENT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the .onnx files and manifest.json."),
    size: Optional[str] = typer.Option(None, "--size", help="Image size the graphs are exported and checked at, "
                                       "e.g. 64 or 128x128x64 (default 64³; spatial axes stay dynamic)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 or newer)."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", envvar="MAISI_WEIGHTS_DIR",
                                               help="Folder holding weight files under their repository names."),
    json_flag: bool = typer.Option(False, "--json", help="Print the manifest as one JSON document."),
) -> None:
    """ONNX graphs (dynamo exporter, dynamic spatial axes) and a manifest: inputs, outputs, shapes, the source
    weights' sha256, the opset and the max |difference| against PyTorch measured at export."""
    from maisi_cli.engine.graph_parts import parse_components, require_onnx
    from maisi_cli.models import get_model

    output = render.output_of(ctx.obj, json_flag)
    require_onnx("maisi export onnx")
    spec = get_model(model)
    components = parse_components(component, spec)
    parsed_size = _size(size)
    # torch: only once the options are known good
    from maisi_cli.engine.export import export_onnx

    with render.progress(output) as on_progress:
        manifest = export_onnx(spec, components, out, weights_dir, parsed_size, opset, on_progress)
    if output.json:
        render.print_json(manifest)
        return
    rows = []
    for name in components:
        for part in manifest["components"][name]["parts"]:
            rows.append((name, part["file"], f"{part['bytes'] / 2**20:.1f} MB", f"{part['max_abs_diff']:.2g}",
                         f"{part['export_seconds']:.1f} s"))
    render.print_table(f"maisi export onnx → {out}", ("component", "file", "size", "max |Δ| vs torch", "export"),
                       rows)
    render.info(f"manifest: {out / 'manifest.json'}", output)


@app.command("trt")
def trt_command(
    ctx: typer.Context,
    model: str = typer.Option("rflow-ct", "--model", "-m", help="Model name or alias, or a spec .json."),
    component: str = typer.Option("all", "--component", "-c", help=COMPONENT_HELP),
    size: Optional[str] = typer.Option(None, "--size", help="Image size to build engines for, e.g. 256 or "
                                       "512x512x256 (default: the model's); each size has its own engines."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 (the reference's), bf16, tf32 or fp32."),
    device: str = typer.Option("cuda", "--device", help="cuda or cuda:N."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", envvar="MAISI_WEIGHTS_DIR",
                                               help="Folder holding weight files under their repository names."),
    json_flag: bool = typer.Option(False, "--json", help="Print the engine paths as one JSON document."),
) -> None:
    """TensorRT engines through MONAI's trt_compile (the reference's module choices), cached under
    MAISI_HOME/trt by weights sha256, component, input shapes, precision and TensorRT version."""
    from maisi_cli.errors import UsageError

    output = render.output_of(ctx.obj, json_flag)
    if precision not in ("fp16", "bf16", "tf32", "fp32"):
        raise UsageError(f"--precision: '{precision}' is not a TensorRT precision; use fp16, bf16, tf32 or fp32")
    from maisi_cli.engine.graph_parts import parse_components, require_tensorrt

    require_tensorrt("maisi export trt", device)
    from maisi_cli.models import get_model

    spec = get_model(model)
    components = parse_components(component, spec)
    # torch and MONAI: only once the options are known good
    from maisi_cli.engine.trt import build_engines

    built = build_engines(spec, components, weights_dir, _size(size) or spec.default_size, precision, device)
    if output.json:
        render.print_json({"engines": built})
        return
    render.print_table("maisi export trt", ("component", "engine"),
                       [(name, path) for name, paths in built.items() for path in paths])

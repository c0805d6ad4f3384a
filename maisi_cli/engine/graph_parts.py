"""What the exported graphs are made of, shared by the ONNX export (engine/export.py), the onnxruntime and
TensorRT backends (engine/backends.py) and the TensorRT engines (engine/trt.py), so that the three import it
instead of each other: backends → export, trt; trt → export; all → here.

The components and their weight files and graph files ("parts"), the latent shape they are exported at, the
manifest of a folder of exported graphs, and the one-line errors when an optional extra is missing. No torch, onnx
or tensorrt at import: the CLI checks the extras here before anything heavy loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maisi_cli.errors import UsageError
from maisi_cli.io.files import write_atomic

COMPONENTS = ("unet", "controlnet", "vae-decoder", "mask-unet", "mask-decoder")
# The weight files each component's graphs are made from (the decoders bake in the diffusion UNet's scale factor).
SOURCES = {
    "unet": ("diffusion_unet",),
    "controlnet": ("controlnet",),
    "vae-decoder": ("autoencoder", "diffusion_unet"),
    "mask-unet": ("mask_generation_diffusion",),
    "mask-decoder": ("mask_generation_autoencoder", "mask_generation_diffusion"),
}
NETWORK_OF = {"unet": "diffusion_unet", "controlnet": "controlnet", "vae-decoder": "autoencoder",
              "mask-unet": "mask_generation_diffusion", "mask-decoder": "mask_generation_autoencoder"}
SCALE_OF = {"vae-decoder": "diffusion_unet", "mask-decoder": "mask_generation_diffusion"}
PARTS = {"unet": ("unet",), "controlnet": ("controlnet_embedding", "controlnet"), "vae-decoder": ("vae_decoder",),
         "mask-unet": ("mask_unet",), "mask-decoder": ("mask_decoder",)}
DEFAULT_OPSET = 18
MANIFEST = "manifest.json"
TRT_INSTALL_HINT = "install maisi[trt] on a machine with an NVIDIA GPU"


def image_components(spec: Any) -> tuple[str, ...]:
    """The components of `spec` that can be exported: the image networks, and the mask generator when it has one."""
    names = ["unet", "controlnet", "vae-decoder"]
    if "mask_generation_diffusion_def" in spec.network and "mask_generation_diffusion" in spec.weights:
        names += ["mask-unet", "mask-decoder"]
    return tuple(names)


def parse_components(text: str, spec: Any) -> tuple[str, ...]:
    available = image_components(spec)
    if text == "all":
        return available
    chosen = []
    for name in (p.strip() for p in text.split(",") if p.strip()):
        if name not in COMPONENTS:
            raise UsageError(f"--component: '{name}' is not a component; use {', '.join(COMPONENTS)} or all")
        if name not in available:
            raise UsageError(f"--component: model {spec.name} has no mask generator, so no '{name}'; "
                             f"use {', '.join(available)} or all")
        chosen.append(name)
    if not chosen:
        raise UsageError(f"--component: name one of {', '.join(COMPONENTS)} or all")
    return tuple(dict.fromkeys(chosen))


def export_latent_shape(spec: Any, component: str, size: tuple[int, int, int] | None = None) -> tuple[int, ...]:
    """The latent shape graphs are exported (and checked) at; their spatial axes are dynamic. The image networks:
    the latent of `size` (default 64³); the mask networks: their fixed latent."""
    if component.startswith("mask"):
        return tuple(int(v) for v in spec.network["mask_generation_latent_shape"])
    return tuple(spec.latent_shape(size or (64, 64, 64)))


# --- the manifest of a folder of exported graphs -----------------------------------------------------------------
def write_manifest(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / MANIFEST
    write_atomic(path, (json.dumps(document, indent=2) + "\n").encode())
    return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        document = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) and isinstance(document.get("components"), dict) else None


# --- the optional extras -----------------------------------------------------------------------------------------
def require_onnx(option: str) -> None:
    """A one-line error naming the extra when onnx / onnxruntime / onnxscript are missing."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"{option}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                         "install the extra: pip install 'maisi[onnx]'")


def tensorrt_version() -> str | None:
    try:
        import tensorrt  # an optional extra (maisi[trt]): asked for only here
    except Exception:
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def require_tensorrt(option: str, device: str = "cuda") -> str:
    """TensorRT's version, or a one-line UsageError naming the extra (and the GPU it needs)."""
    version = tensorrt_version()
    if version is None:
        raise UsageError(f"{option}: TensorRT is not installed; {TRT_INSTALL_HINT}")
    try:
        import polygraphy  # noqa: F401  (an optional extra, as tensorrt)
    except Exception:
        raise UsageError(f"{option}: polygraphy is not installed (trt_compile needs it); {TRT_INSTALL_HINT}") from None
    import torch  # only once TensorRT is there: the missing-extra error comes before torch loads

    if not torch.cuda.is_available():
        raise UsageError(f"{option}: TensorRT needs an NVIDIA GPU and this machine has none; use --backend torch "
                         "or --backend onnx")
    if not str(device).startswith("cuda"):
        raise UsageError(f"{option}: TensorRT runs on the GPU; use --device cuda (or auto)")
    return version

"""CT volumes → VAE latents for diffusion training (reference-training-fid-trt.md §2).

Per image: load → channel first → RAS → CT window −1000..1000 HU → [0, 1] (clipped) → resize (trilinear) so each
axis is the nearest multiple of the model's size multiple → `encode_stage_2_inputs` (a sample z = μ + σ·ε, as the
reference) or μ with `mean=True` → `<stem>_emb.nii.gz`, float32, channels last `(x/f, y/f, z/f, C)`, with the affine
of the resized image, and `<stem>_emb.nii.gz.json` (dim, spacing, optional region one-hots, modality, how it was
encoded). Then `embeddings.json` lists them all: the `--data` of `maisi train diffusion`, and, since each item also
carries the datalist's `label` (relative to embeddings.json) when it had one, of `maisi train controlnet`.

Size rule (differs from the reference on purpose): the reference rounds each axis to the nearest multiple of 128
(minimum 128), a rule for 512-class data. Here each axis goes to the nearest multiple of `spec.size_multiple` (VAE
factor × 2^(UNet levels − 1): 32 for the released model, 8 for the tiny test model), halves rounding up, minimum one
multiple. The target size is computed from the shape *after* RAS reorientation (the reference reads the header dims
before it, which mismatches for files stored with permuted axes).

Determinism: the ε of file k comes from a generator seeded with `derive_sample_seed(seed, k)` inside a forked RNG, so
a resumed run, or any subset, gives the same latents. Existing outputs (latent + sidecar) are skipped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Resize, ScaleIntensityRange

from maisi_cli.engine.masks.database import entry_for_file
from maisi_cli.engine.networks import build_network, set_tp_splits
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent
from maisi_cli.engine.sampling import derive_sample_seed
from maisi_cli.engine.train.common import TrainingError
from maisi_cli.engine.weights import load_into, locate_weight
from maisi_cli.errors import MaisiError
from maisi_cli.io.datalists import read_datalist, write_datalist
from maisi_cli.io.nifti import write_nifti
from maisi_cli.io.provenance import read_json, write_json
from maisi_cli.models import ModelSpec

HU_MIN, HU_MAX = -1000.0, 1000.0


class EmbedError(MaisiError):
    """An image cannot be read or encoded."""


def target_size(shape: tuple[int, ...], multiple: int) -> tuple[int, int, int]:
    """Each axis to the nearest multiple of `multiple` (halves up), at least one multiple."""
    return tuple(max(multiple, int(math.floor(s / multiple + 0.5)) * multiple) for s in shape)  # type: ignore[return-value]


def embedding_name(image: Path, base: Path) -> Path:
    """`<relative path without .nii/.nii.gz>_emb.nii.gz` (sub-folders kept); outside `base`, just the file name."""
    try:
        relative = image.resolve().relative_to(base.resolve())
    except ValueError:
        relative = Path(image.name)
    name = relative.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return relative.with_name(f"{name}_emb.nii.gz")


def prepare_image(path: Path, multiple: int) -> tuple[torch.Tensor, np.ndarray]:
    """(1, 1, X, Y, Z) float32 in [0, 1] at the target size, and the 4×4 affine of the resized image."""
    if not path.is_file():
        raise EmbedError(f"datalist: image '{path}' does not exist")
    try:
        volume = Compose([LoadImage(image_only=True, dtype=np.float32), EnsureChannelFirst(),
                          Orientation(axcodes="RAS", labels=None)])(str(path))
    except Exception as error:  # MONAI wraps reader errors in RuntimeError
        raise EmbedError(f"datalist: '{path}' is not a readable image ({str(error).splitlines()[0][:120]})") from None
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise EmbedError(f"datalist: '{path}' has shape {tuple(volume.shape)}; a 3-D single-channel CT is needed")
    volume = ScaleIntensityRange(a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True)(volume)
    size = target_size(tuple(volume.shape[1:]), multiple)
    if size != tuple(volume.shape[1:]):
        volume = Resize(spatial_size=size, mode="trilinear")(volume)
    affine = np.asarray(volume.affine, dtype=np.float64)
    return torch.as_tensor(volume.as_tensor() if hasattr(volume, "as_tensor") else volume)[None].float(), affine


def encode(autoencoder: torch.nn.Module, image: torch.Tensor, seed: int, mean: bool) -> torch.Tensor:
    """(1, C, x, y, z) latents: μ, or MONAI's `encode_stage_2_inputs` sample with ε drawn from `seed`."""
    with torch.no_grad():
        if mean:
            z_mu, _ = autoencoder.encode(image)
            return z_mu.float()
        devices = [image.device] if image.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return autoencoder.encode_stage_2_inputs(image).float()


def _spacing(affine: np.ndarray) -> list[float]:
    return [round(float(s), 6) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]


def load_autoencoder(spec: ModelSpec, weights_dir: Path | None, device: torch.device) -> tuple[torch.nn.Module, Any]:
    weight = locate_weight(spec, "autoencoder", weights_dir)
    autoencoder = build_network(spec, "autoencoder", device)
    load_into(autoencoder, weight, spec)
    set_tp_splits(autoencoder, 1)  # whole-volume encoding, no tensor-parallel splits (as the reference trains)
    return autoencoder.to(device).eval(), weight


def embed_datalist(
    spec: ModelSpec,
    datalist: Path,
    out_dir: Path,
    weights_dir: Path | None = None,
    device: str | torch.device = "cpu",
    mean: bool = False,
    seed: int = 0,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Encode every training image of `datalist`; returns a summary {datalist, written, skipped, items}."""
    device = torch.device(device)
    items = read_datalist(datalist, "DATALIST", empty_error=TrainingError)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = datalist.parent
    autoencoder = None
    weight = None
    written, skipped, listed = [], [], []
    total = len(items)
    for index, item in enumerate(items):
        image = Path(item["image"])
        name = embedding_name(image, base)
        target = out_dir / name
        sidecar_path = target.with_name(target.name + ".json")
        sidecar = read_json(sidecar_path) if target.is_file() else None
        if sidecar is None:
            if autoencoder is None:
                autoencoder, weight = load_autoencoder(spec, weights_dir, device)
            file_seed = derive_sample_seed(seed, index)
            volume, affine = prepare_image(image, spec.size_multiple)
            latents = encode(autoencoder, volume.to(device), file_seed, mean)
            array = latents[0].permute(1, 2, 3, 0).contiguous().cpu().numpy().astype(np.float32)  # channels last
            sidecar = {
                "dim": [int(s) for s in array.shape[:3]],
                "spacing": _spacing(affine),
                "image_dim": [int(s) for s in volume.shape[2:]],
                "modality": str(item.get("modality", spec.modality)),
                "source": os.path.relpath(image, out_dir.resolve()) if image.is_absolute() else str(image),
                "model": spec.name,
                "encoding": "mean" if mean else "sample",
                "seed": None if mean else file_seed,
            }
            if item.get("label"):
                entry = entry_for_file(Path(item["label"]) if Path(item["label"]).is_absolute()
                                       else base / item["label"], base)
                for key in ("top_region_index", "bottom_region_index"):
                    if key in entry:
                        sidecar[key] = entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            write_nifti(target, array, affine)
            write_json(sidecar_path, sidecar)  # last: a latent without its sidecar is redone on the next run
            written.append(str(name))
        else:
            skipped.append(str(name))
        listed.append({"image": name.as_posix(),
                       **{k: sidecar[k] for k in ("dim", "spacing", "modality", "top_region_index",
                                                  "bottom_region_index") if k in sidecar}})
        if item.get("label"):  # the label map, relative to embeddings.json: the condition of `train controlnet`
            label = Path(item["label"]) if Path(item["label"]).is_absolute() else base / item["label"]
            listed[-1]["label"] = Path(os.path.relpath(label.resolve(), out_dir.resolve())).as_posix()
        if on_progress is not None:
            on_progress(ProgressEvent("embed", index + 1, total))
    list_path = out_dir / "embeddings.json"
    write_datalist(list_path, listed)
    return {"datalist": str(list_path), "written": written, "skipped": skipped, "items": len(listed),
            "encoding": "mean" if mean else "sample", "model": spec.name,
            "autoencoder": str(weight.path) if weight is not None else None}

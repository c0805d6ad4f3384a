"""2.5D FID between two sets of CT volumes (reference-training-fid-trt.md §7), no typer or rich here.

What the reference does, kept: RAS orientation, optional bilinear resampling, pad (−1000 HU) and centre crop to a
target shape, HU clipping to [−1000, 1000], a centre-slice ratio, slices per plane (XY along the last axis, YZ along
the first, ZX along the second), a Keras-style RadImageNet ResNet-50 (same state-dict keys as
`Warvito/radimagenet-models`), 1→3 channels in BGR order, min-max over the volume's whole slice stack of a plane then
the means 0.406/0.456/0.485 subtracted (no std), spatial mean → features, FID per plane in float64 as MONAI's
`FIDMetric` computes it, and the average of the planes.

Differences, on purpose:
- the covariance term tr(sqrt(S_a S_b)) comes from symmetric eigen-decompositions (`trace_sqrt_product`), not a
  general `sqrtm` of the product, which is unstable when a plane has fewer slices than features and gave FIDs below
  0; rounding noise is cut, so identical sets give 0, and `maisi fid` warns about such rank-deficient planes;
- the extractor's weights come from `--extractor FILE`, else `$MAISI_HOME/fid/RadImageNet-ResNet50_notop.pth`, else
  the copy `maisi weights download radimagenet-resnet50` put in the Hugging Face cache (MONAI's mirror of the same
  file, `MONAI/checkpoints`, sha256-locked); `maisi fid` itself never downloads; the file loads with
  `weights_only=True` and strict keys;
- other extractors plug in through the entry-point group `maisi.extractors` (see "extractor plugins" below);
- `--nproc N` starts N local processes (gloo on the CPU, NCCL on GPUs) instead of needing torchrun;
- slices go through the network in batches (`batch_size`) instead of one forward per plane and volume; the min-max
  is still taken over the whole stack, so features do not depend on the batch size;
- the cache is keyed by the file's content and every parameter that changes features (the reference keys it by path
  only and silently reuses stale features);
- inputs are a folder of NIfTI files, a datalist JSON (MONAI's {"training": [{"image": …}]} or a plain list of paths
  or items) or a text list (one path a line); relative paths are resolved against the list's folder; all files are
  used (the reference keeps the first 100).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, Orientation, Spacing, SpatialPad

from maisi_cli import plugins
from maisi_cli.engine.hub import EXTRACTOR_FILES, offline
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent
from maisi_cli.engine.runtime import resolve_device, setup_runtime, teardown_runtime
from maisi_cli.engine.store import hash_file, held_to_lock
from maisi_cli.engine.weights import locate_file, read_hashed
from maisi_cli.errors import MaisiError, UsageError, WeightsError
from maisi_cli.io.datalists import read_image_paths
from maisi_cli.io.nifti import read_nifti

PLANES = ("xy", "yz", "zx")
# The axis of a (H, W, D) volume that each plane's slices run along (reference §7.4).
PLANE_AXIS = {"xy": 2, "yz": 0, "zx": 1}
RADIMAGENET_MEANS = (0.406, 0.456, 0.485)  # per channel after the RGB→BGR reorder; no std division
BUILTIN_EXTRACTOR = "radimagenet-resnet50"  # its weights: engine/hub.py EXTRACTOR_FILES
EXTRACTOR_FILE = EXTRACTOR_FILES[BUILTIN_EXTRACTOR].repo_name  # RadImageNet-ResNet50_notop.pth
EXTRACTOR_GROUP = "maisi.extractors"
CACHE_VERSION = 2
NIFTI_SUFFIXES = (".nii", ".nii.gz")

FidProgress = ProgressCallback
FidWarning = Callable[[str], None]


class FidError(MaisiError):
    """FID inputs cannot be read or used."""


# --- extractor ------------------------------------------------------------------------------------------------------
def _conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=True)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1.001e-5)


class Bottleneck(nn.Module):
    """Keras-style bottleneck: the stride sits on the first 1×1 convolution, every convolution has a bias."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes, stride)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.bn2 = _bn(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class RadImageNetResNet50(nn.Module):
    """ResNet-50 without top (bottlenecks 3-4-6-3) in the RadImageNet state-dict layout; `forward` returns the
    global-average-pooled features, (N, 32·width) = (N, 2048) at the real width 64. `width` exists for tests."""
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=True)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, 3)
        self.layer2 = self._make_layer(width * 2, 4, stride=2)
        self.layer3 = self._make_layer(width * 4, 6, stride=2)
        self.layer4 = self._make_layer(width * 8, 3, stride=2)
        self.features = width * 8 * Bottleneck.expansion

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                                       _bn(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def radimagenet_normalise(slices: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) → (n, 3, h, w): BGR copies, min-max over the whole stack, channel means subtracted."""
    x = slices.float().repeat(1, 3, 1, 1)[:, [2, 1, 0]]
    low, high = x.min(), x.max()
    x = (x - low) / (high - low + 1e-10)
    means = torch.tensor(RADIMAGENET_MEANS, dtype=x.dtype).view(1, 3, 1, 1)
    return x - means


@dataclass
class Extractor:
    """A feature extractor: what the built-in loader and every plugin factory return (the plugin protocol).

    - `model`: a torch module in eval mode; (n, c, h, w) network inputs → (n, d) float features. It is moved to the
      run's device by maisi; it must not depend on the batch size (slices go through in `--batch-size` chunks).
    - `sha256`: the identity of the weights (a file's sha256, or any string that changes whenever the features
      would); it is part of the feature-cache key, together with `name`.
    - `path`: the weights file, or None; shown in the report.
    - `name`: the registry name (`--extractor-name`).
    - `normalise`: (n, 1, h, w) float32 slices of one plane of one volume in HU, clipped to [−1000, 1000], the whole
      stack at once (so stack-wide statistics such as the RadImageNet min-max are possible) → the network inputs.
    """
    model: nn.Module
    sha256: str
    path: Path | None = None
    name: str = BUILTIN_EXTRACTOR
    normalise: Callable[[torch.Tensor], torch.Tensor] = radimagenet_normalise


# A plugin factory: called with `--extractor FILE` (or None) and returns an Extractor; errors it raises as MaisiError
# reach the user as they are, anything else as one line naming the plugin.
ExtractorFactory = Callable[[Optional[Path]], Extractor]


def default_extractor_path() -> Path:
    """Where a RadImageNet ResNet-50 state dict brought by hand goes (looked at before the Hugging Face cache)."""
    hand_placed = EXTRACTOR_FILES[BUILTIN_EXTRACTOR].hand_placed
    assert hand_placed is not None  # a single file: it has a place for a copy brought by hand
    return hand_placed


def _first(keys: Sequence[str], count: int = 3) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f" (+{len(keys) - count} more)" if len(keys) > count else "")


def locate_radimagenet() -> tuple[Path, str | None] | None:
    """(path, locked sha256 or None) of the RadImageNet weights when no `--extractor` is given:
    `$MAISI_HOME/fid/RadImageNet-ResNet50_notop.pth`, else the `maisi weights download radimagenet-resnet50` copy in
    the Hugging Face cache (held to the sha256 lock). None when neither is there. The lookup is
    engine/weights.py `locate_file`, which `maisi weights list|path` show."""
    item = EXTRACTOR_FILES[BUILTIN_EXTRACTOR]
    found = locate_file(item)
    if found is None:
        return None
    path, where = found
    return path, (held_to_lock(item, path) if where == "hf-cache" else None)


def missing_extractor_message() -> str:
    path = default_extractor_path()
    where = ("HF_HUB_OFFLINE is set, so on a machine with network run `maisi weights download radimagenet-resnet50` "
             "and copy the file") if offline() else "run `maisi weights download radimagenet-resnet50`, or copy it"
    return (f"--extractor: no RadImageNet ResNet-50 weights ({EXTRACTOR_FILE}); {where} to '{path}', "
            f"or pass --extractor FILE")


def load_extractor(path: Path | None) -> Extractor:
    """The RadImageNet ResNet-50 from a state-dict file, strict keys. The width follows `conv1.weight`.
    Without a path: see `locate_radimagenet`."""
    field_name = "--extractor"
    locked = None
    if path is None:
        found = locate_radimagenet()
        if found is None:
            raise WeightsError(missing_extractor_message())
        path, locked = found
    if not path.is_file():
        raise WeightsError(f"{field_name}: '{path}' does not exist; give the RadImageNet ResNet-50 state dict "
                           f"({EXTRACTOR_FILE}) or run `maisi weights download radimagenet-resnet50`")
    data, digest = read_hashed(path)  # one read: the bytes hashed are the bytes loaded
    if locked is not None and digest != locked:
        raise WeightsError(f"{field_name}: '{path}' changed after its sha256 was checked against the lock; re-fetch "
                           "it with: maisi weights download radimagenet-resnet50 --force")
    try:
        state = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or unsafe file
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise WeightsError(f"{field_name}: '{path}' is not a loadable state dict ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{field_name}: '{path}' is not a state dict (a mapping of names to tensors)")
    first_conv = state.get("conv1.weight")
    width = int(first_conv.shape[0]) if isinstance(first_conv, torch.Tensor) and first_conv.ndim == 4 else 64
    model = RadImageNetResNet50(width)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        raise WeightsError(f"{field_name}: '{path}' is not a RadImageNet ResNet-50 state dict: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise WeightsError(f"{field_name}: '{path}' does not fit a RadImageNet ResNet-50: shape of {_first(wrong)}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return Extractor(model=model, sha256=digest, path=path)


# --- extractor plugins ----------------------------------------------------------------------------------------------
# A package registers an extractor under the entry-point group `maisi.extractors`, e.g. in its pyproject.toml:
#     [project.entry-points."maisi.extractors"]
#     my-net = "my_package.fid:make_extractor"
# where `make_extractor(weights: Path | None) -> maisi_cli.engine.fid.Extractor` (see Extractor for the contract).
# `maisi fid --extractor-name my-net [--extractor FILE]` then uses it. maisi_cli/plugins.py lists the entry points
# (`maisi plugins` shows them, MAISI_LOAD_PLUGINS picks them) and only the one asked for is imported; the built-in
# name cannot be taken over.
def _extractor_entry_points(on_warning: FidWarning | None = None) -> dict[str, Any]:
    """name → entry point of the installed plugins. Problems (unreadable metadata, a plugin claiming the built-in
    name) are one warning each and otherwise ignored: they never stop the built-in extractor."""
    warn = on_warning or (lambda message: None)

    def builtin_claimed(point: Any) -> None:
        warn(f"--extractor-name: the plugin '{point.value}' registers the built-in name "
             f"'{point.name.strip().lower()}'; ignored")

    try:
        return plugins.entry_points_named("extractors", EXTRACTOR_FILES, builtin_claimed)
    except Exception as error:  # broken metadata of some installed distribution
        warn(f"--extractor-name: could not list the '{EXTRACTOR_GROUP}' plugins ({type(error).__name__}: "
             f"{str(error)[:80]}); only the built-in extractor is available")
        return {}


def extractor_names(on_warning: FidWarning | None = None) -> list[str]:
    """The built-in extractor and the installed plugins' names (no plugin is imported)."""
    return [BUILTIN_EXTRACTOR, *sorted(_extractor_entry_points(on_warning))]


def resolve_extractor(name: str = BUILTIN_EXTRACTOR, path: Path | None = None,
                      on_warning: FidWarning | None = None) -> Extractor:
    """The extractor called `name`, with the weights file `path` (`--extractor`, or None for its default)."""
    name = (name or BUILTIN_EXTRACTOR).strip().lower()
    if name == BUILTIN_EXTRACTOR:
        return load_extractor(path)
    installed = _extractor_entry_points(on_warning)
    if name not in installed:
        raise UsageError(f"--extractor-name: no extractor '{name}'; installed: {', '.join(extractor_names())} "
                         f"(plugins register under the entry-point group '{EXTRACTOR_GROUP}')")
    point = installed[name]
    try:
        factory = point.load()
        extractor = factory(path)
    except MaisiError:
        raise
    except Exception as error:  # a plugin's own failure, whatever its type
        reason = " ".join(str(error).split())[:120] or type(error).__name__
        raise FidError(f"--extractor-name: the plugin '{name}' ({point.value}) failed to load "
                       f"({type(error).__name__}: {reason}); fix or uninstall it, or use --extractor-name "
                       f"{BUILTIN_EXTRACTOR}") from None
    if not isinstance(extractor, Extractor) or not isinstance(extractor.model, nn.Module) \
            or not callable(extractor.normalise):
        raise FidError(f"--extractor-name: the plugin '{name}' ({point.value}) returned "
                       f"{type(extractor).__name__}, not a maisi_cli.engine.fid.Extractor with a torch module")
    extractor.name = name
    extractor.model.eval()
    return extractor


# --- inputs ---------------------------------------------------------------------------------------------------------
def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _text_list_paths(source: Path, field_name: str) -> list[Path]:
    """One path a line (blank lines and lines starting with # skipped), relative to the file's folder."""
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not text"
        raise FidError(f"{field_name}: cannot read '{source}' ({reason})") from None
    lines = [line.strip() for line in text.splitlines()]
    return [(source.parent / Path(line).expanduser()).resolve() for line in lines if line and not line.startswith("#")]


def list_volumes(source: Path, field_name: str) -> list[Path]:
    """The NIfTI files of a folder (sorted), a datalist JSON or a text list (one path per line, relative to it)."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p))
        if not files:
            raise FidError(f"{field_name}: folder '{source}' holds no NIfTI files (.nii or .nii.gz)")
    elif not source.exists():
        raise FidError(f"{field_name}: '{source}' does not exist; give a folder of NIfTI files or a datalist")
    elif source.suffix.lower() == ".json":
        files = read_image_paths(source, field_name, unreadable=FidError)
    elif source.suffix.lower() in (".txt", ".lst", ".list"):
        files = _text_list_paths(source, field_name)
    else:
        raise FidError(f"{field_name}: '{source}' is not a folder, a datalist (.json) or a file list (.txt)")
    for path in files:
        if not is_nifti(path):
            raise FidError(f"{field_name}: '{path}' is not a NIfTI file (.nii or .nii.gz)")
        if not path.is_file():
            raise FidError(f"{field_name}: '{path}' (listed in '{source}') does not exist")
    if len(files) < 2:
        raise FidError(f"{field_name}: '{source}' has {len(files)} volume(s); FID needs at least 2 on each side")
    return files


# --- preprocessing and features ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FidSettings:
    planes: tuple[str, ...] = PLANES
    target_shape: tuple[int, int, int] | None = (512, 512, 512)
    spacing: tuple[float, float, float] | None = None
    center_slices_ratio: float | None = None
    batch_size: int = 32

    def validate(self) -> None:
        if not self.planes or any(p not in PLANES for p in self.planes):
            raise UsageError(f"--planes: '{','.join(self.planes)}' is not a list of planes; use xy, yz and/or zx")
        ratio = self.center_slices_ratio
        if ratio is not None and not (0.0 < ratio <= 1.0):
            raise UsageError(f"--center-slices-ratio: {ratio} is out of range; give a fraction in (0, 1]")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size: {self.batch_size} must be at least 1")


def preprocess(path: Path, settings: FidSettings) -> np.ndarray:
    """(H, W, D) float32 in HU clipped to [−1000, 1000], RAS, optionally resampled, padded and cropped."""
    try:
        data, affine = read_nifti(path, field="volume", what="CT image")
    except MaisiError as error:
        raise FidError(str(error)) from None
    image = MetaTensor(torch.from_numpy(np.asarray(data, dtype=np.float32))[None], affine=torch.as_tensor(affine))
    image = Orientation(axcodes="RAS", labels=None)(image)
    if settings.spacing is not None:
        image = Spacing(pixdim=settings.spacing, mode="bilinear")(image)
    if settings.target_shape is not None:
        image = SpatialPad(spatial_size=settings.target_shape, mode="constant", value=-1000)(image)
        image = CenterSpatialCrop(roi_size=settings.target_shape)(image)
    array = torch.as_tensor(image).detach().cpu().numpy()[0]
    return np.clip(array, -1000.0, 1000.0).astype(np.float32)


def slice_range(length: int, ratio: float | None) -> tuple[int, int]:
    if ratio is None:
        return 0, length
    return int((1.0 - ratio) / 2.0 * length), int((1.0 + ratio) / 2.0 * length)


def plane_slices(volume: np.ndarray, plane: str, ratio: float | None) -> torch.Tensor:
    """(n, 1, h, w) slices of `plane`, the central fraction `ratio` of them."""
    axis = PLANE_AXIS[plane]
    start, stop = slice_range(volume.shape[axis], ratio)
    stack = np.moveaxis(volume, axis, 0)[start:stop]
    if stack.shape[0] == 0:
        raise FidError(f"--center-slices-ratio: {ratio} keeps no {plane} slice of a volume of shape {volume.shape}")
    return torch.from_numpy(np.ascontiguousarray(stack))[:, None]


@torch.no_grad()
def plane_features(model: nn.Module, volume: np.ndarray, plane: str, settings: FidSettings,
                   normalise: Callable[[torch.Tensor], torch.Tensor] = radimagenet_normalise) -> torch.Tensor:
    """(n_slices, d) features of one plane: the whole stack normalised at once, then `batch_size` slices a forward."""
    inputs = normalise(plane_slices(volume, plane, settings.center_slices_ratio))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    chunks = [model(inputs[i:i + settings.batch_size].to(device)).float().cpu()
              for i in range(0, inputs.shape[0], settings.batch_size)]
    return torch.cat(chunks)


# --- cache ----------------------------------------------------------------------------------------------------------
def cache_key(content_sha256: str, extractor_sha256: str, settings: FidSettings, plane: str,
              extractor_name: str = BUILTIN_EXTRACTOR) -> str:
    identity = {"version": CACHE_VERSION, "content": content_sha256, "extractor": extractor_sha256,
                "extractor_name": extractor_name,
                "target_shape": settings.target_shape, "spacing": settings.spacing,
                "ratio": settings.center_slices_ratio, "plane": plane}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _cache_read(path: Path) -> torch.Tensor | None:
    try:
        value = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # a missing or damaged entry is recomputed
        return None
    return value if isinstance(value, torch.Tensor) and value.ndim == 2 else None


def _cache_write(path: Path, features: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(handle)
    try:
        torch.save(features.clone(), temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@dataclass
class FeatureStats:
    computed: int = 0  # (volume, plane) pairs run through the network
    cached: int = 0  # pairs read from the cache


def volume_features(path: Path, extractor: Extractor, settings: FidSettings, cache_dir: Path | None,
                    stats: FeatureStats) -> dict[str, torch.Tensor]:
    """{plane: (n_slices, features)} of one volume, from the cache where it has them."""
    result: dict[str, torch.Tensor] = {}
    entries: dict[str, Path] = {}
    if cache_dir is not None:
        content = hash_file(path)
        for plane in settings.planes:
            key = cache_key(content, extractor.sha256, settings, plane, extractor.name)
            entries[plane] = cache_dir / f"{key}.pt"
            cached = _cache_read(entries[plane]) if entries[plane].is_file() else None
            if cached is not None:
                result[plane] = cached
                stats.cached += 1
    todo = [plane for plane in settings.planes if plane not in result]
    if todo:
        volume = preprocess(path, settings)
        for plane in todo:
            result[plane] = plane_features(extractor.model, volume, plane, settings, extractor.normalise)
            stats.computed += 1
            if plane in entries:
                _cache_write(entries[plane], result[plane])
    return result


# --- Fréchet distance -----------------------------------------------------------------------------------------------
def _psd_eigenvalues(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric positive semi-definite matrix with rounding noise set to 0: those below the
    decomposition's precision (largest × size × machine epsilon), negative ones included. Left in, the noise of a
    singular covariance's zero eigenvalues adds up under the square root (about 1e-4 for 256 features)."""
    tolerance = float(np.abs(values).max(initial=0.0)) * values.size * np.finfo(np.float64).eps
    return np.where(values > tolerance, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_psd_eigenvalues(values))) @ vectors.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr(sqrt(sigma_a @ sigma_b)) for covariances, as the sum of the square roots of the eigenvalues of the
    symmetric root_a @ sigma_b @ root_a (root_a = sqrt(sigma_a)), which has the same eigenvalues as the product.
    A general `sqrtm` of the non-symmetric product is unstable when the covariances are singular (fewer samples
    than features) and made FIDs below 0; this form stays real and the distance non-negative."""
    root_a = _psd_sqrt(sigma_a)
    inner = root_a @ sigma_b @ root_a
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(_psd_eigenvalues(values)).sum())


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """FID between two (n, d) feature sets in float64 (unbiased covariances, as MONAI's FIDMetric), never below 0:
    the covariance term comes from a symmetric eigen-decomposition (`trace_sqrt_product`); what rounding leaves
    below 0 is 0."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise FidError(f"features must be (n, d) with the same d; got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise FidError("FID needs at least 2 feature vectors on each side")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise FidError("FID: the extractor gave non-finite features (NaN or inf); check the volumes for NaN or inf")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt_product(sigma_a, sigma_b)
    return max(0.0, float(distance))


def rank_deficiency_warning(report: "FidReport") -> str | None:
    """One line when a plane has fewer slices than features on either side: its covariance is then singular
    (rank < features) and the FID an unreliable estimate."""
    short = [f"{plane.upper()} ({report.real_slices[plane]} real, {report.synth_slices[plane]} synthetic)"
             for plane in report.planes
             if min(report.real_slices[plane], report.synth_slices[plane]) < report.features]
    if not short:
        return None
    return (f"FID: fewer slices than the {report.features} features in plane {', '.join(short)}; the covariances "
            "are rank-deficient and the FID is unreliable: use more volumes, or keep more slices of each "
            "(--center-slices-ratio)")


# --- the whole computation ------------------------------------------------------------------------------------------
@dataclass
class FidReport:
    planes: dict[str, float]
    real_volumes: int
    synth_volumes: int
    real_slices: dict[str, int]
    synth_slices: dict[str, int]
    features: int
    computed: int
    cached: int
    world_size: int = 1
    extractor: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def average(self) -> float:
        return float(np.mean(list(self.planes.values())))

    def as_dict(self) -> dict:
        return {"fid": {**self.planes, "average": self.average}, "real_volumes": self.real_volumes,
                "synth_volumes": self.synth_volumes, "real_slices": self.real_slices,
                "synth_slices": self.synth_slices, "features": self.features,
                "computed": self.computed, "cached": self.cached, "world_size": self.world_size,
                "extractor": self.extractor, "settings": self.settings}


def _gather(local: Any, rank_count: int) -> list:
    """[rank 0's object, rank 1's, …] on every rank; [local] in one process."""
    if rank_count <= 1:
        return [local]

    gathered: list = [None] * rank_count
    dist.all_gather_object(gathered, local)
    return gathered


def compute_fid(real: Sequence[Path], synth: Sequence[Path], extractor: Extractor, settings: FidSettings,
                cache_dir: Path | None = None, rank: int = 0, world_size: int = 1,
                progress: FidProgress | None = None) -> FidReport:
    """FID per plane between the `real` and `synth` volumes. In a process group (torchrun or `--nproc`) each rank
    takes every world_size-th file and the features are gathered on every rank; an error on one rank (a file it
    cannot read) is raised on every rank, so none waits for the others."""
    settings.validate()
    stats = FeatureStats()
    jobs = [("real", p) for p in real[rank::world_size]] + [("synth", p) for p in synth[rank::world_size]]
    local: dict[str, Any] = {"real": [], "synth": [], "error": None}
    try:
        for done, (side, path) in enumerate(jobs):
            features = volume_features(path, extractor, settings, cache_dir, stats)
            local[side].append({plane: features[plane].numpy() for plane in settings.planes})
            if progress is not None:
                progress(ProgressEvent("features", done + 1, len(jobs)))
    except MaisiError as error:
        if world_size <= 1:
            raise
        local = {"real": [], "synth": [], "error": (type(error).__name__, error.exit_code, str(error))}
    local["counts"] = (stats.computed, stats.cached)
    gathered = _gather(local, world_size)
    for part in gathered:
        if part["error"] is not None:
            kind, code, message = part["error"]
            failure = FidError(message)
            failure.exit_code = code
            raise failure
    sides = {side: {plane: [torch.from_numpy(item[plane]) for part in gathered for item in part[side]]
                    for plane in settings.planes} for side in ("real", "synth")}
    computed = sum(part["counts"][0] for part in gathered)
    cached = sum(part["counts"][1] for part in gathered)
    result: dict[str, float] = {}
    for plane in settings.planes:
        real_features = torch.cat(sides["real"][plane])
        synth_features = torch.cat(sides["synth"][plane])
        result[plane] = frechet_distance(synth_features, real_features)
    first = settings.planes[0]
    return FidReport(
        planes=result, real_volumes=len(real), synth_volumes=len(synth),
        real_slices={p: int(sum(t.shape[0] for t in sides["real"][p])) for p in settings.planes},
        synth_slices={p: int(sum(t.shape[0] for t in sides["synth"][p])) for p in settings.planes},
        features=int(sides["real"][first][0].shape[1]), computed=computed, cached=cached,
        world_size=world_size, extractor=f"{extractor.name} ({extractor.path})" if extractor.path else extractor.name,
        settings={"planes": list(settings.planes), "target_shape": settings.target_shape,
                  "spacing": settings.spacing, "center_slices_ratio": settings.center_slices_ratio,
                  "batch_size": settings.batch_size})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawned_rank(rank: int, job: dict[str, Any], results: Any) -> None:
    """One `--nproc` process: the torchrun environment for its rank, then the same work as under torchrun.
    Rank 0 puts ("report", FidReport); a rank that fails puts ("error", exit code, message) and exits non-zero."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job["port"]), "WORLD_SIZE": str(job["nproc"]),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(job["nproc"])})
    torch.set_num_threads(job["threads"])
    try:
        extractor = resolve_extractor(job["extractor_name"], job["extractor_path"])
        runtime = setup_runtime(job["device"])
        try:
            extractor.model.to(runtime.device)
            report = compute_fid(job["real"], job["synth"], extractor, job["settings"], job["cache_dir"],
                                 rank=runtime.rank, world_size=runtime.world_size)
        finally:
            teardown_runtime(runtime)
    except MaisiError as error:
        results.put(("error", error.exit_code, str(error)))
        raise SystemExit(1) from None
    if rank == 0:
        results.put(("report", report))


def _run_spawned(real: list[Path], synth: list[Path], extractor_name: str, extractor_path: Path | None,
                 settings: FidSettings, cache_dir: Path | None, device: str, nproc: int,
                 progress: FidProgress | None) -> FidReport:
    """`--nproc N`: N fresh processes on this machine (torch.multiprocessing, spawn), a gloo (CPU) or NCCL (GPU)
    group on a free loopback port; the parent waits and returns rank 0's report. If one process dies, the others
    are stopped."""
    device_name = resolve_device(device)
    if device_name.startswith("cuda") and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc: {nproc} processes need {nproc} GPUs (one each); this machine has "
                         f"{torch.cuda.device_count()}: lower --nproc or use --device cpu")
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    job = {"real": real, "synth": synth, "extractor_name": extractor_name, "extractor_path": extractor_path,
           "settings": settings, "cache_dir": cache_dir, "device": device_name, "nproc": nproc,
           "port": _free_port(), "threads": max(1, (os.cpu_count() or 1) // nproc)}
    if progress is not None:
        progress(ProgressEvent("features", 0, 1))
    processes = mp.start_processes(_spawned_rank, args=(job, results), nprocs=nproc, join=False,
                                   start_method="spawn")
    failure: BaseException | None = None
    spawn_logger = logging.getLogger("torch.multiprocessing.spawn")  # "Terminating process …" when one fails
    level = spawn_logger.level
    spawn_logger.setLevel(logging.ERROR)
    try:
        while not processes.join():
            pass
    except Exception as error:  # ProcessRaisedException / ProcessExitedException: the others were stopped
        failure = error
    finally:
        spawn_logger.setLevel(level)
    answers = []
    while not results.empty():
        try:
            answers.append(results.get())
        except (EOFError, OSError, queue.Empty):
            break
    for answer in answers:
        if answer[0] == "error":
            error = FidError(answer[2])
            error.exit_code = answer[1]
            raise error
    reports = [answer[1] for answer in answers if answer[0] == "report"]
    if failure is not None or not reports:
        reason = " ".join(str(failure).split())[:160] if failure is not None else "no result"
        raise FidError(f"--nproc: a FID process failed ({reason}); run again with --nproc 1 to see the error")
    if progress is not None:
        progress(ProgressEvent("features", 1, 1))
    return reports[0]


def _warn_rank_deficiency(report: FidReport, on_warning: FidWarning | None) -> None:
    message = rank_deficiency_warning(report)
    if message is not None and on_warning is not None:
        on_warning(message)


def run_fid(real_source: Path, synth_source: Path, settings: FidSettings, extractor_path: Path | None = None,
            cache_dir: Path | None = None, device: str = "auto", progress: FidProgress | None = None,
            extractor_name: str = BUILTIN_EXTRACTOR, nproc: int = 1,
            on_warning: FidWarning | None = None) -> tuple[FidReport, bool]:
    """(report, whether this process should print it). Under torchrun it joins the process group torchrun set up
    (NCCL on GPUs, gloo on the CPU); with nproc > 1 it starts the processes itself (`_run_spawned`)."""
    settings.validate()
    if nproc < 1:
        raise UsageError(f"--nproc: {nproc} must be at least 1")
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if nproc > 1 and under_torchrun:
        raise UsageError(f"--nproc: already running under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}); drop "
                         "--nproc or torchrun")
    real = list_volumes(real_source, "REAL")
    synth = list_volumes(synth_source, "SYNTH")
    extractor = resolve_extractor(extractor_name, extractor_path, on_warning)
    if nproc > 1:
        # every process loads the file the parent found (the built-in's default is resolved once, here)
        path = extractor.path if extractor.name == BUILTIN_EXTRACTOR else extractor_path
        del extractor
        report = _run_spawned(real, synth, extractor_name, path, settings, cache_dir, device, nproc, progress)
        _warn_rank_deficiency(report, on_warning)
        return report, True
    runtime = setup_runtime(device)
    try:
        extractor.model.to(runtime.device)
        report = compute_fid(real, synth, extractor, settings, cache_dir, rank=runtime.rank,
                             world_size=runtime.world_size, progress=progress if runtime.is_main else None)
    finally:
        teardown_runtime(runtime)
    if runtime.is_main:
        _warn_rank_deficiency(report, on_warning)
    return report, runtime.is_main

"""Model registry: a model is data (network spec, scheduler, weight files, size rules), read into a `ModelSpec`.

Built-in specs live in `maisi_cli/resources/models/*.json`; plugins add more through the `maisi.models` entry-point
group (never replacing a built-in name or alias); `--model PATH.json` loads one from a file. No torch here.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from maisi_cli.config import FloatTriple, Triple, format_triple
from maisi_cli.errors import UsageError, first_validation_problem
from maisi_cli.io.documents import read_document
from maisi_cli.labels import modality_id
from maisi_cli.resources import resource_path

# The five networks a MAISI model may define, under the reference's `<name>_def` keys.
COMPONENTS = (
    "autoencoder",
    "diffusion_unet",
    "controlnet",
    "mask_generation_autoencoder",
    "mask_generation_diffusion",
)
# The three an image + label generation needs (an image-only model, `ModelSpec.image_only`, has no ControlNet),
# and the two of the mask generator (`--anatomy NAME:SIZE`).
IMAGE_COMPONENTS = ("autoencoder", "diffusion_unet", "controlnet")
MASK_COMPONENTS = ("mask_generation_autoencoder", "mask_generation_diffusion")

# The only classes a spec's `_target_` may name: specs are data, never a way to import arbitrary code.
ALLOWED_TARGETS = frozenset({
    "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
    "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
    "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
    "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet",
    "monai.networks.schedulers.rectified_flow.RFlowScheduler",
    "monai.networks.schedulers.ddpm.DDPMScheduler",
})


class SizeRules(BaseModel):
    """The reference `check_input` rules on output size and spacing (reference-inference.md §4.2)."""

    model_config = ConfigDict(frozen=True)

    xy_equal: bool = False
    xy_choices: tuple[int, ...] | None = None
    z_choices: tuple[int, ...] | None = None
    spacing_xy_equal: bool = False
    spacing_xy_range: tuple[float, float] | None = None
    spacing_z_range: tuple[float, float] | None = None
    min_fov_xy_mm: float | None = None
    max_size: tuple[int, int, int] | None = None
    # The only sizes the model takes, when its rule is a list (the MR models' `check_input_mr`).
    allowed_sizes: tuple[tuple[int, int, int], ...] | None = None

    def violations(self, size: Triple, spacing: FloatTriple) -> list[str]:
        """Each broken rule as '--field: what is wrong; the fix'."""
        found = []
        if self.xy_equal and size[0] != size[1]:
            found.append(f"--size: x and y must be equal (got {format_triple(size)})")
        if self.xy_choices and size[0] not in self.xy_choices:
            found.append(f"--size: x/y must be one of {', '.join(map(str, self.xy_choices))} (got {size[0]})")
        if self.z_choices and size[2] not in self.z_choices:
            found.append(f"--size: z must be one of {', '.join(map(str, self.z_choices))} (got {size[2]})")
        if self.allowed_sizes and tuple(size) not in self.allowed_sizes:
            found.append(f"--size: one of {', '.join(format_triple(a) for a in self.allowed_sizes)} "
                         f"(got {format_triple(size)})")
        if self.max_size and any(s > m for s, m in zip(size, self.max_size)):
            found.append(f"--size: at most {format_triple(self.max_size)} (got {format_triple(size)})")
        if self.spacing_xy_equal and spacing[0] != spacing[1]:
            found.append(f"--spacing: x and y must be equal (got {format_triple(spacing)})")
        if self.spacing_xy_range and not all(self.spacing_xy_range[0] <= s <= self.spacing_xy_range[1]
                                             for s in spacing[:2]):
            low, high = self.spacing_xy_range
            got = spacing[0] if not low <= spacing[0] <= high else spacing[1]
            found.append(f"--spacing: x/y must be within [{low:g}, {high:g}] mm (got {got:g})")
        if self.spacing_z_range and not (self.spacing_z_range[0] <= spacing[2] <= self.spacing_z_range[1]):
            low, high = self.spacing_z_range
            found.append(f"--spacing: z must be within [{low:g}, {high:g}] mm (got {spacing[2]:g})")
        if self.min_fov_xy_mm and size[0] * spacing[0] < self.min_fov_xy_mm:
            found.append(
                f"--size/--spacing: the x/y field of view {size[0] * spacing[0]:g} mm is under "
                f"{self.min_fov_xy_mm:g} mm; raise the size or the spacing"
            )
        return found


class RecommendedSpacing(BaseModel):
    size: Triple
    spacing: FloatTriple


class ModelSpec(BaseModel):
    """One generative model: everything needed to build, load and run it."""

    model_config = ConfigDict(frozen=True)

    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    modality: str = "ct"
    default_steps: int = Field(30, ge=1)
    hf_repo: str | None = None
    hf_revision: str = "main"
    licence: str | None = None
    weights: dict[str, str]
    # Data files of the same repository: the candidate-mask database, its mask archive, the anatomy-size table.
    datasets: dict[str, str] = {}
    size_rules: SizeRules = SizeRules()
    default_size: Triple
    recommended_spacing: tuple[RecommendedSpacing, ...] = ()
    network: dict[str, Any]
    # A folder under maisi_cli/resources holding the weight and data files under their `weights`/`datasets`
    # names: the model ships inside the package (the demo) and needs no download.
    bundled: str | None = None
    source: str = "built-in"
    # Classifier-free guidance on the modality class of an image-only model (NV-Generate-CTMR
    # `cfg_guidance_scale`): each step runs the UNet on the modality and on class 0 ("unknown") and takes
    # uncond + s·(cond − uncond). None, 0 or 1: off.
    cfg_guidance_scale: float | None = None
    # How the VAE output in [0, 1] becomes the written image: "hu" CT (−1000..1000 HU, air outside the body),
    # "mr" MR intensities (0..1000, clipped below at 0 only), as NV-Generate-CTMR's diff_model_infer.
    output_intensity: Literal["hu", "mr"] = "hu"

    @field_validator("cfg_guidance_scale")
    @classmethod
    def _guidance_off_or_at_least_one(cls, value: float | None) -> float | None:
        if value is not None and value != 0 and value < 1:
            raise ValueError("use 0 or 1 (off), or a scale above 1")
        return value

    @field_validator("network")
    @classmethod
    def _known_classes_only(cls, network: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key, block in network.items():
            if isinstance(block, dict) and "_target_" in block and block["_target_"] not in ALLOWED_TARGETS:
                names = ", ".join(sorted(t.rsplit(".", 1)[1] for t in ALLOWED_TARGETS))
                raise ValueError(f"'_target_' {block['_target_']!r} is not a MONAI MAISI class; use one of {names}")
        required = ["autoencoder_def", "diffusion_unet_def", "noise_scheduler"]
        if "controlnet" in (info.data.get("weights") or {}):  # an image-only model needs no ControlNet block
            required.insert(2, "controlnet_def")
        for key in required:
            if key not in network:
                raise ValueError(f"the '{key}' block is missing")
        return network

    # --- derived facts about the networks -------------------------------------------------
    def definition(self, component: str) -> dict[str, Any]:
        key = f"{component}_def"
        if key not in self.network:
            raise UsageError(f"model {self.name}: its spec has no '{key}' network definition")
        return self.network[key]

    def bundled_file(self, repo_name: str) -> Path | None:
        """The packaged copy of one of the model's files, when the model ships inside the package."""
        if self.bundled is None:
            return None
        path = resource_path(self.bundled, repo_name)
        return path if path.is_file() else None

    @property
    def latent_channels(self) -> int:
        return int(self.network["latent_channels"])

    @property
    def vae_downsample(self) -> int:
        """Spatial factor image → latent: 2 per VAE level after the first."""
        return 2 ** (len(self.definition("autoencoder")["num_channels"]) - 1)

    @property
    def size_multiple(self) -> int:
        """Each image axis must divide by this: the VAE factor times the UNet's 2^(levels-1)."""
        unet = self.definition("diffusion_unet")
        levels = len(unet.get("num_channels") or unet.get("channels"))
        return self.vae_downsample * 2 ** (levels - 1)

    @property
    def scheduler_kind(self) -> str:
        """'rflow' or 'ddpm', read from the scheduler class name."""
        target = self.network["noise_scheduler"]["_target_"]
        if target.endswith("RFlowScheduler"):
            return "rflow"
        if target.endswith("DDPMScheduler"):
            return "ddpm"
        raise UsageError(f"model {self.name}: unsupported noise scheduler '{target}'")

    @property
    def image_only(self) -> bool:
        """No ControlNet (no `controlnet` weight file or no `controlnet_def`): the model makes images without a
        condition mask and without a label file (MAISI v2's MR models)."""
        return "controlnet" not in self.weights or "controlnet_def" not in self.network

    @property
    def image_components(self) -> tuple[str, ...]:
        """The weight components an image generation loads: IMAGE_COMPONENTS, less the ControlNet when image-only."""
        return tuple(c for c in IMAGE_COMPONENTS if not (c == "controlnet" and self.image_only))

    @property
    def guidance_scale(self) -> float | None:
        """The spec's classifier-free guidance scale when it is on (> 1), else None."""
        return self.cfg_guidance_scale if self.cfg_guidance_scale is not None and self.cfg_guidance_scale > 1 else None

    @property
    def uses_modality(self) -> bool:
        return self.definition("diffusion_unet").get("num_class_embeds") is not None

    @property
    def uses_body_region(self) -> bool:
        value = self.definition("diffusion_unet").get("include_top_region_index_input", False)
        return bool(self.network.get(value[1:], False) if isinstance(value, str) and value.startswith("@") else value)

    @property
    def modality_id(self) -> int:
        return modality_id(self.modality)

    def latent_shape(self, size: Triple) -> tuple[int, int, int, int]:
        f = self.vae_downsample
        return (self.latent_channels, size[0] // f, size[1] // f, size[2] // f)

    # --- requests ----------------------------------------------------------------------------
    def default_spacing(self, size: Triple) -> FloatTriple:
        """Recommended spacing for a size: the table entry for that size; else the entry nearest in size, with
        its z spacing scaled to keep its z field of view when the x/y size is the same."""
        if not self.recommended_spacing:
            return (1.0, 1.0, 1.0)
        for entry in self.recommended_spacing:
            if entry.size == size:
                return entry.spacing
        nearest = min(
            self.recommended_spacing,
            key=lambda e: (abs(math.log(size[0] / e.size[0])), abs(math.log(size[2] / e.size[2]))),
        )
        if nearest.size[0] != size[0]:
            return nearest.spacing
        sz = round(nearest.spacing[2] * nearest.size[2] / size[2], 4)
        if self.size_rules.spacing_z_range:
            low, high = self.size_rules.spacing_z_range
            sz = min(max(sz, low), high)
        return (nearest.spacing[0], nearest.spacing[1], sz)

    def check_request(self, size: Triple, spacing: FloatTriple, allow_any_size: bool) -> list[str]:
        """Raise on sizes the networks cannot take; return the model-rule violations lifted by allow_any_size
        (as warnings). Without allow_any_size those violations raise."""
        multiple = self.size_multiple
        bad = [s for s in size if s % multiple]
        if bad:
            suggestion = format_triple(tuple(max(multiple, round(s / multiple) * multiple) for s in size))
            raise UsageError(
                f"--size: {format_triple(size)} is not a multiple of {multiple} on every axis "
                f"(the VAE downsamples {self.vae_downsample}x and the UNet {multiple // self.vae_downsample}x); "
                f"use e.g. {suggestion}"
            )
        problems = self.size_rules.violations(size, spacing)
        if problems and not allow_any_size:
            raise UsageError(f"{problems[0]}; or pass --allow-any-size to lift model {self.name}'s size rules")
        return problems


def _read_spec(path: Path, source: str) -> ModelSpec:
    data = read_document(path, "--model", kind="json", shape="a JSON object (a model spec)")
    try:
        return ModelSpec.model_validate({**data, "source": source})
    except ValidationError as error:
        where, problem = first_validation_problem(error)
        raise UsageError(f"--model: '{path}' field '{where}': {problem}") from None


@cache
def builtin_models() -> dict[str, ModelSpec]:
    specs = {}
    for path in sorted(resource_path("models").glob("*.json")):
        spec = _read_spec(path, "built-in")
        specs[spec.name] = spec
    return specs


def _plugin_spec(item: Any, source: str) -> ModelSpec:
    """One spec a plugin gave: a dict, or the path of a spec .json."""
    if isinstance(item, dict):
        data = item
    else:
        data = read_document(Path(str(item)), "spec file", kind="json", shape="a JSON object (a model spec)",
                             error=ValueError)
    if data.get("bundled"):
        raise ValueError("'bundled' names files inside maisi itself; a plugin spec names files on its hf_repo")
    try:
        spec = ModelSpec.model_validate({**data, "source": source})
    except ValidationError as error:
        where, problem = first_validation_problem(error)
        raise ValueError(f"spec {data.get('name', '?')!r} field '{where}': {problem}") from None
    from maisi_cli.labels import modality_mapping

    if spec.modality not in modality_mapping():
        raise ValueError(f"spec {spec.name!r}: modality '{spec.modality}' is unknown (add it with a "
                         "maisi.modalities entry point)")
    return spec


def _merge_plugin_models(found: list) -> dict[str, ModelSpec]:
    from maisi_cli import plugins

    owner = {key: "maisi" for spec in builtin_models().values() for key in (spec.name, *spec.aliases)}
    return plugins.merge_named(
        found, owner, "model specs",
        lambda record, item: _plugin_spec(item, f"plugin {record.plugin}"
                                          + (f" {record.version}" if record.version else "")),
        lambda spec: (spec.name, *spec.aliases))


def plugin_models() -> dict[str, ModelSpec]:
    """The models plugins add (read once per process, when first needed)."""
    from maisi_cli import plugins

    return plugins.registry("models", _merge_plugin_models)


def list_models() -> list[ModelSpec]:
    return [*builtin_models().values(), *plugin_models().values()]


def get_model(name_or_path: str) -> ModelSpec:
    """A model by name or alias (built-in first, then plugins), or a spec file when the value ends in .json."""
    if name_or_path.endswith(".json"):
        return _read_spec(Path(name_or_path).expanduser(), str(Path(name_or_path).expanduser().resolve()))
    for models in (builtin_models, plugin_models):  # plugins are read only for a name that is not built in
        for spec in models().values():
            if name_or_path == spec.name or name_or_path in spec.aliases:
                return spec
    known = ", ".join(sorted(spec.name for spec in list_models()))
    raise UsageError(f"--model: unknown model '{name_or_path}'; known: {known} (or a model spec .json file)")

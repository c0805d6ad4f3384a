"""Model registry: a model is data (network spec, scheduler, weight files, size rules), read into a `ModelSpec`.

Built-in specs live in `maisi_cli/resources/models/*.json`; plugins add more through the `maisi.models` entry-point
group (never replacing a built-in name or alias); `--model PATH.json` loads one from a file. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from maisi_cli import plugins
from maisi_cli.config import FloatTriple, Triple, format_triple
from maisi_cli.errors import UsageError, first_validation_problem
from maisi_cli.io.documents import read_document
from maisi_cli.labels import modality_id, modality_mapping
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


# --- what each value of a network definition must be ---------------------------------------------------------------
# A spec's network blocks become keyword arguments of MONAI classes; a wrong type there would only surface as a
# traceback from deep inside MONAI, so every value is checked when the spec is read, and named in the error.
@dataclass(frozen=True)
class ValueKind:
    words: str  # what the value must be, for the error message
    accepts: Callable[[Any], bool]


def _whole(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _list_of(test: Callable[[Any], bool], length: int | None = None) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (list, tuple)) and len(v) > 0 and (length is None or len(v) == length)
                      and all(test(x) for x in v))


COUNT = ValueKind("a whole number >= 1", _whole(1))
WHOLE = ValueKind("a whole number >= 0", _whole(0))
NUMBER = ValueKind("a finite number", _number)
FLAG = ValueKind("true or false", lambda v: isinstance(v, bool))
TEXT = ValueKind("a string", lambda v: isinstance(v, str))
DIMS = ValueKind("2 or 3", lambda v: _whole(2)(v) and v <= 3)
COUNT_OR_NULL = ValueKind("a whole number >= 1 or null", lambda v: v is None or _whole(1)(v))
LEVEL_COUNTS = ValueKind("a list of whole numbers >= 1, one per level (e.g. [64, 128, 256])", _list_of(_whole(1)))
LEVEL_FLAGS = ValueKind("a list of true/false, one per level", _list_of(FLAG.accepts))
WHOLE_OR_LEVELS = ValueKind("a whole number >= 0, or a list of them with one per level",
                            lambda v: _whole(0)(v) or _list_of(_whole(0))(v))
LATENT_SHAPE = ValueKind("a list of four whole numbers >= 1 (channels, x, y, z)", _list_of(_whole(1), 4))

# The parameters of the MONAI classes in ALLOWED_TARGETS (tests/unit/test_weight_loading.py holds this table to
# their signatures), and the top-level constants that `@name` references point at.
VALUE_KINDS: dict[str, ValueKind] = {
    "_target_": TEXT, "spatial_dims": DIMS, "spatial_dim": DIMS,
    **dict.fromkeys(("in_channels", "out_channels", "latent_channels", "norm_num_groups", "num_splits",
                     "transformer_num_layers", "conditioning_embedding_in_channels", "num_train_timesteps",
                     "base_img_size_numel"), COUNT),
    **dict.fromkeys(("dim_split", "steps_offset"), WHOLE),
    **dict.fromkeys(("num_class_embeds", "cross_attention_dim"), COUNT_OR_NULL),
    **dict.fromkeys(("norm_eps", "dropout_cattn", "loc", "scale", "transform_scale", "clip_sample_min",
                     "clip_sample_max", "beta_start", "beta_end"), NUMBER),
    **dict.fromkeys(("with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn", "include_fc", "use_combined_linear",
                     "use_flash_attention", "use_checkpointing", "use_convtranspose", "norm_float16", "print_info",
                     "save_mem", "resblock_updown", "with_conditioning", "upcast_attention",
                     "include_top_region_index_input", "include_bottom_region_index_input", "include_spacing_input",
                     "clip_sample", "use_discrete_timesteps", "use_timestep_transform"), FLAG),
    **dict.fromkeys(("num_channels", "channels", "conditioning_embedding_num_channels"), LEVEL_COUNTS),
    **dict.fromkeys(("num_res_blocks", "num_head_channels"), WHOLE_OR_LEVELS),
    "attention_levels": LEVEL_FLAGS,
    **dict.fromkeys(("schedule", "variance_type", "prediction_type", "sample_method"), TEXT),
}
CONSTANT_KINDS: dict[str, ValueKind] = {
    "spatial_dims": DIMS, "image_channels": COUNT, "latent_channels": COUNT, "include_body_region": FLAG,
    "mask_generation_latent_shape": LATENT_SHAPE, "mask_generation_scale_factor": NUMBER,
}
_UNET = ("spatial_dims", "in_channels", "out_channels", "num_res_blocks", "attention_levels", "norm_num_groups",
         "norm_eps", "resblock_updown", "num_head_channels", "with_conditioning", "transformer_num_layers",
         "cross_attention_dim", "num_class_embeds", "upcast_attention", "include_fc", "use_combined_linear",
         "use_flash_attention")
PARAMETERS: dict[str, frozenset[str]] = {
    "AutoencoderKlMaisi": frozenset((
        "spatial_dims", "in_channels", "out_channels", "num_res_blocks", "num_channels", "attention_levels",
        "latent_channels", "norm_num_groups", "norm_eps", "with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn",
        "include_fc", "use_combined_linear", "use_flash_attention", "use_checkpointing", "use_convtranspose",
        "num_splits", "dim_split", "norm_float16", "print_info", "save_mem")),
    "DiffusionModelUNetMaisi": frozenset((*_UNET, "num_channels", "dropout_cattn", "include_top_region_index_input",
                                          "include_bottom_region_index_input", "include_spacing_input")),
    "ControlNetMaisi": frozenset((*set(_UNET) - {"out_channels"}, "num_channels", "conditioning_embedding_in_channels",
                                  "conditioning_embedding_num_channels", "use_checkpointing")),
    "DiffusionModelUNet": frozenset((*_UNET, "channels", "dropout_cattn")),
    "RFlowScheduler": frozenset(("num_train_timesteps", "use_discrete_timesteps", "sample_method", "loc", "scale",
                                 "use_timestep_transform", "transform_scale", "steps_offset", "base_img_size_numel",
                                 "spatial_dim")),
    # DDPMScheduler takes its beta range through **schedule_args
    "DDPMScheduler": frozenset(("num_train_timesteps", "schedule", "variance_type", "clip_sample", "prediction_type",
                                "clip_sample_min", "clip_sample_max", "beta_start", "beta_end")),
}
BLOCK_KEYS = (*(f"{c}_def" for c in COMPONENTS), "noise_scheduler", "mask_generation_noise_scheduler")


def _spec_error(loc: tuple[str, ...], value: Any, message: str) -> ValidationError:
    """A pydantic error at `network.<loc>` (raised inside the `network` validator, pydantic prefixes 'network')."""
    error = PydanticCustomError("spec_value", message)
    return ValidationError.from_exception_data("network", [{"type": error, "loc": loc, "input": value}])


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_network_values(network: dict[str, Any]) -> None:
    """Raise (a pydantic ValidationError located at the key) on the first value of the wrong type or shape: a
    top-level constant, a block that is not an object, a parameter the block's class does not take, a value (or
    what its `@name` points at) of the wrong kind, per-level lists of another length than the levels."""
    for key, kind in CONSTANT_KINDS.items():
        if key in network and not kind.accepts(network[key]):
            raise _spec_error((key,), network[key], f"{_shown(network[key])} is not {kind.words}")
    for key in BLOCK_KEYS:
        if key in network and not isinstance(network[key], dict):
            raise _spec_error((key,), network[key], f"{_shown(network[key])} is not an object of keyword arguments")
    for key, block in network.items():
        if isinstance(block, dict) and isinstance(block.get("_target_"), str) and block["_target_"] in ALLOWED_TARGETS:
            _check_block(network, key, block)


def _check_block(network: dict[str, Any], key: str, block: dict[str, Any]) -> None:
    class_name = block["_target_"].rsplit(".", 1)[1]
    resolved = {}
    for name, value in block.items():
        if name != "_target_" and name not in PARAMETERS[class_name]:
            raise _spec_error((key, name), value, f"'{name}' is not a parameter of MONAI's {class_name}")
        shown = _shown(value)
        if isinstance(value, str) and value.startswith("@"):
            if value[1:] not in network:
                raise _spec_error((key, name), value, f"{value} names no top-level value of the network block")
            shown = f"{value} = {_shown(network[value[1:]])}"
            value = network[value[1:]]
        kind = VALUE_KINDS[name]
        if not kind.accepts(value):
            raise _spec_error((key, name), value, f"{shown} is not {kind.words}")
        resolved[name] = value
    levels = resolved.get("num_channels", resolved.get("channels"))
    if levels is None:
        return
    for name in ("attention_levels", "num_res_blocks", "num_head_channels"):
        value = resolved.get(name)
        if isinstance(value, (list, tuple)) and len(value) != len(levels):
            raise _spec_error((key, name), value, f"has {len(value)} entries for {len(levels)} levels; give one per "
                                                  "level")
    groups = resolved.get("norm_num_groups", 32)  # MONAI's default
    if any(channels % groups for channels in levels):
        raise _spec_error((key, "norm_num_groups"), groups, f"{groups} does not divide every level's channel count "
                                                            f"{list(levels)}; MONAI's GroupNorm needs it to")


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
    # The x/y field of view the model was trained on for chest, abdomen and pelvis CTs (MAISI: 384 mm; min_fov_xy_mm
    # is the head's): less is allowed, with a warning, for a user's mask that shows no head.
    min_fov_xy_mm_body: float | None = None
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
    # Bytes of repository files by their repository name, where the spec knows them (what a download costs; shown by
    # `maisi weights list` and `generate --dry-run` before the file is here). Others are asked of the hub.
    file_sizes: dict[str, int] = {}
    size_rules: SizeRules = SizeRules()
    default_size: Triple
    recommended_spacing: tuple[RecommendedSpacing, ...] = ()
    network: dict[str, Any]
    # A folder under maisi_cli/resources holding the weight and data files under their `weights`/`datasets`
    # names: the model ships inside the package (the demo) and needs no download.
    bundled: str | None = None
    source: str = "built-in"
    # Classifier-free guidance (NV-Generate-CTMR `cfg_guidance_scale`), the model's default for --guidance: each
    # step runs the networks on the condition and on the unconditional one (image-only: the modality class 0; with a
    # ControlNet: also the mask without its tumours) and takes uncond + s·(cond − uncond). On when above 0, as
    # upstream; None or 0: off.
    cfg_guidance_scale: float | None = None
    # How the VAE output in [0, 1] becomes the written image: "hu" CT (−1000..1000 HU, air outside the body),
    # "mr" MR intensities (0..1000, clipped below at 0 only), as NV-Generate-CTMR's diff_model_infer.
    output_intensity: Literal["hu", "mr"] = "hu"
    # The label dictionary of the model's anatomy names: None, maisi's own (132 + body 200); else the name of a
    # table a plugin provides whole through `maisi.labels` (maisi_cli/labels.py `label_dictionary_of`).
    label_dictionary: str | None = None

    @field_validator("cfg_guidance_scale")
    @classmethod
    def _guidance_off_or_positive(cls, value: float | None) -> float | None:
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise ValueError("use 0 (off) or a positive scale")
        return value

    @field_validator("network")
    @classmethod
    def _known_classes_only(cls, network: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key, block in network.items():
            if isinstance(block, dict) and "_target_" in block and block["_target_"] not in ALLOWED_TARGETS:
                names = ", ".join(sorted(t.rsplit(".", 1)[1] for t in ALLOWED_TARGETS))
                raise ValueError(f"'_target_' {block['_target_']!r} is not a MONAI MAISI class; use one of {names}")
        check_network_values(network)
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
        """The spec's classifier-free guidance scale when it is on (> 0, as upstream), else None."""
        return self.cfg_guidance_scale if self.cfg_guidance_scale is not None and self.cfg_guidance_scale > 0 else None

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

    def nearest_grid(self, size: Triple, spacing: FloatTriple) -> tuple[Triple, FloatTriple]:
        """The grid the model takes nearest to a mask's own (size, spacing): that grid when the model takes it; else,
        among the sizes its rules allow near each axis and, for each, the mask's spacing or the spacing that keeps
        the mask's field of view (both within the spacing ranges), the grid that changes the field of view and
        the spacing least, cropping counting double (it loses anatomy; padding adds air)."""
        if not self.grid_problems(size, spacing):
            return size, spacing
        axes = [self._axis_options(axis, size, spacing) for axis in range(3)]
        best: tuple[float, Triple, FloatTriple] | None = None
        for x in axes[0]:
            for y in axes[1]:
                for z in axes[2]:
                    grid = (x[0], y[0], z[0])
                    grid_spacing = (x[1], y[1], z[1])
                    if self.grid_problems(grid, grid_spacing):
                        continue
                    cost = sum(_grid_cost(grid[a], grid_spacing[a], size[a], spacing[a]) for a in range(3))
                    if best is None or cost < best[0] - 1e-12:
                        best = (cost, grid, grid_spacing)
        if best is None:
            default = self.default_size
            return default, self.default_spacing(default)
        return best[1], best[2]

    def grid_problems(self, size: Triple, spacing: FloatTriple) -> list[str]:
        """The size rules a grid breaks, the networks' size multiple included."""
        problems = [f"--size: {s} is not a multiple of {self.size_multiple}" for s in size if s % self.size_multiple]
        return problems + self.size_rules.violations(size, spacing)

    def _axis_options(self, axis: int, size: Triple, spacing: FloatTriple) -> list[tuple[int, float]]:
        """(size, spacing) candidates on one axis: the allowed sizes near the mask's, each at the mask's spacing and
        at the spacing keeping its extent, clamped into the model's spacing range for the axis. With x = y rules,
        x and y use the larger x/y extent and the finer x/y spacing, so both axes get the same candidates."""
        rules = self.size_rules
        tied = axis < 2 and (rules.xy_equal or rules.spacing_xy_equal)
        extent = max(size[0] * spacing[0], size[1] * spacing[1]) if tied else size[axis] * spacing[axis]
        own_spacing = min(spacing[0], spacing[1]) if tied else spacing[axis]
        if rules.allowed_sizes:
            sizes = sorted({s[axis] for s in rules.allowed_sizes})
        elif axis < 2 and rules.xy_choices:
            sizes = list(rules.xy_choices)
        elif axis == 2 and rules.z_choices:
            sizes = list(rules.z_choices)
        else:
            multiple = self.size_multiple
            ceiling = rules.max_size[axis] // multiple * multiple if rules.max_size else None
            wanted = extent / own_spacing
            sizes = {max(multiple, math.floor(wanted / multiple) * multiple), max(multiple, math.ceil(wanted / multiple)
                                                                                   * multiple)}
            sizes = sorted({min(s, ceiling) if ceiling else s for s in sizes})
        span = rules.spacing_xy_range if axis < 2 else rules.spacing_z_range
        options = []
        for count in sizes:
            for candidate in (own_spacing, extent / count):
                if span:
                    candidate = min(max(candidate, span[0]), span[1])
                options.append((int(count), round(float(candidate), 4)))
        return sorted(set(options))


def _grid_cost(count: int, step: float, own_count: int, own_step: float) -> float:
    """How far one axis of a grid is from the mask's own: log ratios of its spacing and of its extent, a smaller
    extent (cropping) counting double."""
    extent_ratio = math.log(count * step / (own_count * own_step))
    return abs(math.log(step / own_step)) + (2 * -extent_ratio if extent_ratio < 0 else extent_ratio)


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

    if spec.modality not in modality_mapping():
        raise ValueError(f"spec {spec.name!r}: modality '{spec.modality}' is unknown (add it with a "
                         "maisi.modalities entry point)")
    return spec


def _merge_plugin_models(found: list) -> dict[str, ModelSpec]:
    owner = {key: "maisi" for spec in builtin_models().values() for key in (spec.name, *spec.aliases)}
    return plugins.merge_named(
        found, owner, "model specs",
        lambda record, item: _plugin_spec(item, f"plugin {record.plugin}"
                                          + (f" {record.version}" if record.version else "")),
        lambda spec: (spec.name, *spec.aliases))


def plugin_models() -> dict[str, ModelSpec]:
    """The models plugins add (read once per process, when first needed)."""
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

"""The MAISI NIM's `POST /v1/maisi/run` payload (docs.nvidia.com/nim/medical/maisi/latest/api-reference.html),
checked field by field and mapped onto the GenerateRequest `maisi generate` would build.

NIM fields: num_output_samples (required), body_region (required), anatomy_list, output_size, spacing,
controllable_anatomy_size, pre_signed_url, local_working_dir, image_output_ext, label_output_ext. maisi adds two
optional fields the NIM has not: `seed` (the run seed of `--seed`, default 0) and `steps` (`--steps`, default the
server's). Any other field is refused, so a typo is not silently ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maisi_cli.errors import MaisiError, UsageError

BODY_REGIONS = ("head", "chest", "thorax", "abdomen", "pelvis", "lower")
CONTROLLABLE_ORGANS = ("liver", "gallbladder", "stomach", "pancreas", "colon", "lung tumor", "bone lesion",
                       "hepatic tumor", "colon cancer primaries", "pancreatic tumor")
MAX_CONTROLLED = 10
SPACING_RANGE = (0.5, 5.0)
# The NIM's extensions → maisi's --format (maisi_cli/engine/outputs.py)
EXTENSIONS = {".nii.gz": "nifti", ".nii": "nii", ".nrrd": "nrrd", ".dcm": "dicom"}
NIM_FIELDS = ("num_output_samples", "body_region", "anatomy_list", "output_size", "spacing",
              "controllable_anatomy_size", "pre_signed_url", "local_working_dir", "image_output_ext",
              "label_output_ext")
MAISI_FIELDS = ("seed", "steps")


class PayloadError(MaisiError):
    """A request field that cannot be served: 422 (or `status`) naming `field`."""

    exit_code = 2

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RunPayload:
    """A checked payload: the values maisi uses, in its own terms."""
    num_samples: int
    body_regions: tuple[str, ...]
    anatomy: tuple[str, ...]
    anatomy_sizes: tuple[tuple[str, float], ...]
    size: tuple[int, int, int] | None
    spacing: tuple[float, float, float] | None
    output_format: str
    local_working_dir: str | None
    seed: int
    steps: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _strings(body: dict, field: str, required: bool) -> tuple[str, ...]:
    value = body.get(field)
    if value is None:
        if required:
            raise PayloadError(field, f"is required; give a list of {', '.join(BODY_REGIONS)}")
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PayloadError(field, f"{value!r} is not a list of names; give e.g. [\"liver\"]")
    return tuple(v.strip().lower() for v in value)


def parse_payload(body: Any) -> RunPayload:
    """The checked payload, or a PayloadError naming the first bad field and its fix."""
    if not isinstance(body, dict):
        raise PayloadError("body", "is not a JSON object; send {\"num_output_samples\": 1, \"body_region\": "
                           "[\"abdomen\"], ...}")
    unknown = sorted(set(body) - set(NIM_FIELDS) - set(MAISI_FIELDS))
    if unknown:
        raise PayloadError(unknown[0], f"is not a field of /v1/maisi/run; use {', '.join(NIM_FIELDS + MAISI_FIELDS)}")

    samples = body.get("num_output_samples")
    if samples is None:
        raise PayloadError("num_output_samples", "is required; give a positive integer, e.g. 1")
    if not _is_int(samples) or samples < 1:
        raise PayloadError("num_output_samples", f"{samples!r} is not a positive integer; give e.g. 1")

    regions = _strings(body, "body_region", required=True)
    if not regions:
        raise PayloadError("body_region", f"is empty; give one or more of {', '.join(BODY_REGIONS)}")
    for region in regions:
        if region not in BODY_REGIONS:
            raise PayloadError("body_region", f"'{region}' is not a region; use {', '.join(BODY_REGIONS)}")

    anatomy = _strings(body, "anatomy_list", required=False)

    size = body.get("output_size")
    if size is not None:
        if not isinstance(size, list) or len(size) != 3 or not all(_is_int(v) and v > 0 for v in size):
            raise PayloadError("output_size", f"{size!r} is not three positive integers (x, y, z); give e.g. "
                               "[512, 512, 256]")
        size = (size[0], size[1], size[2])

    spacing = body.get("spacing")
    if spacing is not None:
        low, high = SPACING_RANGE
        if not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_number(v) for v in spacing):
            raise PayloadError("spacing", f"{spacing!r} is not three numbers in mm; give e.g. [1.0, 1.0, 1.0]")
        if not all(low <= v <= high for v in spacing):
            raise PayloadError("spacing", f"{spacing!r}: each value must be within [{low:g}, {high:g}] mm")
        spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))

    sizes: list[tuple[str, float]] = []
    controlled = body.get("controllable_anatomy_size")
    if controlled is not None:
        if not isinstance(controlled, list):
            raise PayloadError("controllable_anatomy_size", f"{controlled!r} is not a list of [organ, size] pairs; "
                               "give e.g. [[\"liver\", 0.5]]")
        if len(controlled) > MAX_CONTROLLED:
            raise PayloadError("controllable_anatomy_size", f"{len(controlled)} pairs; give at most "
                               f"{MAX_CONTROLLED}")
        for pair in controlled:
            if (not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str)
                    or not _is_number(pair[1])):
                raise PayloadError("controllable_anatomy_size", f"{pair!r} is not an [organ, size] pair; give "
                                   "e.g. [\"liver\", 0.5]")
            organ, value = pair[0].strip().lower(), float(pair[1])
            if organ not in CONTROLLABLE_ORGANS:
                raise PayloadError("controllable_anatomy_size", f"'{pair[0]}' is not a controllable organ; use "
                                   f"{', '.join(CONTROLLABLE_ORGANS)}")
            if not (0.0 <= value <= 1.0 or value == -1.0):
                raise PayloadError("controllable_anatomy_size", f"{organ}: size {pair[1]!r} must be within "
                                   "[0, 1], or -1 to remove the organ")
            sizes.append((organ, value))
    if anatomy and sizes:
        raise PayloadError("anatomy_list", "maisi takes either anatomy_list (labels the database mask must hold) "
                           "or controllable_anatomy_size (a generated mask), not both; drop one")

    if body.get("pre_signed_url") is not None:
        raise PayloadError("pre_signed_url", "uploading results is not supported by maisi serve; drop it and "
                           "download the files from /v1/jobs/{id}/files/NAME (or read local_working_dir)")

    working_dir = body.get("local_working_dir")
    if working_dir is not None and (not isinstance(working_dir, str) or not working_dir.strip()):
        raise PayloadError("local_working_dir", f"{working_dir!r} is not a folder name; give a path inside the "
                           "server's --data folder")

    formats = {}
    for field in ("image_output_ext", "label_output_ext"):
        ext = body.get(field, ".nii.gz")
        if not isinstance(ext, str) or ext.strip().lower() not in EXTENSIONS:
            raise PayloadError(field, f"{ext!r} is not an extension; use {', '.join(EXTENSIONS)}")
        formats[field] = EXTENSIONS[ext.strip().lower()]
    if formats["image_output_ext"] != formats["label_output_ext"]:
        raise PayloadError("label_output_ext", "maisi writes the image and its label in one format; give the same "
                           "extension as image_output_ext")

    seed = body.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        raise PayloadError("seed", f"{seed!r} is not a non-negative integer; give e.g. 0")
    steps = body.get("steps")
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise PayloadError("steps", f"{steps!r} is not a positive integer; give e.g. 30, or drop it")

    return RunPayload(samples, regions, anatomy, tuple(sizes), size, spacing, formats["image_output_ext"],
                      working_dir.strip() if isinstance(working_dir, str) else None, seed, steps)


@dataclass(frozen=True)
class ServeSettings:
    """What the server fixes for every request (the options of `maisi serve`)."""
    model: str = "demo"
    profile: str = "auto"
    device: str = "auto"
    steps: int | None = None
    qc: bool = True
    max_attempts: int = 3  # attempts per sample while it fails the check (`generate --max-attempts`)
    allow_any_size: bool = False
    weights_dir: Path | None = None
    previews: bool = True  # each sample's preview PNG (and its QC report PNG when the check is on), for the page


def generate_request(payload: RunPayload, settings: ServeSettings, uses_body_region: bool, out: Path):
    """The GenerateRequest of `maisi generate` for this payload, into `out`. The body regions go to the model
    only when it takes a body-region input (the ddpm models); the rflow models have none, as the NIM's own."""
    from maisi_cli.request import GenerateRequest

    try:
        return GenerateRequest(
            model=settings.model, profile=settings.profile, device=settings.device, weights_dir=settings.weights_dir,
            size=payload.size, spacing=payload.spacing, num_samples=payload.num_samples, seed=payload.seed,
            steps=payload.steps if payload.steps is not None else settings.steps,
            anatomy=payload.anatomy, anatomy_sizes=payload.anatomy_sizes,
            body_regions=payload.body_regions if uses_body_region else (),
            out=out, output_format=payload.output_format, allow_any_size=settings.allow_any_size)
    except UsageError as failure:
        raise payload_error(failure, payload) from None


# The CLI's option names in the engine's messages → the payload field that set them
_OPTION_FIELDS = {"--size": "output_size", "--spacing": "spacing", "--num-samples": "num_output_samples",
                  "--steps": "steps", "--seed": "seed", "--format": "image_output_ext",
                  "--body-region": "body_region", "--out": "local_working_dir", "--label-mode": "anatomy_list"}


def payload_error(failure: MaisiError, payload: RunPayload) -> PayloadError:
    """An engine refusal of a payload, as a PayloadError naming the payload's field instead of the CLI option."""
    text = str(failure)
    match = re.match(r"(--[a-z-]+)\s*:?\s*(.*)", text, re.S)
    if match is None:
        return PayloadError("body", text)
    option, rest = match.group(1), match.group(2)
    if option == "--anatomy":
        field = "controllable_anatomy_size" if payload.anatomy_sizes else "anatomy_list"
    else:
        field = _OPTION_FIELDS.get(option, "body")
    for cli_option, name in _OPTION_FIELDS.items():  # the fix in the message names the field too
        rest = rest.replace(cli_option, name)
    return PayloadError(field, rest if field != "body" else text)

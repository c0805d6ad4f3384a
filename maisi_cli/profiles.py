"""Hardware profiles (profiles/*.toml) and the decode plan a profile gives for one output size.

A profile is data: per-size decode settings copied from the reference `config_infer_*g_*.json` files, and a
fallback rule for sizes missing from its table. On GPU profiles, sizes missing from the table are planned by the
memory planner (`maisi_cli.decode_plan.plan_decode`) when the caller passes the model spec. No torch and no engine
here (`maisi --help` and shell completion read the profiles): `auto`, which asks the GPU, is resolved by
`maisi_cli.engine.memory.resolve_profile`.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maisi_cli import plugins
from maisi_cli.config import Triple, format_triple
from maisi_cli.decode_plan import DecodePlan, fallback_roi, make_decode_plan, plan_decode
from maisi_cli.errors import MaisiError, UsageError, first_validation_problem
from maisi_cli.levers import Levers, effective_levers
from maisi_cli.io.documents import read_document

PROFILE_NAMES = ("16g", "24g", "32g", "80g", "cpu")


class DecodeEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    size: Triple
    roi: Triple
    overlap: float = Field(ge=0.0, lt=1.0)
    tp_splits: int = Field(ge=1)
    source: str | None = None


class FallbackRule(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_roi_latent_voxels: int = Field(ge=16**3)
    overlap: float = Field(ge=0.0, lt=1.0)
    tp_splits: int = Field(ge=1)


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    device: Literal["cuda", "cpu"]
    memory_gb: float | None = None
    precision: Literal["fp32", "fp16", "bf16"]
    decode: tuple[DecodeEntry, ...] = ()
    fallback: FallbackRule
    levers: Levers = Levers()  # GPU speed levers (maisi_cli/levers.py), all off unless the profile's [levers] says
    path: str = ""

    @property
    def budget_bytes(self) -> int | None:
        """The GPU memory the planner may use: `memory_gb` read as GiB (as nvidia-smi and torch report)."""
        return int(self.memory_gb * 1024**3) if self.device == "cuda" and self.memory_gb else None

    def decode_plan(self, latent_spatial: Triple, image_size: Triple, split_axis: int = 1,
                    spec=None) -> DecodePlan:
        """The table entry for this image size (the released settings, exact); else, on a GPU profile given the
        model `spec`, the memory planner's fastest plan that fits `memory_gb` (`maisi_cli.decode_plan`); else
        the fallback rule (the cpu profile, or a caller without a spec). `split_axis` is the VAE's `dim_split`.

        Levers (the profile's `[levers]`, or MAISI_LEVERS): `decode_plan = "planner"` skips the table (the planner's
        fastest plan within the budget, at the planner's smallest overlap); `decode_overlap` replaces the overlap of
        whichever plan is chosen (its window count follows), and the rule says so."""
        levers, source = effective_levers(self.levers, self.name)
        overlap = levers.decode_overlap
        note = "" if overlap is None else f", overlap {overlap:g} from {source}"
        use_table = levers.decode_plan == "table"
        for entry in self.decode if use_table else ():
            if entry.size == image_size:
                return make_decode_plan(latent_spatial, entry.roi, entry.overlap if overlap is None else overlap,
                                        entry.tp_splits, split_axis,
                                        rule=f"{self.name} table ({entry.source or format_triple(entry.size)}){note}")
        if spec is not None and self.budget_bytes and tuple(spec.latent_shape(image_size)[1:]) == tuple(latent_spatial):
            chosen = plan_decode(spec, image_size, self.budget_bytes, rois=[e.roi for e in self.decode],
                                 min_overlap=self.fallback.overlap if overlap is None else overlap,
                                 rule=f"{self.name} planner (fits {self.memory_gb:g} GiB)"
                                      + ("" if use_table else f", decode_plan from {source}") + note)
            if overlap is None or chosen.plan.overlap == overlap:
                return chosen.plan
            # the planner's overlaps are a fixed list; the lever's value is kept as given (memory does not depend on it)
            return make_decode_plan(latent_spatial, chosen.plan.roi, overlap, chosen.plan.requested_tp_splits,
                                    split_axis, rule=chosen.plan.rule)
        roi = fallback_roi(latent_spatial, self.fallback.max_roi_latent_voxels)
        return make_decode_plan(latent_spatial, roi, self.fallback.overlap if overlap is None else overlap,
                                self.fallback.tp_splits, split_axis,
                                rule=f"{self.name} fallback (at most {self.fallback.max_roi_latent_voxels} latent "
                                     f"voxels){note}")


# --- loading -----------------------------------------------------------------------------------------------------
def builtin_profile_dir() -> Path:
    """`maisi_cli/_profiles` in an installed wheel; the repository's `profiles/` in a source checkout."""
    packaged = Path(__file__).parent / "_profiles"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "profiles"


def profile_dirs() -> list[Path]:
    extra = [Path(p).expanduser() for p in os.environ.get("MAISI_PROFILE_PATH", "").split(os.pathsep) if p]
    return [*extra, builtin_profile_dir()]


def read_profile(path: Path) -> Profile:
    data = read_document(path, "--profile", kind="toml")
    try:
        return Profile.model_validate({**data, "path": str(path)})
    except ValidationError as error:
        where, problem = first_validation_problem(error)
        raise UsageError(f"--profile: '{path}' field '{where}': {problem}") from None


@cache
def _profiles_in(directories: tuple[Path, ...]) -> dict[str, Profile]:
    found: dict[str, Profile] = {}
    for directory in reversed(directories):  # earlier folders (MAISI_PROFILE_PATH) win
        for path in sorted(directory.glob("*.toml")):
            profile = read_profile(path)
            found[profile.name] = profile
    return found


def _merge_plugin_profiles(found: list) -> dict[str, Profile]:
    """The profiles plugins add (`maisi.profiles`: .toml paths or dicts); a name maisi ships is refused."""
    owner = {name: "maisi" for name in ("auto", *_profiles_in((builtin_profile_dir(),)))}

    def parse(record, item) -> Profile:
        try:
            if isinstance(item, dict):
                return Profile.model_validate({**item, "path": f"plugin {record.plugin}"})
            return read_profile(Path(str(item)))
        except ValidationError as error:
            where, problem = first_validation_problem(error)
            raise ValueError(f"profile field '{where}': {problem}") from None
        except MaisiError as error:
            raise ValueError(str(error).removeprefix("--profile: ")) from None

    return plugins.merge_named(found, owner, "profiles (.toml paths or dicts)", parse,
                               lambda profile: (profile.name,), noun="profile")


def _all_profiles() -> dict[str, Profile]:
    """Profile folders (MAISI_PROFILE_PATH first, then maisi's own), then plugin profiles under names still free."""
    found = dict(_profiles_in(tuple(profile_dirs())))
    for name, profile in plugins.registry("profiles", _merge_plugin_profiles).items():
        found.setdefault(name, profile)
    return found


def list_profiles() -> list[Profile]:
    return list(_all_profiles().values())


def get_profile(name_or_path: str) -> Profile:
    """A profile by name or a TOML path. `auto` is resolved by `resolve_profile`."""
    if name_or_path.endswith(".toml"):
        return read_profile(Path(name_or_path).expanduser())
    profiles = _profiles_in(tuple(profile_dirs()))
    if name_or_path not in profiles:  # plugins are read only for a name that no profile folder holds
        profiles = _all_profiles()
    if name_or_path not in profiles:
        known = ", ".join(["auto", *sorted(profiles)])
        raise UsageError(f"--profile: unknown profile '{name_or_path}'; known: {known} (or a .toml file)")
    return profiles[name_or_path]


def pick_gpu_profile(free_bytes: int) -> Profile:
    """The largest GPU profile whose memory class fits the free memory (cards report a little under nominal,
    so half a GB of slack), else the smallest GPU profile."""
    gpu = sorted((p for p in list_profiles() if p.device == "cuda" and p.memory_gb), key=lambda p: p.memory_gb)
    if not gpu:
        raise UsageError("--profile auto: no GPU profile is installed; name one with --profile")
    fitting = [p for p in gpu if p.memory_gb <= free_bytes / 1e9 + 0.5]
    return fitting[-1] if fitting else gpu[0]


def auto_gpu_profile(free_bytes: int) -> Profile:
    """`auto` on a GPU: the profile `pick_gpu_profile` chooses (its table rows stay exact), with the planner's
    budget set to the memory actually free, so sizes missing from its table are planned for this card."""
    profile = pick_gpu_profile(free_bytes)
    return profile.model_copy(update={"memory_gb": round(free_bytes / 1024**3, 2),
                                      "description": f"{profile.description} (auto: {free_bytes / 1024**3:.1f} GiB free)"})

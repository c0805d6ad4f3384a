"""maisi-mr: a maisi plugin adding the MR models of MAISI v2 (NVIDIA-Medtech/NV-Generate-CTMR).

Every object here is data for maisi's registries; nothing imports torch. maisi validates what it gets (model specs
against its `_target_` allow-list) and refuses any name it already has.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__version__ = "0.1.0"

HERE = Path(str(resources.files("maisi_mr")))

# The codes NV-Generate-CTMR's configs/modality_mapping.json adds to the 13 of MAISI v1 (those are built into maisi).
MODALITIES = {
    "mri_t1c": 17,
    "mri_swi": 20,
    "mri_t1_skull_stripped": 29,
    "mri_t2_skull_stripped": 30,
    "mri_flair_skull_stripped": 31,
    "mri_swi_skull_stripped": 32,
    "mri_mra_skull_stripped": 33,
}


def models() -> list[Path]:
    """maisi.models: the spec files of rflow-mr and rflow-mr-brain."""
    return sorted((HERE / "models").glob("*.json"))


# NV-Generate-CTMR configs/label_dict_ctmr.json (commit 9225a29, 348 names, ids 1..345 and 401..403), kept as
# upstream spells it; body is 500 in the CT-MR vocabulary (its 200 is "left mandible"), added here as maisi adds
# body 200 to its own table.
CTMR_TABLE = "label_dict_ctmr.json"
CTMR_BODY = 500
# The CT-MR ids past MAISI's 132 that fit maisi's uint8 label maps and stop before body 200: added to maisi's own
# dictionary, so that `maisi labels` and --anatomy know their names without --model.
EXTRA_CT_IDS = range(133, 200)


def ctmr_labels() -> dict[str, int]:
    """The CT-MR label dictionary of MAISI v2: anatomy name → id, body = 500."""
    return {**json.loads((HERE / CTMR_TABLE).read_text()), "body": CTMR_BODY}


def labels() -> dict[str, int | dict[str, int]]:
    """maisi.labels: ids 133..199 of the CT-MR dictionary for maisi's own, and the whole CT-MR dictionary as the
    table "ctmr" (the MR specs name it by `label_dictionary`)."""
    table = ctmr_labels()
    return {**{name: ident for name, ident in table.items() if ident in EXTRA_CT_IDS}, "ctmr": table}


def profiles() -> list[Path]:
    """maisi.profiles: the MR decode profile."""
    return sorted((HERE / "profiles").glob("*.toml"))

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


def labels() -> dict[str, int]:
    """maisi.labels: ids 133..199 of NV-Generate-CTMR's configs/label_dict_ctmr.json (MAISI v2's label vocabulary
    past the 132 of v1; its ids from 200 on do not fit maisi's uint8 label maps or collide with body = 200)."""
    return json.loads((HERE / "labels.json").read_text())


def profiles() -> list[Path]:
    """maisi.profiles: the MR decode profile."""
    return sorted((HERE / "profiles").glob("*.toml"))

"""Body regions from the labels present (reference `get_body_region_index_from_mask`): 0 head/neck (brain, skull),
1 chest (lung lobes), 2 abdomen (liver, spleen, pancreas, kidneys), 3 pelvis/lower (femurs)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from maisi_cli.errors import MaskError

REGION_LABELS = ({22, 120}, {28, 29, 30, 31, 32}, {1, 2, 3, 4, 5, 14}, {93, 94})


def region_span(present: Iterable[int]) -> tuple[int, int] | None:
    """(top, bottom): the lowest and highest region with a landmark label present; None without any."""
    labels = set(present)
    regions = [i for i, region in enumerate(REGION_LABELS) if labels & region]
    return (min(regions), max(regions)) if regions else None


def region_one_hots(present: Iterable[int]) -> dict[str, list[int]]:
    """The database/datalist fields top_region_index / bottom_region_index; empty without a landmark."""
    span = region_span(present)
    if span is None:
        return {}
    return {"top_region_index": [int(i == span[0]) for i in range(4)],
            "bottom_region_index": [int(i == span[1]) for i in range(4)]}


def body_region_indices(label_map: np.ndarray) -> tuple[int, int]:
    """(top, bottom) for a label map, or a MaskError when it has no landmark (ddpm models need one)."""
    span = region_span(np.unique(label_map).tolist())
    if span is None:
        raise MaskError(
            "--mask: no body-region landmark in the mask (brain/skull, lung lobes, abdominal organs or femurs); "
            "ddpm models need one to set the body-region inputs"
        )
    return span

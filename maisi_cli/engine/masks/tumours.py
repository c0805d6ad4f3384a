"""The unconditional mask of tumour-presence guidance: the label map with every tumour replaced by its host organ.

Follows NV-Generate-CTMR `scripts/augmentation.py::remove_tumors` called without pseudo labels, in its current form
(the one that also maps the kidney cysts; the stored older version at commit 2cb90dd lacked 116/117), as
`scripts/infer_image_from_mask.py::ldm_conditional_sample_one_image_from_mask` calls it when `cfg_guidance_scale > 0`:
once per sample, on the label ids (before bit-planing), on the output grid the ControlNet sees.

Upstream's rules, in order:
- organ tumours to their organ: 26 hepatic tumour -> 1 liver, 24 pancreatic tumour -> 4 pancreas, 27 colon cancer
  primaries -> 62 colon, 116 left kidney cyst -> 14 left kidney, 117 right kidney cyst -> 5 right kidney;
- 23 lung tumour -> one lung lobe (28-32) for every lung-tumour voxel of the volume: the most frequent lobe among the
  voxels of a 3x3x3 dilation of the tumour mask, the tumour itself excluded (`remove_tumors_majority_vote`);
- brain tumours 176 (generic), 401 NCR/NETC, 402 ED, 403 ET -> 22 brain (401-403 exist only in the CT-MR label
  dictionary, so only in uint16 maps);
- 128 bone lesion stays: upstream replaces it only from pseudo labels, which its inference path never passes.

Decisions where upstream is ambiguous or odd (each has a test in tests/unit/test_remove_tumours.py):
- upstream dilates with MONAI `dilate(..., pad_value=1.0)`, so the volume's outermost voxel layer always belongs to
  the "neighbourhood": lobe voxels on the volume's faces vote too, wherever the tumour is. Kept for parity (the
  ControlNet's training also removed tumours with this function);
- one vote for all lung tumours together, not one per tumour (upstream's single `torch.mode`);
- ties go to the lowest lobe id, as `torch.mode` on the CPU (on CUDA its tie rule is unspecified);
- no lobe in the neighbourhood: the most frequent lobe of the whole volume (ties: lowest id); no lobe anywhere: 28,
  upstream's argmax over five zero counts.

Cost at 512³: a copy, then slab by slab one comparison per tumour id, and the lung vote only inside the lung tumours'
bounding box (plus the six faces); no float or int64 copy of the volume.
"""

from __future__ import annotations

import numpy as np

ORGAN_TUMOURS = {26: 1, 24: 4, 27: 62, 116: 14, 117: 5}  # hepatic, pancreatic, colon primaries, L/R kidney cysts
BRAIN_TUMOURS = {176: 22, 401: 22, 402: 22, 403: 22}  # brain tumour, BraTS NCR/NETC, ED, ET -> brain
LUNG_TUMOUR = 23
LUNG_LOBES = (28, 29, 30, 31, 32)  # left upper, left lower, right upper, right middle, right lower
SLAB_VOXELS = 1 << 23  # work in slabs along X of about 8 M voxels: the comparisons' temporaries stay small


def remove_tumours(labels: np.ndarray) -> np.ndarray:
    """A new label map (same shape and dtype) with every tumour replaced by upstream's rules; a copy even when the
    map has no tumour. `labels`: a uint8 (MAISI ids) or uint16 (CT-MR ids up to 500) (X, Y, Z) array."""
    check_label_map(labels)
    removed = labels.copy()
    replacements = {t: o for t, o in {**ORGAN_TUMOURS, **BRAIN_TUMOURS}.items() if t <= np.iinfo(labels.dtype).max}
    for slab in slabs(removed):
        for tumour, organ in replacements.items():
            slab[slab == tumour] = organ  # organ ids are never tumour ids: the order does not matter
    fill_lung_tumours(removed)
    return removed


def check_label_map(labels: np.ndarray) -> None:
    if labels.ndim != 3 or labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"need a uint8 or uint16 (X, Y, Z) label map, got {labels.dtype} of shape {labels.shape}")


def slabs(labels: np.ndarray):
    """Views of consecutive X slabs of about SLAB_VOXELS voxels (writing one writes `labels`)."""
    step = max(1, SLAB_VOXELS // max(1, labels.shape[1] * labels.shape[2]))
    for start in range(0, labels.shape[0], step):
        yield labels[start:start + step]


def count_values(labels: np.ndarray, values) -> dict[int, int]:
    """Voxels equal to each of a few values; one comparison per value and slab (np.bincount would make an intp copy
    of every slab and took three times as long at 512³)."""
    counts = dict.fromkeys(values, 0)
    for slab in slabs(labels):
        for value in counts:
            counts[value] += int(np.count_nonzero(slab == value))
    return counts


# ----- lung tumour: majority vote of the lobes around it -----


def fill_lung_tumours(labels: np.ndarray) -> None:
    """Every lung-tumour voxel (in place) to the one lobe upstream's vote picks."""
    box = grown_bounding_box(labels, LUNG_TUMOUR)
    if box is None:
        return
    crop = labels[box]  # a view: writing the tumour voxels writes `labels`
    tumour = crop == LUNG_TUMOUR
    votes = lobe_votes(crop[ring_without_faces(tumour, box, labels.shape)]) + face_lobe_votes(labels)
    if not votes.any():
        votes = np.array(list(count_values(labels, LUNG_LOBES).values()))  # upstream's fallback: the whole volume
    crop[tumour] = LUNG_LOBES[int(np.argmax(votes))]  # argmax takes the first maximum: the lowest lobe id


def lobe_votes(values: np.ndarray) -> np.ndarray:
    """Counts of each lobe (28..32) among `values`."""
    return np.bincount(values.reshape(-1), minlength=256)[LUNG_LOBES[0]:LUNG_LOBES[-1] + 1]


def grown_bounding_box(labels: np.ndarray, value: int) -> tuple[slice, slice, slice] | None:
    """The bounding box of the voxels equal to `value`, one voxel wider on each side (clipped to the volume);
    None when there is none."""
    hit_x = np.zeros(labels.shape[0], dtype=bool)
    hit_y = np.zeros(labels.shape[1], dtype=bool)
    hit_z = np.zeros(labels.shape[2], dtype=bool)
    start = 0
    for slab in slabs(labels):
        found = slab == value
        if found.any():
            hit_x[start:start + len(slab)] = found.any(axis=(1, 2))
            hit_y |= found.any(axis=(0, 2))
            hit_z |= found.any(axis=(0, 1))
        start += len(slab)
    if not hit_x.any():
        return None
    return tuple(grown_span(hit, size) for hit, size in zip((hit_x, hit_y, hit_z), labels.shape))


def grown_span(hit: np.ndarray, size: int) -> slice:
    where = np.flatnonzero(hit)
    return slice(max(0, int(where[0]) - 1), min(size, int(where[-1]) + 2))


def ring_without_faces(tumour: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The 3x3x3 dilation of `tumour` minus the tumour, inside the box, without the voxels on the volume's faces
    (face_lobe_votes counts those, so each voxel votes once)."""
    ring = dilate_cube(tumour) & ~tumour
    for axis, (span, size) in enumerate(zip(box, shape)):
        edge = [slice(None)] * 3
        if span.start == 0:
            edge[axis] = 0
            ring[tuple(edge)] = False
        if span.stop == size:
            edge[axis] = -1
            ring[tuple(edge)] = False
    return ring


def dilate_cube(mask: np.ndarray) -> np.ndarray:
    """Dilation by the 3x3x3 cube (26-neighbourhood), zero outside: one 3-voxel segment per axis in turn."""
    grown = mask
    for axis in range(3):
        grown = grow_along(grown, axis)
    return grown


def grow_along(mask: np.ndarray, axis: int) -> np.ndarray:
    lead = [slice(None)] * 3
    lag = [slice(None)] * 3
    lead[axis] = slice(1, None)
    lag[axis] = slice(None, -1)
    grown = mask.copy()
    grown[tuple(lead)] |= mask[tuple(lag)]
    grown[tuple(lag)] |= mask[tuple(lead)]
    return grown


def face_lobe_votes(labels: np.ndarray) -> np.ndarray:
    """Lobe counts on the volume's outermost voxel layer, each voxel once. Upstream pads its dilation with ones
    (MONAI `dilate(..., pad_value=1.0)`), which puts this whole layer in every tumour's neighbourhood."""
    size_x, size_y, size_z = labels.shape
    inner_x = slice(1, size_x - 1)
    faces = [labels[x] for x in sorted({0, size_x - 1})]
    faces += [labels[inner_x, y] for y in sorted({0, size_y - 1})]
    faces += [labels[inner_x, 1:size_y - 1, z] for z in sorted({0, size_z - 1})]
    votes = np.zeros(len(LUNG_LOBES), dtype=np.int64)
    for face in faces:
        votes += lobe_votes(face)
    return votes

"""Synthetic CT phantoms: a torso with organs, spine and ribs as a label map in the label-dictionary ids, and a CT in
HU drawn around the QC statistics, so the project can train and test without downloading anything.

Frame. The anatomy is defined in millimetres in a phantom frame whose axes are RAS: +x towards the patient's right,
+y anterior, +z towards the head. The requested grid is centred on the frame's origin (voxel centres at
(i − (n − 1)/2)·spacing, the affine is diagonal), so array axis 0 runs from the patient's left (index 0) to right,
axis 1 from posterior to anterior, axis 2 from feet to head. The phantom's natural extent is `FIELD_OF_VIEW_MM`
(384 mm) on every axis: a 64³ grid at 6 mm and a 256³ grid at 1.5 mm show the same anatomy; a smaller field of
view (64³ at 4 mm) shows its centre.

Anatomy. An elliptical torso (body 200: skin, a fat layer and muscle as HU zones, air outside) holds five lung lobes
above a two-domed diaphragm, liver, stomach, spleen, pancreas, both kidneys, the aorta, vertebrae T1–L5 and twelve
ribs a side; optionally a hepatic tumour inside the liver and a lung tumour inside one lobe. Organs are
superellipsoids deformed by low-frequency fields (`Blob`), all drawn from the phantom's seed: global size (±6 %),
position and in-plane rotation, per-organ size (±15 %), position and orientation. Every random field is a function
of millimetres, never of voxels, and the noise is drawn last, so the seed fixes the anatomy whatever the grid.

Intensities. Each tissue gets a HU value drawn inside a range that keeps the organ medians well within the
`maisi qc` thresholds (liver, spleen, pancreas, kidney, lung, bone), plus a mid-frequency texture, a smooth
multiplicative and additive bias field inside the body and Gaussian noise; clipped to [−1000, 1000], int16.

numpy only (no torch, Typer or rich): `maisi data phantoms` runs without loading torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from maisi_cli.engine.masks.regions import region_one_hots
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.seeds import derive_sample_seed
from maisi_cli.errors import MaisiError, OutputError
from maisi_cli.io.datalists import write_datalist
from maisi_cli.io.nifti import read_nifti, write_nifti
from maisi_cli.labels import BODY_LABEL, label_dictionary

FIELD_OF_VIEW_MM = 384.0  # the phantom's natural extent on each axis
DATALIST = "datalist.json"
FOLDS = 5


class PhantomError(MaisiError):
    """A phantom cannot be made (the grid does not fit in memory)."""

# --- labels (looked up by name in the label dictionary) -----------------------------------------------------------


def _ids(*names: str) -> tuple[int, ...]:
    table = label_dictionary()
    return tuple(table[name] for name in names)


LIVER, SPLEEN, PANCREAS, RIGHT_KIDNEY, LEFT_KIDNEY, AORTA, STOMACH = _ids(
    "liver", "spleen", "pancreas", "right kidney", "left kidney", "aorta", "stomach")
LUNG_LOBES = _ids("left lung upper lobe", "left lung lower lobe", "right lung upper lobe", "right lung middle lobe",
                  "right lung lower lobe")
LEFT_UPPER, LEFT_LOWER, RIGHT_UPPER, RIGHT_MIDDLE, RIGHT_LOWER = LUNG_LOBES
HEPATIC_TUMOUR, LUNG_TUMOUR = _ids("hepatic tumor", "lung tumor")
# Vertebrae from the lowest (L5) to the highest (T1): the phantom's spine, level 0 at the bottom.
VERTEBRAE = _ids(*(f"vertebrae L{i}" for i in range(5, 0, -1)), *(f"vertebrae T{i}" for i in range(12, 0, -1)))
LEFT_RIBS = _ids(*(f"left rib {i}" for i in range(1, 13)))
RIGHT_RIBS = _ids(*(f"right rib {i}" for i in range(1, 13)))

ORGANS = (LIVER, SPLEEN, PANCREAS, RIGHT_KIDNEY, LEFT_KIDNEY, AORTA, STOMACH, *LUNG_LOBES)
PHANTOM_LABELS = frozenset({BODY_LABEL, *ORGANS, *VERTEBRAE, *LEFT_RIBS, *RIGHT_RIBS})

# --- tissues: what the image shows (labels say what it is) --------------------------------------------------------
(AIR, SKIN, FAT, MUSCLE, INTERIOR, HEART, LUNG, LIVER_T, SPLEEN_T, PANCREAS_T, KIDNEY_T, AORTA_T, STOMACH_T, GAS,
 CORTICAL, CANCELLOUS, POSTERIOR, RIB, DISC, CANAL, LIVER_TUMOUR_T, LUNG_TUMOUR_T) = range(22)
# HU drawn uniformly in [low, high] per phantom; with the bias fields (≤ 2.5 % of HU + 1000, ≤ 8 HU) every organ
# median stays inside the QC thresholds (reference-inference.md §12.2), at least 40 HU from either end.
TISSUE_HU: dict[int, tuple[float, float]] = {
    AIR: (-1000, -1000), SKIN: (10, 40), FAT: (-115, -85), MUSCLE: (35, 60), INTERIOR: (-5, 35), HEART: (30, 50),
    LUNG: (-870, -820), LIVER_T: (65, 115), SPLEEN_T: (75, 125), PANCREAS_T: (45, 95), KIDNEY_T: (110, 180),
    AORTA_T: (140, 260), STOMACH_T: (5, 35), GAS: (-990, -920), CORTICAL: (600, 850), CANCELLOUS: (160, 260),
    POSTERIOR: (350, 550), RIB: (350, 550), DISC: (70, 110), CANAL: (10, 35), LIVER_TUMOUR_T: (15, 60),
    LUNG_TUMOUR_T: (-10, 50),
}
# Amplitude (HU) of the mid-frequency texture per tissue (mesentery and bowel in the interior, lung parenchyma).
TISSUE_TEXTURE = {INTERIOR: 45.0, LUNG: 25.0, FAT: 8.0, MUSCLE: 5.0, LIVER_T: 6.0, SPLEEN_T: 6.0, KIDNEY_T: 10.0,
                  PANCREAS_T: 8.0, STOMACH_T: 8.0, HEART: 5.0}


# --- seeds and grids ----------------------------------------------------------------------------------------------
def default_spacing(size: Sequence[int]) -> tuple[float, float, float]:
    """The spacing that shows the whole phantom: the 384 mm field of view over the size, per axis."""
    return tuple(round(FIELD_OF_VIEW_MM / n, 6) for n in size)  # type: ignore[return-value]


@dataclass(frozen=True)
class Grid:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def axis(self, i: int) -> np.ndarray:
        """World coordinates (mm) of the voxel centres along axis `i`, centred on 0."""
        n = self.size[i]
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * float(self.spacing[i])

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*map(float, self.spacing), 1.0])
        affine[:3, 3] = [float(self.axis(i)[0]) for i in range(3)]
        return affine


# --- shapes -------------------------------------------------------------------------------------------------------
def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rz(yaw) · Ry(pitch) · Rx(roll), angles in degrees; columns are the rotated x, y, z axes."""
    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Waves:
    """A low-frequency random field Σ amplitude·sin(k·(p − origin) + phase), a function of millimetres."""
    vectors: tuple[tuple[float, float, float], ...]  # rad/mm
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]

    def __call__(self, dx, dy, dz):
        total = 0.0
        for (kx, ky, kz), amplitude, phase in zip(self.vectors, self.amplitudes, self.phases):
            total = total + amplitude * np.sin(kx * dx + ky * dy + (kz * dz + phase))
        return total

    @property
    def bound(self) -> float:
        return float(sum(abs(a) for a in self.amplitudes))


def draw_waves(rng: np.random.Generator, wavelength: tuple[float, float], amplitude: float, terms: int = 3) -> Waves:
    """`terms` plane waves in random directions with wavelengths in `wavelength` (mm); amplitudes sum to at most
    `amplitude`."""
    directions = rng.normal(size=(terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lengths = rng.uniform(*wavelength, size=terms)
    weights = rng.uniform(0.4, 1.0, size=terms)
    phases = rng.uniform(0, 2 * math.pi, size=terms)
    vectors = directions * (2 * math.pi / lengths)[:, None]
    return Waves(tuple(tuple(float(v) for v in row) for row in vectors),
                 tuple(float(a) for a in amplitude * weights / terms), tuple(float(p) for p in phases))


@dataclass(frozen=True)
class Blob:
    """A superellipsoid in the phantom frame (mm), deformed by a low-frequency field: inside where
    (|u/a|^p + |v/b|^p + |w/c|^p)^(1/p) < 1 + waves(p − centre), (u, v, w) the offset in the blob's own axes."""
    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    rotation: tuple[tuple[float, ...], ...]  # 3×3, columns are the blob's axes in the phantom frame
    power: float
    waves: Waves

    @property
    def radius(self) -> float:
        """A bound of the blob's extent from its centre (mm)."""
        corner = 3 ** max(0.0, 0.5 - 1.0 / self.power)
        return max(self.axes) * (1.0 + self.waves.bound) * corner

    def level(self, x, y, z):
        """< 0 inside, > 0 outside (normalised radius minus the deformed boundary), broadcast over x, y, z."""
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        total = 0.0
        for column, semi in enumerate(self.axes):
            r0, r1, r2 = (self.rotation[row][column] for row in range(3))
            u = (r0 / semi) * dx + (r1 / semi) * dy + (r2 / semi) * dz
            total = total + (u * u if self.power == 2.0 else np.abs(u) ** self.power)
        radius = np.sqrt(total) if self.power == 2.0 else total ** (1.0 / self.power)
        return radius - 1.0 - self.waves(dx, dy, dz)

    def point(self, offset: Sequence[float]) -> tuple[float, float, float]:
        """The phantom-frame point at `offset` (fractions of the semi-axes, in the blob's axes)."""
        local = np.asarray(offset, dtype=float) * np.asarray(self.axes)
        return tuple(float(v) for v in np.asarray(self.centre) + np.asarray(self.rotation) @ local)  # type: ignore


def draw_blob(rng: np.random.Generator, centre: Sequence[float], axes: Sequence[float], scale: float,
              base: tuple[float, float, float] = (0.0, 0.0, 0.0), turn: float = 10.0, shift: float = 6.0,
              size: float = 0.15, power: float = 2.0, roughness: float = 0.08) -> Blob:
    """An organ at its typical `centre` and semi-`axes` (mm, before the phantom's global `scale`), with the seed's
    variation: position ± `shift` mm, each semi-axis ± `size`, orientation `base` (yaw, pitch, roll) ± `turn`°."""
    position = np.asarray(centre, dtype=float) * scale + rng.uniform(-shift, shift, 3)
    semi = np.asarray(axes, dtype=float) * scale * rng.uniform(1 - size, 1 + size, 3)
    angles = np.asarray(base, dtype=float) + rng.uniform(-turn, turn, 3)
    return _blob(rng, position, semi, angles, power, roughness)


def draw_tumour(rng: np.random.Generator, centre: Sequence[float], radius: float) -> Blob:
    """A roundish lesion of about `radius` mm at `centre` (phantom frame, mm), in any orientation."""
    semi = radius * rng.uniform(0.8, 1.2, 3)
    return _blob(rng, np.asarray(centre, dtype=float), semi, rng.uniform(-180, 180, 3), 2.0, 0.1)


def _blob(rng: np.random.Generator, position: np.ndarray, semi: np.ndarray, angles: np.ndarray, power: float,
          roughness: float) -> Blob:
    waves = draw_waves(rng, (1.5 * float(semi.max()), 4.0 * float(semi.max())), roughness)
    matrix = rotation(*(float(a) for a in angles))
    return Blob(tuple(float(v) for v in position), tuple(float(v) for v in semi),
                tuple(tuple(float(v) for v in row) for row in matrix), float(power), waves)


# --- the anatomy's parameters -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Torso:
    lateral: float  # semi-axes (mm): left-right, anterior, posterior
    anterior: float
    posterior: float
    wobble: tuple[float, float, float, float]  # relative amplitude and phase of the z variation, wavelength, phase 2
    skin: float
    fat: float
    fat_variation: tuple[float, float]  # relative amplitude, angle of the thickest fat
    muscle: float

    def radii(self, z):
        """Semi-axes along z: (lateral, anterior, posterior)."""
        amplitude, phase, wavelength, phase2 = self.wobble
        a = 1.0 + amplitude * np.sin((2 * math.pi / wavelength) * z + phase)
        b = 1.0 + 0.7 * amplitude * np.sin((2 * math.pi / wavelength) * z + phase2)
        return self.lateral * a, self.anterior * b, self.posterior * b

    def depth(self, x, y, z):
        """Depth below the skin in mm along the ray from the torso's axis (negative outside the body)."""
        lateral, anterior, posterior = self.radii(z)
        x2, y2 = x * x, y * y
        front = np.where(y > 0, y2, 0.0)
        rho2 = x2 / (lateral * lateral) + front / (anterior * anterior) + (y2 - front) / (posterior * posterior)
        rho = np.sqrt(rho2)
        r = np.sqrt(x2 + y2)
        return np.where(rho > 1e-6, r / np.maximum(rho, 1e-6) - r, self.lateral)

    def fat_thickness(self, x, y):
        amplitude, angle = self.fat_variation
        return self.fat * (1.0 + amplitude * np.cos(np.arctan2(y, x) - angle))


@dataclass(frozen=True)
class Diaphragm:
    right: tuple[float, float]  # (x, height) of the right dome's top (mm)
    left: tuple[float, float]
    curvature: float  # radius of curvature (mm)
    recess: float  # how much lower the posterior recesses lie, per mm posterior

    def height(self, x, y):
        """z of the diaphragm under (x, y)."""
        spread = 1.0 / (2.0 * self.curvature)
        right = self.right[1] - ((x - self.right[0]) ** 2 + y * y) * spread
        left = self.left[1] - ((x - self.left[0]) ** 2 + y * y) * spread
        return np.maximum(right, left) + self.recess * np.minimum(y, 0.0)


@dataclass(frozen=True)
class Spine:
    bounds: tuple[float, ...]  # 18 level boundaries (z, ascending): L5 bottom … T1 top
    lateral: tuple[float, ...]  # body semi-axes per level
    depth: tuple[float, ...]
    disc: tuple[float, ...]  # disc thickness per level
    spinous: tuple[float, ...]  # spinous-process length per level
    transverse: tuple[float, ...]  # transverse-process length per level
    centre_y: float  # body centre (anterior-posterior) at the reference height
    kyphosis: float  # mm the thoracic spine bows backwards
    lordosis: float  # mm the lumbar spine bows forwards

    @property
    def thoracic_pitch(self) -> float:
        return (self.bounds[-1] - self.bounds[5]) / 12.0

    def level_centre(self, level: int) -> float:
        return 0.5 * (self.bounds[level] + self.bounds[level + 1])

    def body_y(self, z):
        thoracic = 0.5 * (self.bounds[5] + self.bounds[-1])
        lumbar = 0.5 * (self.bounds[0] + self.bounds[5])
        return (self.centre_y - self.kyphosis * np.exp(-(((z - thoracic) / 90.0) ** 2))
                + self.lordosis * np.exp(-(((z - lumbar) / 60.0) ** 2)))


@dataclass(frozen=True)
class Ribs:
    drop: float  # mm a rib descends from its head to its front end
    start: float  # angle (rad from the posterior midline) where the ribs begin
    ends: tuple[float, ...]  # angle where each rib 1..12 ends
    half_height: float
    half_thickness: float
    inset: float  # mm from the inner edge of the muscle to the rib's centre line


@dataclass(frozen=True)
class Aorta:
    x: float
    radius: float
    bottom: float
    top: float


@dataclass(frozen=True)
class Tumour:
    blob: Blob
    host: int  # the label it lies in


@dataclass(frozen=True)
class Anatomy:
    scale: float
    yaw: float  # degrees, rotation of the phantom about z
    shift: tuple[float, float, float]  # phantom origin in world mm
    torso: Torso
    diaphragm: Diaphragm
    heart: Blob
    lungs: tuple[Blob, Blob]  # right, left
    fissures: tuple[float, float, float, float]  # left oblique height, right oblique height, horizontal, slope
    mediastinum: tuple[float, float]  # x of its middle, half-width (mm): no lung there
    liver: tuple[Blob, Blob]  # right lobe, left lobe
    stomach: Blob
    gas: float  # the stomach's gas above this fraction of its anterior semi-axis
    spleen: Blob
    pancreas: Blob
    kidneys: tuple[Blob, Blob]  # right, left
    aorta: Aorta
    spine: Spine
    ribs: Ribs
    tumours: tuple[Tumour, ...] = ()


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """All shape parameters of one phantom, in mm, from `rng` alone (the same draws whatever the grid)."""
    s = float(rng.uniform(0.94, 1.06))

    def u(low: float, high: float) -> float:  # Python floats keep the grids in float32
        return float(rng.uniform(low, high))

    yaw = u(-5, 5)
    shift = (u(-8, 8), u(-8, 8), u(-10, 10))
    torso = Torso(lateral=158 * s * u(0.95, 1.05), anterior=115 * s * u(0.93, 1.07),
                  posterior=105 * s * u(0.95, 1.05),
                  wobble=(u(0.0, 0.04), u(0, 2 * math.pi), u(350, 700), u(0, 2 * math.pi)),
                  skin=2.0, fat=u(7, 20), fat_variation=(u(0.1, 0.4), u(0, 2 * math.pi)), muscle=u(10, 15))
    diaphragm = Diaphragm(right=(65 * s + u(-5, 5), s * (18 + u(-8, 8))), left=(-70 * s + u(-5, 5), s * (5 + u(-8, 8))),
                          curvature=150 * s * u(0.85, 1.15), recess=u(0.15, 0.35))
    heart = draw_blob(rng, (-20, 30, 28), (58, 48, 52), s, base=(-30, 0, 0))
    lungs = (draw_blob(rng, (70, -5, 95), (58, 88, 118), s, power=2.5, roughness=0.06),
             draw_blob(rng, (-70, -5, 95), (54, 85, 115), s, power=2.5, roughness=0.06))
    fissures = (s * (80 + u(-10, 10)), s * (70 + u(-10, 10)), s * (90 + u(-8, 8)), u(0.8, 1.1))
    mediastinum = (s * (-4 + u(-3, 3)), s * u(12, 16))
    liver = (draw_blob(rng, (62, 8, -40), (78, 85, 80), s, power=2.2),
             draw_blob(rng, (-10, 45, -5), (55, 38, 32), s, base=(10, 0, 0)))
    stomach = draw_blob(rng, (-52, 38, -32), (42, 36, 60), s, base=(0, 15, 0))
    gas = u(0.35, 0.7)
    spleen = draw_blob(rng, (-95, -35, -22), (26, 50, 46), s, base=(30, -15, 0))
    pancreas = draw_blob(rng, (-25, 30, -70), (65, 14, 12), s, base=(20, 15, 0), shift=4, roughness=0.1)
    kidneys = (draw_blob(rng, (72, -42, -112), (26, 22, 52), s, base=(-30, -12, 0)),
               draw_blob(rng, (-72, -40, -98), (26, 22, 52), s, base=(30, 12, 0)))

    thoracic, lumbar = 22 * s * u(0.95, 1.05), 28 * s * u(0.95, 1.05)
    junction = s * (-60 + u(-8, 8))  # T12/L1
    bounds = [junction - 5 * lumbar + i * lumbar for i in range(5)] + [junction + i * thoracic for i in range(13)]
    fraction = np.linspace(1.0, 0.0, 17)  # 1 at L5, 0 at T1
    spine = Spine(bounds=tuple(float(b) for b in bounds),
                  lateral=tuple(float(v) for v in s * (16 + 10 * fraction)),
                  depth=tuple(float(v) for v in s * (13 + 6 * fraction)),
                  disc=tuple(float(v) for v in 4 + 4 * fraction),
                  spinous=tuple(float(v) for v in s * (22 + 4 * fraction)),
                  transverse=tuple(float(v) for v in s * (22 + 6 * fraction)),
                  centre_y=s * (-25 + u(-4, 4)), kyphosis=u(3, 10), lordosis=u(2, 8))
    ribs = Ribs(drop=thoracic * u(3.4, 4.4), start=u(0.25, 0.32),
                ends=(2.45, 2.55, 2.65, 2.7, 2.7, 2.65, 2.55, 2.35, 2.15, 1.9, 1.5, 1.1),
                half_height=5.5 * s, half_thickness=3.5, inset=5.0)
    aorta = Aorta(x=s * (-14 + u(-4, 4)), radius=11 * s * u(0.9, 1.1), bottom=bounds[1], top=s * (120 + u(-10, 10)))
    anatomy = Anatomy(s, yaw, shift, torso, diaphragm, heart, lungs, fissures, mediastinum, liver, stomach, gas,
                      spleen, pancreas, kidneys, aorta, spine, ribs)

    # Tumour candidates are always drawn (so --tumours leaves the rest of the phantom unchanged); the first that
    # lies well inside its host, judged on the anatomy itself rather than on a grid, is kept.
    liver_candidates = [draw_tumour(rng, liver[0].point(_in_ball(rng, 0.6)), u(11, 22) * s) for _ in range(32)]
    lung_candidates = [draw_tumour(rng, lungs[int(rng.integers(2))].point(_in_ball(rng, 0.7)), u(8, 16) * s)
                       for _ in range(32)]
    tumours = (choose_tumour(anatomy, liver_candidates, (LIVER,)),
               choose_tumour(anatomy, lung_candidates, LUNG_LOBES))
    return replace(anatomy, tumours=tumours)


def _in_ball(rng: np.random.Generator, radius: float) -> np.ndarray:
    direction = rng.normal(size=3)
    return direction / np.linalg.norm(direction) * radius * float(rng.uniform()) ** (1 / 3)


def choose_tumour(anatomy: Anatomy, candidates: Sequence[Blob], hosts: Sequence[int]) -> Tumour:
    """The first candidate whose centre and six points at 0.7 of its radius carry one host label (and which lies
    within ±100 mm of the phantom's mid-height, so a 4 mm grid sees it); else the best-covered one."""
    offsets = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    points = np.concatenate([np.asarray(c.centre) + 0.7 * min(c.axes) * offsets for c in candidates])
    labels = labels_at(anatomy, points).reshape(len(candidates), len(offsets))
    best, best_score = 0, -1
    for number, (candidate, row) in enumerate(zip(candidates, labels)):
        host = int(row[0])
        score = int(np.sum(row == host)) if host in hosts else 0
        if abs(candidate.centre[2]) > 100:
            score -= len(offsets)
        if score == len(offsets):
            return Tumour(candidate, host)
        if score > best_score:
            best, best_score = number, score
    return Tumour(candidates[best], int(labels[best, 0]) if int(labels[best, 0]) in hosts else hosts[0])


# --- painting: the same code paints a grid (in boxes) or a list of points -----------------------------------------
class Canvas:
    """Labels and tissues at sample positions in the phantom frame. `region(lo, hi)` gives (index, x, y, z): an
    index into the canvas arrays and the coordinates there, broadcastable; None when nothing is inside."""
    labels: np.ndarray
    tissue: np.ndarray
    depth: np.ndarray
    inner: np.ndarray

    def region(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[Any, Any, Any, Any] | None:
        raise NotImplementedError

    def region_all(self) -> tuple[Any, Any, Any, Any]:
        raise NotImplementedError

    def paint(self, index, mask, label: int | np.ndarray | None, tissue: int | np.ndarray) -> None:
        if label is not None:
            target = self.labels[index]
            target[mask] = label if np.isscalar(label) else label[mask]
        target = self.tissue[index]
        target[mask] = tissue if np.isscalar(tissue) else tissue[mask]

    def paint_at(self, index, where: tuple[np.ndarray, ...], label: int | np.ndarray, tissue: int) -> None:
        """Paint the positions `where` (index arrays into the region `index`)."""
        self.labels[index][where] = label
        self.tissue[index][where] = tissue


class GridCanvas(Canvas):
    def __init__(self, grid: Grid, anatomy: Anatomy) -> None:
        self.grid = grid
        angle = math.radians(anatomy.yaw)
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.shift = anatomy.shift
        self.axes = [grid.axis(i) for i in range(3)]
        wx = (self.axes[0] - self.shift[0])[:, None]
        wy = (self.axes[1] - self.shift[1])[None, :]
        self.px = (self.cos * wx + self.sin * wy).astype(np.float32)  # (X, Y)
        self.py = (-self.sin * wx + self.cos * wy).astype(np.float32)
        self.pz = (self.axes[2] - self.shift[2]).astype(np.float32)  # (Z,)
        self.labels = np.zeros(grid.size, dtype=np.uint8)
        self.tissue = np.zeros(grid.size, dtype=np.uint8)

    def _coordinates(self, index):
        ix, iy, iz = index
        return self.px[ix, iy][:, :, None], self.py[ix, iy][:, :, None], self.pz[iz][None, None, :]

    def region_all(self):
        index = (slice(None), slice(None), slice(None))
        return (index, *self._coordinates(index))

    def region(self, lo, hi):
        corners = np.array([[x, y] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])], dtype=float)
        world_x = self.cos * corners[:, 0] - self.sin * corners[:, 1] + self.shift[0]
        world_y = self.sin * corners[:, 0] + self.cos * corners[:, 1] + self.shift[1]
        bounds = [(world_x.min(), world_x.max()), (world_y.min(), world_y.max()),
                  (lo[2] + self.shift[2], hi[2] + self.shift[2])]
        index = []
        for axis, (low, high) in zip(self.axes, bounds):
            start, stop = int(np.searchsorted(axis, low, "left")), int(np.searchsorted(axis, high, "right"))
            if start >= stop:
                return None
            index.append(slice(start, stop))
        index = tuple(index)
        return (index, *self._coordinates(index))


class PointCanvas(Canvas):
    def __init__(self, points: np.ndarray) -> None:
        self.x, self.y, self.z = (np.asarray(points[:, i], dtype=np.float64) for i in range(3))
        self.labels = np.zeros(len(points), dtype=np.uint8)
        self.tissue = np.zeros(len(points), dtype=np.uint8)

    def region_all(self):
        return slice(None), self.x, self.y, self.z

    def region(self, lo, hi):
        return self.region_all()


def blob_region(canvas: Canvas, blob: Blob):
    r = blob.radius
    return canvas.region([c - r for c in blob.centre], [c + r for c in blob.centre])


def paint_torso(canvas: Canvas, torso: Torso) -> None:
    """Body 200 everywhere inside the skin; tissue zones skin, fat, muscle and interior by depth."""
    index, x, y, z = canvas.region_all()
    depth = torso.depth(x, y, z).astype(np.float32)
    fat = torso.skin + torso.fat_thickness(x, y)
    muscle = fat + torso.muscle
    canvas.depth = depth
    canvas.inner = depth > muscle + 1.0
    body = depth > 0
    canvas.labels[body] = BODY_LABEL
    zone = (depth >= torso.skin).astype(np.uint8)
    zone += depth >= fat
    zone += depth >= muscle
    tissue = np.array([SKIN, FAT, MUSCLE, INTERIOR], dtype=np.uint8)[zone]
    tissue[~body] = AIR
    canvas.tissue[...] = tissue


def paint_organ(canvas: Canvas, blobs: Sequence[Blob], label: int, tissue: int, keep=None) -> None:
    """The union of `blobs`, inside the body's inner zone and where `keep(x, y, z)` holds."""
    for blob in blobs:
        found = blob_region(canvas, blob)
        if found is None:
            continue
        index, x, y, z = found
        mask = (blob.level(x, y, z) < 0) & canvas.inner[index]
        if keep is not None:
            mask &= keep(x, y, z)
        canvas.paint(index, mask, label, tissue)


def paint_lungs(canvas: Canvas, anatomy: Anatomy) -> None:
    """Both lungs above the diaphragm, outside the heart, split into lobes by the fissures: the oblique fissure
    (higher at the back) separates the lower lobes; on the right a horizontal one splits upper from middle."""
    left_height, right_height, horizontal, slope = anatomy.fissures
    for side, blob in zip(("right", "left"), anatomy.lungs):
        found = blob_region(canvas, blob)
        if found is None:
            continue
        index, x, y, z = found
        mask = (blob.level(x, y, z) < 0) & canvas.inner[index]
        mask &= z > anatomy.diaphragm.height(x, y) + 4.0
        mask &= anatomy.heart.level(x, y, z) > 0.05
        mask &= np.abs(x - anatomy.mediastinum[0]) > anatomy.mediastinum[1]
        oblique = z + slope * y
        lobe = np.uint8
        if side == "left":
            lobes = np.where(oblique > left_height, lobe(LEFT_UPPER), lobe(LEFT_LOWER))
        else:
            lobes = np.where(oblique < right_height, lobe(RIGHT_LOWER),
                             np.where(z > horizontal, lobe(RIGHT_UPPER), lobe(RIGHT_MIDDLE)))
        canvas.paint(index, mask, np.broadcast_to(lobes, mask.shape), LUNG)


def paint_stomach(canvas: Canvas, anatomy: Anatomy, below) -> None:
    blob = anatomy.stomach
    found = blob_region(canvas, blob)
    if found is None:
        return
    index, x, y, z = found
    mask = (blob.level(x, y, z) < 0) & canvas.inner[index] & below(x, y, z)
    # Supine: gas rises to the front (+y) of the stomach.
    front = blob.centre[1] + anatomy.gas * blob.axes[1]
    tissue = np.broadcast_to(np.where(y > front, np.uint8(GAS), np.uint8(STOMACH_T)), mask.shape)
    canvas.paint(index, mask, STOMACH, tissue)


def paint_aorta(canvas: Canvas, anatomy: Anatomy) -> None:
    """A tube in front of the vertebral bodies, from above the heart down to L4, narrowing towards the bottom."""
    aorta, spine = anatomy.aorta, anatomy.spine
    reach = aorta.radius + 40
    found = canvas.region([aorta.x - reach, spine.centre_y - 60, aorta.bottom], [aorta.x + reach, spine.centre_y + 90,
                                                                                   aorta.top])
    if found is None:
        return
    index, x, y, z = found
    bottom_fraction = np.clip((z - aorta.bottom) / max(aorta.top - aorta.bottom, 1.0), 0.0, 1.0)
    radius = aorta.radius * (0.8 + 0.2 * bottom_fraction)
    depth = np.asarray(spine.depth, dtype=np.float32)[np.clip(np.searchsorted(spine.bounds, z) - 1, 0, 16)]
    centre_y = spine.body_y(z) + depth + radius + 2.0
    mask = ((x - aorta.x) ** 2 + (y - centre_y) ** 2 < radius * radius) & (z > aorta.bottom) & (z < aorta.top)
    mask &= canvas.inner[index]
    canvas.paint(index, mask, AORTA, AORTA_T)


def paint_spine(canvas: Canvas, spine: Spine) -> None:
    """Vertebrae T1–L5 (one label each): body with cortical shell and cancellous core, discs between bodies, and
    posterior elements (ring around the spinal canal, spinous and transverse processes)."""
    reach = max(spine.transverse) + 16
    found = canvas.region([-reach, spine.centre_y - 110, spine.bounds[0]],
                          [reach, spine.centre_y + 60, spine.bounds[-1]])
    if found is None:
        return
    index, x, y, z = found
    bounds = np.asarray(spine.bounds)
    level = np.clip(np.searchsorted(bounds, z, side="right") - 1, 0, 16)
    valid = (z >= bounds[0]) & (z < bounds[-1])
    per_level = lambda values: np.asarray(values, dtype=np.float32)[level]  # noqa: E731
    pitch = (bounds[level + 1] - bounds[level]).astype(np.float32)
    w = z - (0.5 * (bounds[level] + bounds[level + 1])).astype(np.float32)
    a, b = per_level(spine.lateral), per_level(spine.depth)
    half = 0.5 * (pitch - per_level(spine.disc))
    yb = spine.body_y(z)
    ellipse = (x / a) ** 2 + ((y - yb) / b) ** 2
    column = (ellipse < 1) & valid
    body = column & (np.abs(w) < half)
    shell = 1.0 - 2.0 / np.minimum(a, b)
    cortical = body & ((ellipse > shell * shell) | (np.abs(w) > half - 1.5))
    yc = yb - b - 8.0
    canal = ((x / 8.0) ** 2 + ((y - yc) / 7.0) ** 2 < 1) & valid
    ring = ((x / 13.0) ** 2 + ((y - yc) / 11.0) ** 2 < 1) & (np.abs(w) < 0.36 * pitch)
    spinous = ((np.abs(x) < 3.5) & (y < yc - 9) & (y > yc - 9 - per_level(spine.spinous))
               & (np.abs(w + 0.1 * pitch) < 0.28 * pitch))
    transverse = ((np.abs(y - yc) < 5) & (np.abs(x) > 10) & (np.abs(x) < 10 + per_level(spine.transverse))
                  & (np.abs(w) < 0.22 * pitch))
    posterior = (ring | spinous | transverse) & valid & ~canal & ~body
    inside = canvas.depth[index] > 3.0
    ids = np.asarray(VERTEBRAE, dtype=np.uint8)[np.broadcast_to(level, body.shape)]
    canvas.paint(index, column & ~body & inside, BODY_LABEL, DISC)
    canvas.paint(index, canal & ~body & inside, BODY_LABEL, CANAL)
    canvas.paint(index, posterior & inside, ids, POSTERIOR)
    canvas.paint(index, body & inside, ids, np.where(cortical, np.uint8(CORTICAL), np.uint8(CANCELLOUS)))


def paint_ribs(canvas: Canvas, anatomy: Anatomy) -> None:
    """Twelve ribs a side: tubes in the muscle layer following the body wall from beside the spine forwards, rib k
    starting at vertebra Tk's height and descending by `drop` to its front end."""
    spine, ribs, torso = anatomy.spine, anatomy.ribs, anatomy.torso
    t1 = spine.level_centre(16)
    pitch = spine.thoracic_pitch
    found = canvas.region([-400, -400, t1 - 11 * pitch - ribs.drop - 10], [400, 400, t1 + 10])
    if found is None:
        return
    index, x, y, z = found
    # Only the thin shell of the body wall where ribs can be is looked at further.
    centre_depth = torso.skin + torso.fat_thickness(x, y) + torso.muscle - ribs.inset
    radial = canvas.depth[index] - centre_depth
    where = np.nonzero(np.abs(radial) < ribs.half_thickness)
    x, y, z = (np.broadcast_to(v, radial.shape)[where] for v in (x, y, z))
    radial = radial[where]
    angle = np.arctan2(np.abs(x), -y)  # 0 at the back, π at the front
    height = z + ribs.drop * (angle / math.pi) ** 1.3
    position = (t1 - height) / pitch + 1.0
    number = np.rint(position)
    dz = (number - position) * pitch
    k = np.clip(number, 1, 12).astype(np.int64) - 1
    rib = (number >= 1) & (number <= 12) & (angle >= ribs.start)
    rib &= angle <= np.asarray(ribs.ends, dtype=np.float32)[k]
    rib &= (dz / ribs.half_height) ** 2 + (radial / ribs.half_thickness) ** 2 < 1
    ids = np.where(x < 0, np.asarray(LEFT_RIBS, dtype=np.uint8)[k], np.asarray(RIGHT_RIBS, dtype=np.uint8)[k])
    canvas.paint_at(index, tuple(w[rib] for w in where), ids[rib], RIB)


def paint_tumour(canvas: Canvas, tumour: Tumour, label: int, tissue: int) -> None:
    found = blob_region(canvas, tumour.blob)
    if found is None:
        return
    index, x, y, z = found
    mask = (tumour.blob.level(x, y, z) < 0) & (canvas.labels[index] == tumour.host)
    canvas.paint(index, mask, label, tissue)


def paint_anatomy(canvas: Canvas, anatomy: Anatomy, tumours: bool = False) -> None:
    """Everything, in order (later parts win where they meet)."""
    below = lambda x, y, z: z < anatomy.diaphragm.height(x, y) - 4.0  # noqa: E731
    above = lambda x, y, z: z > anatomy.diaphragm.height(x, y)  # noqa: E731
    paint_torso(canvas, anatomy.torso)
    paint_organ(canvas, [anatomy.heart], BODY_LABEL, HEART, keep=above)
    paint_lungs(canvas, anatomy)
    paint_organ(canvas, anatomy.liver, LIVER, LIVER_T, keep=below)
    paint_stomach(canvas, anatomy, below)
    paint_organ(canvas, [anatomy.spleen], SPLEEN, SPLEEN_T, keep=below)
    paint_organ(canvas, [anatomy.pancreas], PANCREAS, PANCREAS_T, keep=below)
    paint_organ(canvas, [anatomy.kidneys[0]], RIGHT_KIDNEY, KIDNEY_T, keep=below)
    paint_organ(canvas, [anatomy.kidneys[1]], LEFT_KIDNEY, KIDNEY_T, keep=below)
    paint_aorta(canvas, anatomy)
    paint_spine(canvas, anatomy.spine)
    paint_ribs(canvas, anatomy)
    if tumours:
        for tumour in anatomy.tumours:
            label = HEPATIC_TUMOUR if tumour.host == LIVER else LUNG_TUMOUR
            paint_tumour(canvas, tumour, label, LIVER_TUMOUR_T if label == HEPATIC_TUMOUR else LUNG_TUMOUR_T)


def labels_at(anatomy: Anatomy, points: np.ndarray, tumours: bool = False) -> np.ndarray:
    """The label at each phantom-frame point (N, 3), without a grid."""
    canvas = PointCanvas(np.asarray(points, dtype=np.float64))
    paint_anatomy(canvas, anatomy, tumours)
    return canvas.labels


# --- intensities --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeparableField:
    """Σ_k a_k·cos(kx x + φx)·cos(ky y + φy)·cos(kz z + φz) / Σ a_k: smooth, in [−1, 1], a function of world
    mm, and cheap on a grid (one outer product per term); for the slowly varying bias fields."""
    frequencies: tuple[tuple[float, float, float], ...]
    phases: tuple[tuple[float, float, float], ...]
    weights: tuple[float, ...]

    def on(self, grid: Grid) -> np.ndarray:
        axes = [grid.axis(i) for i in range(3)]
        total = np.zeros(grid.size, dtype=np.float32)
        for freq, phase, weight in zip(self.frequencies, self.phases, self.weights):
            fx, fy, fz = (np.cos(f * a + p).astype(np.float32) for f, a, p in zip(freq, axes, phase))
            total += (weight * fx[:, None] * fy[None, :])[:, :, None] * fz[None, None, :]
        return total * np.float32(1.0 / sum(self.weights))


def draw_field(rng: np.random.Generator, wavelength: tuple[float, float], terms: int = 4) -> SeparableField:
    frequencies = 2 * math.pi / rng.uniform(*wavelength, size=(terms, 3))
    phases = rng.uniform(0, 2 * math.pi, size=(terms, 3))
    weights = rng.uniform(0.3, 1.0, size=terms)
    return SeparableField(tuple(tuple(float(v) for v in row) for row in frequencies),
                          tuple(tuple(float(v) for v in row) for row in phases), tuple(float(v) for v in weights))


@dataclass(frozen=True)
class WaveField:
    """Σ_k a_k·cos(k_k·p + φ_k) / Σ a_k over world mm: plane waves in random directions (no axis-aligned plaid),
    evaluated on a grid as cos(a + b) = cos a·cos b − sin a·sin b with a over (x, y) and b over z."""
    vectors: tuple[tuple[float, float, float], ...]
    phases: tuple[float, ...]
    weights: tuple[float, ...]

    def on(self, grid: Grid) -> np.ndarray:
        x, y, z = (grid.axis(i) for i in range(3))
        total = np.zeros(grid.size, dtype=np.float32)
        for (kx, ky, kz), phase, weight in zip(self.vectors, self.phases, self.weights):
            a = kx * x[:, None] + ky * y[None, :]
            b = kz * z + phase
            cos_a, sin_a = (weight * np.cos(a)).astype(np.float32), (weight * np.sin(a)).astype(np.float32)
            total += cos_a[:, :, None] * np.cos(b).astype(np.float32)[None, None, :]
            total -= sin_a[:, :, None] * np.sin(b).astype(np.float32)[None, None, :]
        return total * np.float32(1.0 / sum(self.weights))


def draw_wave_field(rng: np.random.Generator, wavelength: tuple[float, float], terms: int = 6) -> WaveField:
    directions = rng.normal(size=(terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    vectors = directions * (2 * math.pi / rng.uniform(*wavelength, size=terms))[:, None]
    return WaveField(tuple(tuple(float(v) for v in row) for row in vectors),
                     tuple(float(v) for v in rng.uniform(0, 2 * math.pi, size=terms)),
                     tuple(float(v) for v in rng.uniform(0.3, 1.0, size=terms)))


@dataclass(frozen=True)
class Intensities:
    hu: tuple[float, ...]  # per tissue
    texture: WaveField
    gain: SeparableField  # multiplicative, on HU + 1000
    gain_amplitude: float
    offset: SeparableField  # additive
    offset_amplitude: float
    noise: float  # Gaussian σ in HU


def draw_intensities(rng: np.random.Generator) -> Intensities:
    hu = [0.0] * len(TISSUE_HU)
    for tissue, (low, high) in TISSUE_HU.items():
        hu[tissue] = float(rng.uniform(low, high))
    hu[LIVER_TUMOUR_T] = hu[LIVER_T] - float(rng.uniform(30, 60))
    return Intensities(tuple(hu), texture=draw_wave_field(rng, (25, 90)), gain=draw_field(rng, (200, 600)),
                       gain_amplitude=float(rng.uniform(0.01, 0.025)), offset=draw_field(rng, (150, 400)),
                       offset_amplitude=float(rng.uniform(3, 8)), noise=float(rng.uniform(6, 16)))


def render_image(tissue: np.ndarray, grid: Grid, intensities: Intensities, rng: np.random.Generator) -> np.ndarray:
    """HU (int16, clipped to [−1000, 1000]) from the tissue map: per-tissue values and texture, the bias fields
    inside the body, then Gaussian noise (drawn last)."""
    table = np.asarray(intensities.hu, dtype=np.float32)
    amplitude = np.zeros(len(table), dtype=np.float32)
    for kind, value in TISSUE_TEXTURE.items():
        amplitude[kind] = value
    image = table[tissue]
    image += amplitude[tissue] * intensities.texture.on(grid)
    body = tissue != AIR
    gain = intensities.gain.on(grid)
    gain *= np.float32(intensities.gain_amplitude)
    shift = intensities.offset.on(grid)
    shift *= np.float32(intensities.offset_amplitude)
    image += np.where(body, (image + 1000.0) * gain + shift, np.float32(0.0))
    image += rng.standard_normal(grid.size, dtype=np.float32) * np.float32(intensities.noise)
    np.clip(image, -1000, 1000, out=image)
    return np.rint(image).astype(np.int16)


# --- one phantom --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phantom:
    image: np.ndarray  # int16 HU, (X, Y, Z), RAS
    labels: np.ndarray  # uint8 label-dictionary ids
    affine: np.ndarray
    anatomy: Anatomy


def make_phantom(size: Sequence[int], spacing: Sequence[float], seed: int, tumours: bool = False) -> Phantom:
    """One phantom on the grid (size voxels at spacing mm, centred), its anatomy fixed by `seed` alone."""
    grid = Grid(tuple(int(v) for v in size), tuple(float(v) for v in spacing))  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    anatomy = draw_anatomy(rng)
    intensities = draw_intensities(rng)
    canvas = GridCanvas(grid, anatomy)
    paint_anatomy(canvas, anatomy, tumours)
    image = render_image(canvas.tissue, grid, intensities, rng)
    return Phantom(image, canvas.labels, grid.affine, anatomy)


# --- a folder of phantoms with its datalist -----------------------------------------------------------------------
def phantom_paths(out: Path, index: int) -> tuple[Path, Path]:
    return out / f"phantom_{index:04d}_image.nii.gz", out / f"phantom_{index:04d}_label.nii.gz"


def datalist_entry(index: int, labels: np.ndarray, grid: Grid) -> dict[str, Any]:
    image, label = phantom_paths(Path("."), index)
    present = {int(v) for v in np.unique(labels)} - {0}
    return {"image": image.name, "label": label.name, "fold": index % FOLDS,
            "spacing": [float(s) for s in grid.spacing], "dim": [int(n) for n in grid.size], **region_one_hots(present)}


def existing_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, affine) from a NIfTI header, or None when the file cannot be read."""
    try:
        image = nib.load(str(path))
        return tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)
    except Exception:  # a damaged file is made again
        return None


@dataclass(frozen=True)
class PhantomRun:
    out: Path
    datalist: Path
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    seed: int
    tumours: bool
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "datalist": str(self.datalist), "phantoms": len(self.written) + len(self.skipped),
                "written": self.written, "skipped": self.skipped, "size": list(self.size),
                "spacing": list(self.spacing), "seed": self.seed, "tumours": self.tumours,
                "seconds": round(self.seconds, 3)}


def complete_phantoms(out: Path, num: int, grid: Grid) -> list[int]:
    """Indices below `num` whose image and label both exist on this grid. A complete phantom on another grid is an
    OutputError (mixing grids in one datalist would be a surprise); an unreadable one is made again."""
    complete = []
    for index in range(num):
        paths = phantom_paths(out, index)
        if not all(p.is_file() for p in paths):
            continue
        headers = [existing_grid(p) for p in paths]
        if any(h is None for h in headers):
            continue
        for path, (shape, affine) in zip(paths, headers):  # type: ignore[misc]
            if shape[:3] != tuple(grid.size) or not np.allclose(affine, grid.affine, atol=1e-3):
                spacing = "x".join(f"{v:g}" for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).round(4))
                raise OutputError(
                    f"--out: '{path}' exists on a {'x'.join(map(str, shape[:3]))} grid at {spacing} mm, not the "
                    f"requested {'x'.join(map(str, grid.size))} at {'x'.join(f'{v:g}' for v in grid.spacing)} mm; "
                    "choose another --out or remove the phantom files")
        complete.append(index)
    return complete


def write_phantoms(out: Path, num: int, size: Sequence[int], spacing: Sequence[float], seed: int = 0,
                   tumours: bool = False, on_progress: ProgressCallback = no_progress) -> PhantomRun:
    """Phantoms 0..num−1 in `out` (phantom k from seed `derive_sample_seed(seed, k)`), skipping complete ones, then
    `out/datalist.json` listing all of them (paths relative to `out`, fold = k mod 5)."""
    started = time.perf_counter()
    grid = Grid(tuple(int(v) for v in size), tuple(float(v) for v in spacing))  # type: ignore[arg-type]
    complete = set(complete_phantoms(out, num, grid))
    entries, written, skipped = [], [], []
    for index in range(num):
        image_path, label_path = phantom_paths(out, index)
        if index in complete:
            labels, _ = read_nifti(label_path, field="--out", what="label map")
            skipped.append(index)
        else:
            try:
                phantom = make_phantom(grid.size, grid.spacing, derive_sample_seed(seed, index), tumours)
            except MemoryError:
                raise PhantomError(f"--size: a {'x'.join(map(str, grid.size))} phantom does not fit in memory "
                                   "(about 32 bytes a voxel); ask for a smaller grid") from None
            labels = phantom.labels
            try:
                write_nifti(label_path, phantom.labels, phantom.affine)
                write_nifti(image_path, phantom.image, phantom.affine)
            except OSError as error:
                raise OutputError(f"--out: cannot write '{image_path.parent}' ({error.strerror}); choose a folder "
                                  "you can write") from None
            written.append(index)
        entries.append(datalist_entry(index, labels, grid))
        on_progress(ProgressEvent("phantoms", index + 1, num))
    datalist = out / DATALIST
    write_datalist(datalist, entries)
    return PhantomRun(out, datalist, grid.size, grid.spacing, seed, tumours, written, skipped,
                      time.perf_counter() - started)

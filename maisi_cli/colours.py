"""One fixed colour per label id, shared by everything maisi draws or writes: `maisi preview`'s contours and legend,
the 3D Slicer and ITK-SNAP colour tables, and the segments of a `.seg.nrrd` (pure Python: no numpy, no torch).

COLOURS holds the colour of every id of a uint8 label map (0..255) as literal hex codes, so a colour never changes
with a library version or a float rounding. They were made by `design_colours()` (tests check the literal equals
it), in CIELAB, where a Euclidean distance (CIE76 ΔE) tracks how different two colours look:

- candidates: sRGB colours on a grid of step 15 with lightness L* >= 40 (visible on a dark CT), chroma >= 30 and an
  RGB spread (max - min) >= 100, so a contour never looks like a grey of the CT;
- anchors: organs with a conventional colour in anatomy atlases and viewers keep one of their own choosing (liver
  brown-red, spleen purple, aorta red, the caval and portal veins blue, gallbladder green, ...);
- then each other id, those most often seen first (lung lobes, kidneys, abdominal organs, vessels, vertebrae from
  L5 up, ribs, the rest of the dictionary, its unused dummy ids, then ids outside the dictionary for plugin labels),
  takes the candidate farthest from every colour already taken (greedy max-min).

So the labels seen together are the most distinct: the anchors and the first 38 ids are >= 22 ΔE apart pairwise,
every named anatomy (124 ids) >= 14 (ΔE 2.3 is a just-noticeable difference; above 10 two colours read as different
at a glance), all 255 ids >= 10. The body (200) gets a skin tone: it outlines everything and preview does not draw it.
"""

from __future__ import annotations

import itertools
import math

from maisi_cli.labels import builtin_label_dictionary, label_dictionary

# --- the table --------------------------------------------------------------------------------------------------
# COLOURS[i] is the colour of label id i (0 = background, black); made by design_colours().
COLOURS: tuple[str, ...] = (
    "#000000", "#be4b37", "#e14b4b", "#9150b9", "#f5b950", "#696900", "#e61e28", "#285ae1",  # 0-7
    "#87a500", "#965a00", "#3ca53c", "#d2ff96", "#f587af", "#00ffa5", "#ff7800", "#ebdc32",  # 8-15
    "#ffe169", "#3caff0", "#f04bb4", "#96e10f", "#b4ff5a", "#7896f0", "#4bc3d2", "#c35aa5",  # 16-23
    "#ffa500", "#e1ff00", "#b400ff", "#87962d", "#00ff00", "#00fff0", "#ff00ff", "#0f7869",  # 24-31
    "#5a2dff", "#a53c5a", "#96ffff", "#f096ff", "#4bb400", "#ff3c00", "#00c378", "#e1ff69",  # 32-39
    "#4b7800", "#96c35a", "#c30f96", "#ff9696", "#5a4bf0", "#b48700", "#ff694b", "#9678ff",  # 40-47
    "#d2d25a", "#ff69b4", "#f05aff", "#96b4ff", "#87ff00", "#d27800", "#b4694b", "#e1b400",  # 48-55
    "#960fd2", "#4b69b4", "#f0874b", "#ffe196", "#0096ff", "#1e87a5", "#ff69e1", "#5a69d2",  # 56-63
    "#0078b4", "#00a596", "#00e1b4", "#ffff96", "#b4a50f", "#ff004b", "#00f0ff", "#007800",  # 64-71
    "#3ce100", "#873cc3", "#e14b78", "#b4d20f", "#b4874b", "#87d2ff", "#5ae178", "#c34bc3",  # 72-79
    "#ff96e1", "#d26978", "#87f0d2", "#00d2ff", "#785a0f", "#ff0087", "#1ed2c3", "#e1b469",  # 80-87
    "#87ff5a", "#87c31e", "#ff9678", "#d23cff", "#009669", "#0f783c", "#ff6978", "#b400b4",  # 88-95
    "#ff00a5", "#a596ff", "#4b9600", "#a54b0f", "#fff000", "#c35a87", "#a5ff96", "#00ff4b",  # 96-103
    "#96f069", "#c30f3c", "#ff0fd2", "#c34b00", "#00f078", "#963cff", "#00c34b", "#6996d2",  # 104-111
    "#c32d1e", "#d2005a", "#2de14b", "#c32373", "#96870f", "#c3783c", "#3ca55a", "#b4a54b",  # 112-119
    "#ffa54b", "#5ac396", "#ff0069", "#b478e1", "#d22d00", "#96ffb4", "#a52d87", "#d278ff",  # 120-127
    "#4b87ff", "#b4ff00", "#ff692d", "#ff001e", "#b45aff", "#a53c3c", "#b4e15a", "#694bc3",  # 128-135
    "#e13cd2", "#d2963c", "#ff7869", "#ffd200", "#c34be1", "#b42d4b", "#69d287", "#ff7896",  # 136-143
    "#ff4b96", "#0fc300", "#00a5d2", "#ffff78", "#009600", "#d25a5a", "#875af0", "#e10fe1",  # 144-151
    "#00ffc3", "#b4c32d", "#78ff78", "#a5781e", "#f0ff4b", "#8700ff", "#69a53c", "#e178d2",  # 152-159
    "#69c34b", "#0078d2", "#ff4b78", "#2d9696", "#ff4b2d", "#e1961e", "#a53c78", "#ffb478",  # 160-167
    "#873ce1", "#e10f87", "#ff4b4b", "#78e1ff", "#5af0a5", "#69d20f", "#f0782d", "#e178b4",  # 168-175
    "#c3691e", "#e1c33c", "#69ffd2", "#8769d2", "#5a78ff", "#f00fb4", "#d2ff4b", "#e1693c",  # 176-183
    "#a5b43c", "#0069e1", "#0fff69", "#e1c35a", "#78d23c", "#d24b96", "#e17869", "#965a2d",  # 184-191
    "#2d96e1", "#ff87ff", "#004bff", "#5ae1e1", "#4b87b4", "#f03c5a", "#5ac3b4", "#ff78d2",  # 192-199
    "#e6a57d", "#b41ea5", "#e11e3c", "#d24bb4", "#ff962d", "#e1d278", "#d28769", "#69960f",  # 200-207
    "#e1875a", "#ff5a00", "#8787ff", "#a5e178", "#b41e5a", "#a53ca5", "#00b41e", "#d2a52d",  # 208-215
    "#5a69ff", "#ffc33c", "#005aff", "#c3ff78", "#b41ed2", "#c3e178", "#ffd278", "#3c5ab4",  # 216-223
    "#a5ff3c", "#2db478", "#6978d2", "#a55ae1", "#96c3ff", "#0fe187", "#c3c300", "#0f8769",  # 224-231
    "#f069f0", "#3cd296", "#78b42d", "#78f02d", "#e1f078", "#a54b2d", "#b42d2d", "#69b4e1",  # 232-239
    "#2db45a", "#2d6996", "#d2e100", "#a5e13c", "#5aa5ff", "#5a87d2", "#d2694b", "#00872d",  # 240-247
    "#69e1b4", "#ffc396", "#00c3ff", "#d2e14b", "#e100ff", "#69e15a", "#00a5b4", "#78fff0",  # 248-255
)

MAX_ID = 255  # label maps are uint8


def hex_to_rgb(code: str) -> tuple[int, int, int]:
    return int(code[1:3], 16), int(code[3:5], 16), int(code[5:7], 16)


def label_colour(ident: int) -> tuple[int, int, int]:
    """The fixed (r, g, b) 0..255 of a label id. Ids beyond a uint8 map (a foreign int16 label map shown by
    `maisi preview`) reuse the colours of 1..255 in turn."""
    ident = int(ident)
    if not 0 <= ident <= MAX_ID:
        ident = 1 + (ident - 1) % MAX_ID
    return hex_to_rgb(COLOURS[ident])


def label_colour_table(ids=None) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(id, name, colour) for every id of the label dictionary (plugin labels included), or for the `ids` given
    (a name `label N` for an id not in the dictionary); sorted by id, each once. Background (0) is never listed."""
    names = {ident: name for name, ident in label_dictionary().items()}
    wanted = sorted(names) if ids is None else sorted({int(i) for i in ids} - {0})
    return [(ident, names.get(ident, f"label {ident}"), label_colour(ident)) for ident in wanted]


# --- the design (run by the tests, not at import) ---------------------------------------------------------------
# Organs with a conventional colour: (name in the label dictionary, (r, g, b)).
ANCHORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("liver", (190, 75, 55)),
    ("spleen", (145, 80, 185)),
    ("pancreas", (245, 185, 80)),
    ("aorta", (230, 30, 40)),
    ("inferior vena cava", (40, 90, 225)),
    ("portal vein and splenic vein", (60, 175, 240)),
    ("gallbladder", (60, 165, 60)),
    ("bladder", (235, 220, 50)),
    ("stomach", (245, 135, 175)),
    ("heart", (195, 35, 115)),
    ("body", (230, 165, 125)),
)

# After the anchors, in this order: the labels a phantom or a whole-body map shows most often, left before right.
COMMON_FIRST: tuple[str, ...] = (
    "left lung upper lobe", "left lung lower lobe", "right lung upper lobe", "right lung middle lobe",
    "right lung lower lobe", "right kidney", "left kidney", "esophagus", "duodenum", "small bowel", "colon",
    "trachea", "airway", "right adrenal gland", "left adrenal gland", "brain", "spinal cord", "sternum",
    "costal cartilages", "sacrum", "left hip", "right hip", "left femur", "right femur", "left iliac artery",
    "right iliac artery", "left iliac vena", "right iliac vena", "superior vena cava", "pulmonary vein",
    "hepatic vessel", "hepatic tumor", "lung tumor", "pancreatic tumor", "left autochthon", "right autochthon",
    "left iliopsoas", "right iliopsoas",
    *(f"vertebrae L{i}" for i in range(5, 0, -1)), *(f"vertebrae T{i}" for i in range(12, 0, -1)),
    *(f"vertebrae C{i}" for i in range(7, 0, -1)), "vertebrae S1",
    *(f"{side} rib {i}" for i in range(1, 13) for side in ("left", "right")),
)

GRID_STEP = 15
MIN_LIGHTNESS, MIN_CHROMA, MIN_SPREAD = 40.0, 30.0, 100


def srgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """CIELAB (D65) of an sRGB colour 0..255."""
    def linear(c: int) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    r, g, b = (linear(c) for c in rgb)
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883
    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def is_candidate(rgb: tuple[int, int, int]) -> bool:
    lightness, a, b = srgb_to_lab(rgb)
    return lightness >= MIN_LIGHTNESS and math.hypot(a, b) >= MIN_CHROMA and max(rgb) - min(rgb) >= MIN_SPREAD


def design_order() -> list[int]:
    """The ids after the anchors, in the order they choose their colours."""
    table = builtin_label_dictionary()  # built-in names only: a plugin never changes a colour
    anchored = {table[name] for name, _ in ANCHORS}
    first = [table[name] for name in COMMON_FIRST]
    named = sorted(set(table.values()) - anchored - set(first))
    dummies = [table[name] for name in table if name.startswith("dummy")]
    rest = [i for i in named if i not in dummies] + sorted(dummies)
    unnamed = [i for i in range(1, MAX_ID + 1) if i not in table.values()]
    return first + rest + unnamed


def design_colours() -> tuple[str, ...]:
    """The table of COLOURS, as hex codes for ids 0..255 (about a second: greedy max-min over ~3,300 candidates)."""
    table = builtin_label_dictionary()
    chosen = {0: (0, 0, 0)}
    chosen.update({table[name]: rgb for name, rgb in ANCHORS})
    candidates = [rgb for rgb in itertools.product(range(0, 256, GRID_STEP), repeat=3) if is_candidate(rgb)]
    labs = [srgb_to_lab(rgb) for rgb in candidates]
    taken = [srgb_to_lab(rgb) for ident, rgb in chosen.items() if ident]
    nearest = [min(math.dist(lab, other) for other in taken) for lab in labs]  # ΔE to the closest colour taken
    for ident in design_order():
        best = max(range(len(candidates)), key=nearest.__getitem__)  # the first of equals: deterministic
        chosen[ident] = candidates[best]
        new = labs[best]
        nearest = [min(distance, math.dist(lab, new)) for distance, lab in zip(nearest, labs)]
    return tuple("#%02x%02x%02x" % chosen[ident] for ident in range(MAX_ID + 1))

"""Colour tables beside a label map, so viewers show each label id with its name and maisi's colour
(maisi_cli.colours): a 3D Slicer colour table (`.ctbl`, also read as `.txt`) and an ITK-SNAP label description file.

`entries` are (id, name, (r, g, b)) as maisi_cli.colours.label_colour_table() gives them. The bytes depend on the
entries alone (no date, no path), so the same dictionary writes the same file.
"""

from __future__ import annotations

from typing import Iterable

Entry = tuple[int, str, tuple[int, int, int]]


def _checked(entries: Iterable[Entry]) -> list[Entry]:
    """Entries sorted by id, background (0) left out (each format writes its own line for it); an id twice, or an id
    or colour component outside 0..255, is a ValueError (a programming error, not a user's)."""
    rows = sorted((int(ident), str(name), tuple(int(c) for c in rgb)) for ident, name, rgb in entries)
    ids = [ident for ident, _, _ in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label ids listed twice: {sorted({i for i in ids if ids.count(i) > 1})}")
    for ident, _, rgb in rows:
        if not 0 <= ident <= 255 or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"label {ident}: id and colour components must be 0..255, got {rgb}")
    return [row for row in rows if row[0] != 0]  # type: ignore[misc]


def slicer_name(name: str) -> str:
    """A name as one token of a Slicer colour table line: Slicer splits lines at white space and writes spaces in
    names as underscores (`right_kidney`)."""
    return "_".join(name.split()) or "unnamed"


def slicer_colour_table_bytes(entries: Iterable[Entry]) -> bytes:
    """A 3D Slicer discrete colour table: `# ` header lines, then `ID NAME R G B A` per label (0..255 each), the
    background first as `0 Background 0 0 0 0` (transparent)."""
    rows = _checked(entries)
    lines = ["# Color table file maisi label dictionary", f"# {len(rows) + 1} values", "0 Background 0 0 0 0"]
    lines += [f"{ident} {slicer_name(name)} {r} {g} {b} 255" for ident, name, (r, g, b) in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


ITKSNAP_HEADER = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields:
#    IDX:   Label value in the label map
#    -R-:   Red (0..255)
#    -G-:   Green (0..255)
#    -B-:   Blue (0..255)
#    -A-:   Opacity (0.00 .. 1.00)
#    VIS:   Label shown (0 or 1)
#    MSH:   Label shown in the 3D mesh (0 or 1)
#  LABEL:   Label name, in double quotes
################################################
"""


def itksnap_label(name: str) -> str:
    """A name between ITK-SNAP's double quotes: a quote inside would end it, so it becomes an apostrophe."""
    return name.replace('"', "'")


def itksnap_label_description_bytes(entries: Iterable[Entry]) -> bytes:
    """An ITK-SNAP label description file: the comment header, then `IDX R G B A VIS MSH "LABEL"` per label,
    label 0 first as the transparent, hidden "Clear Label"."""
    rows = [(0, "Clear Label", (0, 0, 0))] + _checked(entries)
    lines = []
    for ident, name, (r, g, b) in rows:
        shown = 0 if ident == 0 else 1
        lines.append(f"{ident:5d} {r:5d} {g:4d} {b:4d} {shown:8d} {shown:2d} {shown:2d}    \"{itksnap_label(name)}\"")
    return (ITKSNAP_HEADER + "\n".join(lines) + "\n").encode("utf-8")

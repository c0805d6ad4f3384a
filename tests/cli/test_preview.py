"""`maisi preview` and `maisi generate --preview` through the CLI runner: the PNG's size, colours and panels, and bad
input (one line, exit 2, no PNG left)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.preview import GAP, HEADER_ROW, TITLE_HEIGHT, Layout, label_colour

runner = CliRunner()
LIVER, LUNG_LOBES = 1, (28, 29, 30, 31, 32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, Path]:
    """(image, label map) of one 48³ phantom at 8 mm, made by `maisi data phantoms`."""
    out = tmp_path_factory.mktemp("phantom")
    result = runner.invoke(app, ["--quiet", "data", "phantoms", "--num", "1", "--size", "48", "--spacing", "8",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out / "phantom_0000_image.nii.gz", out / "phantom_0000_label.nii.gz"


def run_preview(*args: str):
    return runner.invoke(app, ["preview", *map(str, args)])


def has_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).any())


def panels_of(pixels: np.ndarray, layout: Layout) -> list[np.ndarray]:
    return [pixels[top:bottom, left:right] for left, top, right, bottom in map(layout.panel_box, range(3))]


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_preview_png_has_the_layout_size_label_colours_and_three_different_panels(phantom, tmp_path):
    image, mask = phantom
    out = tmp_path / "preview.png"
    result = run_preview("--json", image, mask, "--out", out)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["out"] == str(out) and document["slice"] == [24, 24, 24]
    assert document["window"] == {"level": 40.0, "width": 400.0}
    ids = [entry["id"] for entry in document["labels"]]
    names = {entry["id"]: entry["name"] for entry in document["labels"]}
    assert ids == sorted(ids) and 200 not in ids  # the body is not drawn
    assert names[LIVER] == "liver" and any(names.get(i, "").endswith("lung upper lobe") for i in LUNG_LOBES)

    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        layout = Layout(256, len(ids))
        assert png.size == layout.size == (3 * 256 + 4 * GAP, document["size"][1])
        assert png.size[1] > GAP + TITLE_HEIGHT + 256  # a legend under the panels
        pixels = np.asarray(png)
    panels = panels_of(pixels, layout)
    assert not np.array_equal(panels[0], panels[1]) and not np.array_equal(panels[1], panels[2])
    assert not np.array_equal(panels[0], panels[2])
    drawn = np.concatenate([p.reshape(-1, 3) for p in panels])
    assert has_colour(drawn, label_colour(LIVER))
    assert any(has_colour(drawn, label_colour(lobe)) for lobe in LUNG_LOBES)
    assert not has_colour(drawn, label_colour(200))
    for entry, ident in enumerate(ids):  # every legend entry has its swatch in its label's colour
        left, top, right, bottom = layout.swatch_box(entry)
        assert (pixels[top:bottom, left:right] == label_colour(ident)).all(), ident
    assert no_temporaries(tmp_path)


def test_window_slice_and_panel_size_change_the_picture(phantom, tmp_path):
    image, mask = phantom
    soft, lung, moved = tmp_path / "soft.png", tmp_path / "lung.png", tmp_path / "moved.png"
    assert run_preview(image, mask, "-o", soft, "--panel-size", "128").exit_code == 0
    result = run_preview(image, mask, "-o", lung, "--panel-size", "128", "--window", "-600,1500")
    assert result.exit_code == 0, result.stderr
    assert "axial z=24" in result.stdout
    result = run_preview("--json", image, mask, "-o", moved, "--panel-size", "128", "--slice", "20,30,10",
                         "--window", "lung")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["slice"] == [20, 30, 10]
    with Image.open(soft) as a, Image.open(lung) as b, Image.open(moved) as c:
        assert a.size[0] >= 3 * 128 + 4 * GAP and a.size[0] == b.size[0]  # wider when the legend needs columns
        assert a.size == b.size  # same planes, same labels
        assert not np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(b)[:, :, 0][:200], np.asarray(c)[:, :, 0][:200])


def test_image_without_mask_has_no_legend(phantom, tmp_path):
    image, _ = phantom
    out = tmp_path / "ct.png"
    result = run_preview("--json", image, "-o", out, "--window", "bone")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["labels"] == []
    with Image.open(out) as png:
        assert png.size == Layout(256, 0).size == (3 * 256 + 4 * GAP, GAP + HEADER_ROW + TITLE_HEIGHT + 256 + GAP)
        pixels = np.asarray(png)
    coloured = pixels.max(axis=-1) != pixels.min(axis=-1)
    assert coloured.mean() < 0.005  # the orientation letters only: no contour drawn
    assert not any(has_colour(pixels, label_colour(ident)) for ident in range(1, 256))


def test_a_volume_stored_left_to_right_gives_the_same_picture(phantom, tmp_path):
    """The same anatomy stored LAS (x flipped, negative x spacing) is reoriented to RAS before drawing."""
    image, mask = phantom
    flipped = []
    for path in (image, mask):
        volume = nib.load(path)
        affine = volume.affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([volume.shape[0] - 1, 0, 0]) + affine[:3, 3]
        affine[:3, 0] *= -1
        target = tmp_path / f"las_{path.name}"
        nib.save(nib.Nifti1Image(np.asarray(volume.dataobj)[::-1], affine), str(target))
        flipped.append(target)
    assert nib.aff2axcodes(nib.load(flipped[0]).affine) == ("L", "A", "S")
    assert run_preview(image, mask, "-o", tmp_path / "ras.png").exit_code == 0
    assert run_preview(*flipped, "-o", tmp_path / "las.png").exit_code == 0
    assert (tmp_path / "ras.png").read_bytes() == (tmp_path / "las.png").read_bytes()


def write_volume(path: Path, shape: tuple[int, int, int], spacing: float = 8.0) -> Path:
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), np.diag([spacing] * 3 + [1.0])), str(path))
    return path


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing image", "IMAGE: "),
    ("missing mask", "MASK: "),
    ("not nifti", "IMAGE: "),
    ("mask shape", "MASK: "),
    ("mask affine", "MASK: "),
    ("slice range", "--slice: "),
    ("slice form", "--slice: "),
    ("window", "--window: "),
    ("window width", "--window: "),
    ("panel size", "--panel-size: "),
    ("not png", "--out: "),
])
def test_bad_input_is_one_line_exit_2_and_no_png(phantom, tmp_path, case, fragment):
    image, mask = phantom
    out = tmp_path / "out" / "preview.png"
    text = tmp_path / "notes.nii.gz"
    text.write_text("not a NIfTI file")
    args = {
        "missing image": [tmp_path / "absent.nii.gz", mask],
        "missing mask": [image, tmp_path / "absent.nii.gz"],
        "not nifti": [text, mask],
        "mask shape": [image, write_volume(tmp_path / "small.nii.gz", (48, 48, 40))],
        "mask affine": [image, write_volume(tmp_path / "coarse.nii.gz", (48, 48, 48), spacing=4.0)],
        "slice range": [image, mask, "--slice", "10,10,48"],
        "slice form": [image, mask, "--slice", "10,10"],
        "window": [image, mask, "--window", "abdominal"],
        "window width": [image, mask, "--window", "40,0"],
        "panel size": [image, mask, "--panel-size", "5"],
        "not png": [image, mask, "--out", tmp_path / "out" / "preview.jpg"],
    }[case]
    if "--out" not in args:
        args += ["--out", out]
    result = run_preview(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {fragment}"), result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_generate_preview_writes_a_png_beside_each_pair(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    args = ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask_file),
            "--out", str(out), "--no-qc", "--preview"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["previews"] == ["sample_0000_preview.png"]
    png_path = out / "sample_0000_preview.png"
    with Image.open(png_path) as png:
        assert png.size[0] == 3 * 256 + 4 * GAP
        pixels = np.asarray(png)
    assert has_colour(pixels, label_colour(LIVER))  # the mask's liver, drawn on the generated CT
    assert no_temporaries(out)

    # A re-run skips the complete sample: its preview is written again only when missing.
    first = png_path.read_bytes()
    png_path.write_bytes(b"kept")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped"] == [0] and report["previews"] == [] and png_path.read_bytes() == b"kept"
    png_path.unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["previews"] == ["sample_0000_preview.png"] and png_path.read_bytes() == first

    # Without --preview, no PNG.
    plain = tmp_path / "plain"
    result = runner.invoke(app, [*args[:args.index("--out")], "--out", str(plain), "--no-qc"])
    assert result.exit_code == 0, result.stderr
    assert "previews" not in json.loads(result.stdout)
    assert not list(plain.glob("*.png"))

"""Issue 26 item 3, the pictures: `maisi qc --report`, `maisi generate --report`, `maisi preview --sheet`, the single
preview's title, orientation letters and legend, `maisi fid --plot`; and `maisi qc` reading the model its sidecar
names. Each PNG is opened, its panels counted and sized, and what it marks checked through the figure's own data
(the JSON the command prints) and its pixels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.colours import label_colour
from maisi_cli.engine import preview as preview_engine
from maisi_cli.engine.contact_sheet import SheetLayout
from maisi_cli.engine.report_plots import FAIL_RED
from maisi_cli.models import get_model
from maisi_cli.resources import load_json
from tests.cli.test_fid import fid_args, fid_inputs  # noqa: F401 (fid_inputs: a fixture)

runner = CliRunner()
RED = (220, 30, 30)  # FAIL_RED
assert FAIL_RED == "#%02x%02x%02x" % RED


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def has_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((pixels[..., :3] == np.array(colour, dtype=np.uint8)).all(axis=-1).any())


def opened(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, Path]:
    """(image, label map) of one 48³ phantom at 8 mm (`maisi data phantoms`): liver, spleen, lungs, bone..."""
    out = tmp_path_factory.mktemp("phantom")
    result = invoke("--quiet", "data", "phantoms", "--num", "1", "--size", "48", "--spacing", "8", "--out", out)
    assert result.exit_code == 0, result.stderr
    return out / "phantom_0000_image.nii.gz", out / "phantom_0000_label.nii.gz"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    """(run folder, JSON report) of the demo model at 32³, one step, two samples, with --preview and --report."""
    home = tmp_path_factory.mktemp("demo-home")
    out = tmp_path_factory.mktemp("demo-run") / "run"
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse fixture's MAISI_HOME is per test
        patch.setenv("MAISI_HOME", str(home))
        result = invoke("--json", "generate", "--model", "demo", "-n", "2", "--size", "32", "--steps", "1",
                        "--allow-any-size", "--max-attempts", "1", "--preview", "--report", "--out", out)
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def narrow_statistics(path: Path) -> Path:
    """The packaged statistics with the liver's range moved to -1000..-990 HU: any liver fails."""
    document = load_json("image_median_statistics.json")
    document["liver"] = {**document["liver"], "percentile_0_5": -1000.0, "percentile_99_5": -990.0,
                         "sigma_6_low": -1000.0, "sigma_6_high": -990.0}
    path.write_text(json.dumps(document))
    return path


# --- maisi qc --report -----------------------------------------------------------------------------------------
def test_qc_report_marks_the_failing_organ_in_red(phantom, tmp_path):
    image, mask = phantom
    out = tmp_path / "report.png"
    result = invoke("--json", "qc", image, mask, "--stats", narrow_statistics(tmp_path / "narrow.json"),
                    "--report", out)
    assert result.exit_code == 3, result.stderr  # the check failed, the report is written all the same
    document = json.loads(result.stdout)
    chart = document["report"]
    assert document["failed"] == ["liver"] and chart["out"] == str(out)
    organs = [row["organ"] for row in document["organs"]]
    assert [panel["name"] for panel in chart["panels"]] == organs  # one panel per organ of the statistics
    verdicts = {panel["name"]: panel["verdict"] for panel in chart["panels"]}
    assert verdicts == {row["organ"]: row["verdict"] for row in document["organs"]} and verdicts["liver"] == "fail"
    assert "FAILED" in chart["title"] and "liver" in chart["title"]

    pixels = opened(out)
    assert list(pixels.shape[1::-1]) == chart["size"]
    boxes = {panel["name"]: panel["box"] for panel in chart["panels"]}
    heights = [bottom - top for _, top, _, bottom in boxes.values()]
    assert max(heights) - min(heights) <= 1 and min(heights) > 20  # panels of one height (pixel rounding)
    tops = [top for _, top, _, _ in boxes.values()]
    assert tops == sorted(tops) and len(set(tops)) == len(tops)  # stacked, in the statistics' order
    left, top, right, bottom = boxes["liver"]
    assert has_colour(pixels[top:bottom, left:right], RED)  # the failing organ's box is red
    for name, (left, top, right, bottom) in boxes.items():
        if verdicts[name] == "pass":
            assert not has_colour(pixels[top:bottom, left:right], RED), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically


def test_qc_report_of_a_passing_ct_has_no_red(phantom, tmp_path):
    image, mask = phantom
    out = tmp_path / "report.png"
    result = invoke("--json", "qc", image, mask, "--model", "demo", "--report", out)  # the phantoms' statistics
    assert result.exit_code == 0, result.stderr
    chart = json.loads(result.stdout)["report"]
    assert "PASSED" in chart["title"] and all(p["verdict"] != "fail" for p in chart["panels"])
    assert not has_colour(opened(out), RED)


def test_qc_report_refuses_a_name_that_is_not_png_before_checking(phantom, tmp_path):
    image, mask = phantom
    result = invoke("qc", image, mask, "--report", tmp_path / "report.jpg")
    assert result.exit_code == 2 and "--report" in result.stderr and ".png" in result.stderr
    assert not list(tmp_path.iterdir())


# --- maisi qc and the sidecar's model ---------------------------------------------------------------------------
def test_qc_of_a_demo_sample_uses_the_demo_statistics_its_sidecar_names(demo_run, tmp_path):
    run, _ = demo_run
    image, label = run / "sample_0000_image.nii.gz", run / "sample_0000_label.nii.gz"
    sidecar = json.loads((run / "sample_0000.json").read_text())
    demo_statistics = get_model("demo").datasets["qc_statistics"]
    result = invoke("--json", "qc", image, label)
    assert result.exit_code in (0, 3), result.stderr
    document = json.loads(result.stdout)
    assert document["statistics"] == sidecar["qc"]["statistics"] and demo_statistics in document["statistics"]
    assert "demo" in document["statistics_note"] and "sample_0000.json" in document["statistics_note"]
    # the same check as the one generate ran: the same organs, medians and verdicts
    assert document["organs"] == sidecar["qc"]["organs"] and document["passed"] == sidecar["qc"]["passed"]
    # MASK defaults to the label map the sidecar names
    alone = invoke("--json", "qc", image)
    assert alone.exit_code == result.exit_code and json.loads(alone.stdout)["mask"] == str(label)
    # --stats still overrides
    packaged = tmp_path / "packaged.json"
    packaged.write_text(json.dumps(load_json("image_median_statistics.json")))
    overridden = json.loads(invoke("--json", "qc", image, label, "--stats", packaged).stdout)
    assert overridden["statistics"] == str(packaged) and "statistics_note" not in overridden


def test_qc_without_mask_and_no_sidecar_names_mask(tmp_path, phantom):
    image, _ = phantom
    alone = tmp_path / "ct.nii.gz"
    shutil.copy(image, alone)
    result = invoke("qc", alone)
    assert result.exit_code == 2 and "MASK" in result.stderr


# --- maisi generate --report and --preview -----------------------------------------------------------------------
def test_generate_report_writes_a_qc_picture_beside_each_pair(demo_run):
    run, document = demo_run
    assert document["reports"] == ["sample_0000_qc.png", "sample_0001_qc.png"]
    assert document["previews"] == ["sample_0000_preview.png", "sample_0001_preview.png"]
    for index in range(2):
        sidecar = json.loads((run / f"sample_{index:04d}.json").read_text())
        pixels = opened(run / f"sample_{index:04d}_qc.png")
        assert pixels.shape[1] == 800 and pixels.shape[0] > 300
        assert has_colour(pixels, RED) == (not sidecar["qc"]["passed"])  # red only where the sample failed


def test_generate_report_needs_the_quality_check(tmp_path):
    result = invoke("generate", "--model", "demo", "--no-qc", "--report", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--report" in result.stderr and "--no-qc" in result.stderr
    assert not (tmp_path / "out").exists()


# --- maisi preview --sheet ---------------------------------------------------------------------------------------
def copy_samples(run: Path, target: Path, count: int) -> Path:
    """A run folder of `count` samples made from the demo run's two (files renamed, sidecars renumbered)."""
    target.mkdir()
    for index in range(count):
        source = index % 2
        sidecar = json.loads((run / f"sample_{source:04d}.json").read_text())
        for role in ("image", "label"):
            name = f"sample_{index:04d}_{role}.nii.gz"
            shutil.copy(run / sidecar["files"][role], target / name)
            sidecar["files"][role] = name
        sidecar["sample_index"] = index
        (target / f"sample_{index:04d}.json").write_text(json.dumps(sidecar))
    return target


@pytest.mark.parametrize("count, columns, rows", [(2, 2, 1), (5, 3, 2)])
def test_sheet_has_one_tile_per_sample(demo_run, tmp_path, count, columns, rows):
    run = demo_run[0] if count == 2 else copy_samples(demo_run[0], tmp_path / "five", count)
    out = tmp_path / "sheet.png"
    result = invoke("--json", "preview", "--sheet", run, "--out", out, "--panel-size", "96")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["columns"], document["rows"]) == (columns, rows)
    assert [tile["sample"] for tile in document["tiles"]] == list(range(count))
    lines = (document["tiles"][0]["box"][1] - 4 - 4) // 14  # the title's lines above the first row
    layout = SheetLayout(count, 96, columns, lines)
    pixels = opened(out)
    assert list(pixels.shape[1::-1]) == document["size"] == list(layout.size)
    for position, tile in enumerate(document["tiles"]):
        assert tile["box"] == list(layout.tile_box(position))
        left, top, right, bottom = tile["box"]
        assert right - left == bottom - top == 96
        assert pixels[top:bottom, left:right].max() > 100  # a CT is drawn in every tile
        sidecar = json.loads((run / f"sample_{tile['sample']:04d}.json").read_text())
        assert str(sidecar["sample_seed"]) in tile["caption"][1]
        assert tile["verdict"] == ("QC passed" if sidecar["qc"]["passed"] else
                                   f"QC FAILED ({', '.join(sidecar['qc']['failed'])})")
    # tiles beyond the samples are left empty: the grid holds exactly `count`
    assert columns * rows - count < columns


def test_sheet_writes_into_the_run_folder_by_default_and_refuses_an_image_too(demo_run):
    run, _ = demo_run
    result = invoke("preview", "--sheet", run)
    assert result.exit_code == 0, result.stderr
    assert (run / "contact_sheet.png").is_file() and "2 sample(s)" in result.stdout
    both = invoke("preview", run / "sample_0000_image.nii.gz", "--sheet", run)
    assert both.exit_code == 2 and "--sheet" in both.stderr


def test_sheet_of_a_folder_without_samples_is_one_line(tmp_path):
    result = invoke("preview", "--sheet", tmp_path)
    assert result.exit_code == 2 and "no complete sample" in result.stderr
    assert not list(tmp_path.iterdir())


# --- the single preview ----------------------------------------------------------------------------------------
def test_preview_writes_beside_its_input_with_title_markers_and_visible_labels(demo_run):
    run, _ = demo_run
    image, label = run / "sample_0001_image.nii.gz", run / "sample_0001_label.nii.gz"
    beside = run / "sample_0001_preview.png"
    beside.unlink()
    result = invoke("--json", "preview", image, label, "--panel-size", "64")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["out"] == str(beside) and beside.is_file()  # no --out: beside the input
    sidecar = json.loads((run / "sample_0001.json").read_text())
    verdict = "QC passed" if sidecar["qc"]["passed"] else "QC FAILED"
    for part in ("sample 1", f"seed {sidecar['sample_seed']}", verdict, "window soft-tissue (L 40, W 400 HU)",
                 "slices x=16 y=16 z=16"):
        assert part in document["title"], part

    from maisi_cli import checks

    drawn = checks.preview(image, label, panel_size=64)
    layout = drawn.layout
    pixels = opened(beside)
    assert list(pixels.shape[1::-1]) == document["size"] == list(layout.size)
    assert layout.legend_rows * preview_engine.LEGEND_ROW <= 64  # the legend is no taller than the images
    # only the labels on the three planes shown are listed
    volume, labels, _ = preview_engine.load_volumes(image, label)
    on_planes = set()
    for plane in preview_engine.plane_slices(labels, drawn.slice).values():
        on_planes |= set(np.unique(plane).tolist())
    assert set(drawn.labels) <= on_planes - {0, 200} and drawn.labels
    assert [entry["id"] for entry in document["labels"]] == drawn.labels
    assert all(entry["colour"] == "#%02x%02x%02x" % label_colour(entry["id"]) for entry in document["labels"])
    # R/L, A/P, S/I on each plane, drawn in amber where the layout says
    letters = {plane: "".join(letter for letter, _ in placed) for plane, placed in drawn.markers.items()}
    assert letters == {"axial": "APRL", "coronal": "SIRL", "sagittal": "SIAP"}
    for placed in drawn.markers.values():
        for _, (x, y) in placed:
            around = pixels[max(0, y - 5):y + 6, max(0, x - 5):x + 6].reshape(-1, 3).astype(int)
            assert ((around[:, 0] > 200) & (around[:, 1] > 140) & (around[:, 2] < 120)).any(), (x, y)


@pytest.mark.parametrize("panel_size", [64, 128, 256])
def test_legend_rows_never_exceed_a_panel(panel_size):
    for entries in range(0, 130, 7):
        layout = preview_engine.Layout(panel_size, entries)
        assert layout.legend_rows * preview_engine.LEGEND_ROW <= panel_size
        assert layout.legend_rows * layout.legend_columns >= entries
        assert layout.width >= preview_engine.GAP + min(layout.legend_columns, max(entries, 1)) * 200 * bool(entries)


# --- maisi fid --plot ------------------------------------------------------------------------------------------
def test_fid_plot_is_a_bar_per_plane_and_the_average(fid_inputs, tmp_path):  # noqa: F811
    real, synth, extractor = fid_inputs
    out = tmp_path / "fid.png"
    result = invoke("--quiet", *fid_args(real, synth, extractor, "--json", "--planes", "xy,zx", "--plot", out))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    chart = document["plot"]
    assert [panel["name"] for panel in chart["panels"]] == ["XY", "ZX", "average"]
    values = {panel["name"]: panel["value"] for panel in chart["panels"]}
    assert values == {"XY": document["fid"]["xy"], "ZX": document["fid"]["zx"], "average": document["fid"]["average"]}
    pixels = opened(out)
    assert list(pixels.shape[1::-1]) == chart["size"] == [550, 360]
    tallest = max(values.values())
    for panel in chart["panels"]:  # bar heights in proportion to the values
        left, top, right, bottom = panel["box"]
        if tallest > 0:
            ratio = (bottom - top) / max(p["box"][3] - p["box"][1] for p in chart["panels"])
            assert ratio == pytest.approx(panel["value"] / tallest, abs=0.03)
        assert pixels[(top + bottom) // 2, (left + right) // 2].tolist() != [255, 255, 255]  # the bar is drawn


def test_fid_plot_refuses_a_bad_name_before_any_work(fid_inputs, tmp_path):  # noqa: F811
    real, synth, extractor = fid_inputs
    result = invoke(*fid_args(real, synth, extractor, "--plot", tmp_path / "fid.svg"))
    assert result.exit_code == 2 and "--plot" in result.stderr

"""`maisi profiles plan`: the memory planner as a table or one JSON document."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from maisi_cli.cli.app import app

runner = CliRunner()


def test_plan_table():
    result = runner.invoke(app, ["profiles", "plan", "--size", "512x512x512", "--memory", "80g"])
    assert result.exit_code == 0, result.stderr
    assert "ROI 80x80x80" in result.stdout and "2 TP splits" in result.stdout
    assert "framework overhead" in result.stdout and "peak" in result.stdout


def test_plan_json_with_profile():
    result = runner.invoke(app, ["profiles", "plan", "--size", "384x384x256", "--profile", "24g", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["budget_gib"] == 24 and document["size"] == [384, 384, 256]
    assert document["memory"]["peak_gib"] <= 24
    assert set(document["memory"]["decode_terms_gib"]) >= {"weights", "activations", "framework overhead"}
    assert "planner" in document["profile"]["plan"]["rule"]


def test_bad_memory_is_one_line_exit_2():
    result = runner.invoke(app, ["profiles", "plan", "--size", "256", "--memory", "lots"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--memory" in lines[0]


def test_nothing_fits_is_an_error():
    result = runner.invoke(app, ["profiles", "plan", "--size", "512", "--memory", "4g"])
    assert result.exit_code == 1 and "give at least" in result.stderr


def test_plan_names_the_one_plan_generate_uses_and_why():
    """A tabled size: the profile's released settings (not the planner's own pick, which the old output printed
    first); the table's row is what `generate --profile 24g` decodes with."""
    from maisi_cli.profiles import get_profile

    result = runner.invoke(app, ["profiles", "plan", "--size", "512x512x512", "--profile", "24g"])
    assert result.exit_code == 0, result.stderr
    row = next(e for e in get_profile("24g").decode if e.size == (512, 512, 512))
    first, why = result.stdout.splitlines()[:2]
    assert "`maisi generate --profile 24g` uses profile 24g" in first
    assert f"ROI {'x'.join(map(str, row.roi))}, overlap {row.overlap:g}, {row.tp_splits} TP splits" in first
    assert why.startswith("why: 512x512x512 is in profile 24g's table") and row.source in why
    assert result.stdout.count(" TP splits") == 1  # one plan, not two
    document = json.loads(runner.invoke(app, ["profiles", "plan", "--size", "512x512x512", "--profile", "24g",
                                              "--json"]).stdout)
    assert document["plan"] == document["profile"]["plan"] and list(row.roi) == document["plan"]["roi"]
    assert document["command"] == "maisi generate --profile 24g" and "table" in document["why"]


def test_plan_without_profile_is_what_auto_picks_for_the_memory():
    result = runner.invoke(app, ["profiles", "plan", "--size", "384x384x256", "--memory", "40g", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["profile"]["name"] == "32g" and document["command"] == "maisi generate --profile auto"
    assert "not in profile 32g's table" in document["why"] and document["fits"] is True


def test_plan_plot_draws_a_png(tmp_path):
    from PIL import Image

    chart = tmp_path / "plan.png"
    result = runner.invoke(app, ["profiles", "plan", "--size", "384x384x256", "--profile", "24g", "--plot",
                                 str(chart)])
    assert result.exit_code == 0, result.stderr
    assert f"chart: {chart}" in result.stdout
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size == (800, 500)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 8  # bars, not a blank canvas
    assert not list(tmp_path.glob(".*partial"))


def test_plan_plot_needs_a_png_name(tmp_path):
    result = runner.invoke(app, ["profiles", "plan", "--size", "256", "--plot", str(tmp_path / "plan.jpg")])
    assert result.exit_code == 2 and "--plot" in result.stderr and ".png" in result.stderr
    assert not (tmp_path / "plan.jpg").exists()

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

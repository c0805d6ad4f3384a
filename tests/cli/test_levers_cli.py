"""`maisi generate --levers` (issue 25): the GPU speed levers of one run, named in the plan and in the folder's run
record (a run with other levers is another run), refused in one line when unknown."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.cli.test_errors import assert_one_line_error

runner = CliRunner()


def dry_run(tiny_model, mask_file, out, *extra):
    spec, weights = tiny_model
    return runner.invoke(app, ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights), "--mask",
                               str(mask_file), "--out", str(out), "--no-qc", "--dry-run", *extra])


def test_levers_reach_the_plan_and_the_decode(tiny_model, mask_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MAISI_LEVERS", raising=False)
    plain = json.loads(dry_run(tiny_model, mask_file, tmp_path / "out").stdout)["plan"]
    assert plain["levers"] == []
    result = dry_run(tiny_model, mask_file, tmp_path / "out", "--levers", "channels_last,decode_overlap=0.5")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["levers"] == ["channels_last", "decode_overlap=0.5"]
    assert plan["decode"]["overlap"] == 0.5
    assert "MAISI_LEVERS" not in os.environ  # --levers is this command's: the process goes on without them


def test_an_unknown_lever_is_one_line_naming_the_option(tiny_model, mask_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MAISI_LEVERS", raising=False)
    spec, weights = tiny_model
    result = runner.invoke(app, ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask",
                                 str(mask_file), "--out", str(tmp_path / "out"), "--levers", "warp_drive"])
    assert_one_line_error(result, 2, "--levers: unknown lever 'warp_drive'")


def test_a_folder_made_with_other_levers_is_another_run(tiny_model, mask_file, tmp_path, monkeypatch):
    from maisi_cli.engine.run_folder import plan_generation, run_settings
    from maisi_cli.request import GenerateRequest

    spec, weights = tiny_model
    request = GenerateRequest(model=str(spec), weights_dir=weights, mask=mask_file, out=tmp_path / "out")
    monkeypatch.delenv("MAISI_LEVERS", raising=False)
    plain = run_settings(plan_generation(request))
    monkeypatch.setenv("MAISI_LEVERS", "decode_overlap=0.5")
    levered = run_settings(plan_generation(request))
    assert "levers (--levers, the profile's [levers])" not in plain  # earlier folders keep their digest
    assert levered["levers (--levers, the profile's [levers])"] == ["decode_overlap=0.5"]

"""--json holds on failure: exactly one document on stdout for every outcome; one `Error:` line on stderr for every
failure (Click's usage errors included); the root flags --json, --quiet and --debug read after the command too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maisi_cli import __version__
from maisi_cli.cli import labels as labels_command
from maisi_cli.cli.app import app
from tests.cli.test_errors import assert_one_line_error

runner = CliRunner()


def one_document(result) -> dict:
    """The whole of stdout as one JSON document (json.loads refuses a second one or trailing text)."""
    return json.loads(result.stdout)


def assert_failure_document(result, exit_code: int, kind: str, *fragments: str) -> dict:
    """One document {"ok": false, …, "error": {type, message, exit_code}} and the same message as the one red line."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    document = one_document(result)
    assert document["ok"] is False
    error = document["error"]
    assert (error["type"], error["exit_code"]) == (kind, exit_code), error
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"Error: {error['message']}", result.stderr
    assert "\n" not in error["message"]
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    return document


# --- Click's usage errors: one line, exit 2, and one document with --json ---------------------------------------
USAGE_ERRORS = [
    (["generate", "--num-samples", "0"], ["--num-samples"]),
    (["generate", "--num-samples", "x"], ["--num-samples"]),
    (["generate", "--bogus"], ["--bogus", "no such option", "maisi generate --help"]),
    (["generate", "--qcc"], ["--qcc", "did you mean", "--qc"]),
    (["generate", "-n"], ["-n", "requires an argument"]),
    (["genrate"], ["genrate", "generate"]),
    (["qc"], ["IMAGE", "missing argument", "maisi qc --help"]),
    (["export", "onnx"], ["--out", "required"]),
    (["profiles", "show", "a", "b"], ["unexpected extra argument"]),
]


@pytest.mark.parametrize(("args", "fragments"), USAGE_ERRORS)
def test_click_usage_errors_are_one_line_and_exit_2(args, fragments):
    result = runner.invoke(app, args)
    assert_one_line_error(result, 2, *fragments)
    assert "Usage:" not in result.stderr and "╭" not in result.stderr


@pytest.mark.parametrize(("args", "fragments"), USAGE_ERRORS)
def test_click_usage_errors_under_json_are_one_document(args, fragments):
    # --json before the command, or after it (read there too); after `-n`, a word is -n's value (tested below)
    for argv in (["--json", *args], *([[*args, "--json"]] if args[-1] != "-n" else [])):
        assert_failure_document(runner.invoke(app, argv), 2, "UsageError", *fragments)


def test_bare_groups_show_help_and_under_json_say_what_is_missing():
    bare = runner.invoke(app, [])  # `maisi` alone still prints its help
    assert "Usage: maisi" in bare.stdout and "generate" in bare.stdout
    assert_failure_document(runner.invoke(app, ["--json"]), 2, "UsageError", "Missing command", "maisi --help")
    assert_failure_document(runner.invoke(app, ["--json", "weights"]), 2, "UsageError", "missing command",
                            "maisi weights --help")


# --- MaisiError, unexpected exceptions, Ctrl-C ---------------------------------------------------------------------
def test_maisi_usage_error_under_json_is_a_document(tmp_path):
    result = runner.invoke(app, ["generate", "--out", str(tmp_path / "out"), "--size", "big", "--json"])
    assert_failure_document(result, 2, "UsageError", "--size", "'big' is not a size")


def test_runtime_error_under_json_is_a_document_with_exit_code_1(tmp_path, mask_file):
    result = runner.invoke(app, ["--json", "--quiet", "generate", "--out", str(tmp_path / "out"), "--size",
                                 "256x256x256", "--spacing", "1.5", "--mask", str(mask_file), "--weights-dir",
                                 str(tmp_path / "empty")])
    assert_failure_document(result, 1, "WeightsError", "models/autoencoder_v1.pt",
                            "maisi weights download rflow-ct --component autoencoder")


def test_failure_after_the_report_joins_it_in_one_document(tiny_model, mask_file, tmp_path):
    """--strict-qc fails after the run report is made: stdout holds the report and the error, as one document."""
    spec, weights = tiny_model
    narrow = tmp_path / "narrow.json"  # a liver range no sample can meet
    narrow.write_text(json.dumps({"liver": {"percentile_0_5": 5000.0, "percentile_99_5": 6000.0,
                                            "sigma_6_low": 5000.0, "sigma_6_high": 6000.0}}))
    result = runner.invoke(app, ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask",
                                 str(mask_file), "--out", str(tmp_path / "out"), "--stats", str(narrow),
                                 "--max-attempts", "1", "--strict-qc", "--json", "--quiet"])
    document = assert_failure_document(result, 3, "QualityCheckFailed", "--strict-qc")
    assert document["written"] == [0] and document["qc_failed"] == [0]
    assert list(document)[0] == "ok" and list(document)[-1] == "error"


def boom(query, table=None):
    raise RuntimeError("boom\nsecond line")


def test_unexpected_exception_is_one_line_unless_debug(monkeypatch):
    monkeypatch.setattr(labels_command, "matching_labels", boom)
    plain = runner.invoke(app, ["labels"])
    assert_one_line_error(plain, 1, "unexpected RuntimeError: boom second line", "--debug", "report")
    assert "Traceback" not in plain.stderr
    assert_failure_document(runner.invoke(app, ["labels", "--json"]), 1, "InternalError", "RuntimeError", "--debug")
    debug = runner.invoke(app, ["labels", "--debug"])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "in boom" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("Error: unexpected RuntimeError")


def test_keyboard_interrupt_is_one_line_and_exit_130(monkeypatch):
    def interrupted(query, table=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(labels_command, "matching_labels", interrupted)
    assert_one_line_error(runner.invoke(app, ["labels"]), 130, "interrupted")
    assert_failure_document(runner.invoke(app, ["--json", "labels"]), 130, "Interrupted", "interrupted")


# --- success documents, --version ----------------------------------------------------------------------------------
def test_version_under_json_is_a_document():
    for args in (["--json", "--version"], ["--version", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
        assert one_document(result) == {"ok": True, "version": __version__}
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"maisi {__version__}"


def test_success_documents_say_ok():
    for args in (["--json", "profiles", "list"], ["profiles", "list", "--json"], ["weights", "list", "--json"],
                 ["labels", "liver", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.stderr)
        document = one_document(result)
        assert document["ok"] is True and list(document)[0] == "ok", args


# --- the root flags after the command ------------------------------------------------------------------------------
def test_root_flags_are_read_after_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quiet = runner.invoke(app, ["generate", "--model", "demo", "--dry-run", "--quiet"])
    assert quiet.exit_code == 0, quiet.stderr
    assert "maisi generate --dry-run" in quiet.stdout and quiet.stderr == ""
    nested = runner.invoke(app, ["weights", "--quiet", "list", "-q", "--json"])
    assert nested.exit_code == 0, nested.stderr
    assert one_document(nested)["ok"] is True
    debug = runner.invoke(app, ["generate", "--size", "big", "--debug"])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "Error: --size" in debug.stderr


def test_an_option_value_spelt_like_a_root_flag_stays_a_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "--model", "demo", "--dry-run", "--out", "--json", "--quiet", "--json"])
    assert result.exit_code == 0, result.stderr
    plan = one_document(result)["plan"]
    assert Path(plan["out"]).name == "--json"
    number = runner.invoke(app, ["generate", "-n", "--json"])
    assert_one_line_error(number, 2, "--num-samples: ", "integer")  # -n's (bad) value, so no document
    after_dashes = runner.invoke(app, ["qc", "--", "--json", "--quiet"])  # after `--`: file names, not flags
    assert_one_line_error(after_dashes, 1, "IMAGE: '--json' does not exist")
    assert not (tmp_path / "--json").exists()  # the dry run wrote nothing there


def test_a_real_process_prints_one_document_and_one_line():
    from tests.cli.test_subprocess import run

    done = run("generate", "--num-samples", "0", "--json")
    assert done.returncode == 2
    document = json.loads(done.stdout)
    assert document == {"ok": False, "error": {"type": "UsageError", "exit_code": 2,
                                               "message": document["error"]["message"]}}
    assert done.stderr == f"Error: {document['error']['message']}\n"
    assert document["error"]["message"].startswith("--num-samples: ")


def test_a_command_exiting_with_its_own_status_is_a_failure_document(monkeypatch):
    def exits(query, table=None):
        raise SystemExit(4)

    monkeypatch.setattr(labels_command, "matching_labels", exits)
    result = runner.invoke(app, ["--json", "labels"])
    assert result.exit_code == 4
    assert one_document(result) == {"ok": False, "error": {"type": "Exit", "message": "exit code 4", "exit_code": 4}}

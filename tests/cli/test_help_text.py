"""`--help` of every command renders its help texts exactly (brackets included), names values in plain words, marks
required options; a missing or bad option is one line in maisi's words (no pydantic wording)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from maisi_cli.cli.app import app

CLI = Path(__file__).resolve().parents[2] / "maisi_cli" / "cli"
BRACKETED = re.compile(r"\[[^\[\]\n]*\]")
TYPER_TYPES = re.compile(r"<(bool|str|int|float|path|list\[[^>]*\]|int range|float range)>")
runner = CliRunner()


def command_paths() -> list[list[str]]:
    """Every command and group of the app, as the words that name it (the root is [])."""
    found: list[list[str]] = []

    def walk(command, words: list[str]) -> None:
        found.append(words)
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                walk(sub, [*words, name])

    walk(typer.main.get_command(app), [])
    return found


@pytest.fixture(scope="module")
def every_help() -> dict[str, str]:
    """Each command's --help, on a terminal wide enough that no line wraps."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "3000")
        helps = {}
        for words in command_paths():
            result = runner.invoke(app, [*words, "--help"])
            assert result.exit_code == 0, (words, result.output)
            helps[" ".join(["maisi", *words])] = result.output
    return helps


def source_help_texts() -> list[str]:
    """The help texts written in maisi_cli/cli: every `help=` string (and the per-trainer help texts handed to
    `trainer_options`), the HELP constants, the commands' docstrings; `\\[` read as `[`."""
    texts = []
    for path in sorted(CLI.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "trainer_options":
                values = [k.value for k in node.keywords if k.arg not in ("after_model", "after_batch_size")]
            elif isinstance(node, ast.keyword) and node.arg == "help":
                values = [node.value]
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "HELP"
                                                      for t in node.targets):
                values = [node.value]
            elif isinstance(node, ast.FunctionDef) and any("command" in ast.unparse(d) for d in node.decorator_list):
                texts.append(ast.get_docstring(node) or "")
                continue
            else:
                continue
            texts += [n.value for value in values for n in ast.walk(value)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return [text.replace("\\[", "[") for text in texts]


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_every_bracketed_word_of_the_help_sources_is_shown(every_help):
    """Each bracket of a help text, with the words around it, is in some command's --help as written."""
    shown = flat(" ".join(every_help.values()))
    seen, missing = set(), []
    for text in map(flat, source_help_texts()):
        for match in BRACKETED.finditer(text):
            seen.add(match.group())
            around = text[max(0, match.start() - 30):match.end() + 30]
            if around not in shown:
                missing.append(around)
    assert {"[dicom]", "[onnx]", "[trt]", "[0, 1]"} <= seen  # the scan sees the known ones
    assert not missing, f"help texts shown without their brackets: {missing}"
    assert "\\[" not in shown


def test_values_are_named_in_plain_words(every_help):
    typed = {command: sorted(set(TYPER_TYPES.findall(text))) for command, text in every_help.items()
             if TYPER_TYPES.search(text)}
    assert not typed, f"Typer's type names in --help: {typed}"
    generate = every_help["maisi generate"]
    assert re.search(r"--size\s+WxHxD", generate) and re.search(r"--num-samples\s+-n\s+N ", generate)
    assert re.search(r"--mask\s+PATH", generate) and re.search(r"--overwrite\s+Regenerate", generate)  # a flag: none
    assert re.search(r"\*\s+FOLDER\s+PATH", every_help["maisi data masks index"])


def test_required_options_are_marked(every_help):
    export = every_help["maisi export onnx"]
    assert re.search(r"\*\s+--out\s+-o\s+PATH .*\[required\]", export)
    for trainer in ("vae", "diffusion", "controlnet"):
        text = flat(every_help[f"maisi train {trainer}"])
        assert re.search(r"--data FILE [^│]*Required \(here or in --config\)", text), trainer
        assert re.search(r"--out -o DIR [^│]*Required \(here or in --config\)", text), trainer


def one_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("maisi: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_train_options_say_what_to_give(tmp_path):
    line = one_line(runner.invoke(app, ["train", "vae"]), 2)
    assert line == "Error: --data: required; give the training datalist, e.g. --data phantoms/datalist.json"
    line = one_line(runner.invoke(app, ["train", "vae", "--data", str(tmp_path / "list.json")]), 2)
    assert line == "Error: --out: required; give the output folder, e.g. --out runs/vae"
    config = tmp_path / "train.toml"
    config.write_text('data = "list.json"\n')
    line = one_line(runner.invoke(app, ["train", "diffusion", "--config", str(config)]), 2)
    assert line == (f"Error: --out: required; give the output folder, e.g. --out runs/diffusion (or set out in "
                    f"--config {config})")


def test_missing_click_option_says_what_to_give():
    line = one_line(runner.invoke(app, ["export", "onnx"]), 2)
    assert line == "Error: --out: required; give --out PATH (see `maisi export onnx --help`)"


def test_pydantic_problems_are_worded_by_maisi(tmp_path):
    """A profile file with a bad and a missing field: maisi's words, not pydantic's ('Input should be …',
    'Field required')."""
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ndevice = "cuda"\nmemory_gb = "lots"\nprecision = "fp16"\n'
                   "[fallback]\nmax_roi_latent_voxels = 70000\noverlap = 0.4\ntp_splits = 1\n")
    line = one_line(runner.invoke(app, ["profiles", "show", str(bad)]), 2)
    assert line == f"Error: --profile: '{bad}' field 'memory_gb': 'lots' is not a number"
    bad.write_text('name = "bad"\ndevice = "cuda"\nprecision = "fp16"\n')
    line = one_line(runner.invoke(app, ["profiles", "show", str(bad)]), 2)
    assert line == f"Error: --profile: '{bad}' field 'fallback': required"
    bad.write_text('name = "bad"\ndevice = "cuda"\nprecision = "fp16"\n'
                   "[fallback]\nmax_roi_latent_voxels = 70000\noverlap = 1.5\ntp_splits = 1\n")
    line = one_line(runner.invoke(app, ["profiles", "show", str(bad)]), 2)
    assert line == f"Error: --profile: '{bad}' field 'fallback.overlap': 1.5 is too large; use less than 1.0"


def test_a_manifest_case_is_worded_by_maisi(tmp_path):
    manifest = tmp_path / "cases.json"
    manifest.write_text('[{"mask": "m.nii.gz", "seed": "x"}]')
    line = one_line(runner.invoke(app, ["generate", "--manifest", str(manifest), "--dry-run"]), 2)
    assert line == f"Error: --manifest: {manifest}: case 0: seed: 'x' is not a whole number"

"""completions/maisi.{bash,zsh,fish}: what the app generates today, and a completion round trip that is fast and
does not import torch."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPLETIONS = ROOT / "completions"
MAISI = Path(sys.executable).parent / "maisi"
needs_maisi = pytest.mark.skipif(not MAISI.exists(), reason="no maisi executable beside this python")


def test_committed_scripts_equal_what_the_app_generates(tmp_path):
    done = subprocess.run([sys.executable, str(COMPLETIONS / "generate.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("maisi.bash", "maisi.zsh", "maisi.fish"):
        assert (tmp_path / name).read_bytes() == (COMPLETIONS / name).read_bytes(), (
            f"{name} is out of date: run `python completions/generate.py` and commit the result")
    assert (COMPLETIONS / "maisi.zsh").read_text().startswith("#compdef maisi\n")


def bash_complete(words: str, cword: int) -> tuple[list[str], float]:
    """Complete in a real bash that sourced completions/maisi.bash (which runs `maisi` back): (replies, CPU seconds
    of bash and the maisi it ran — unlike wall time, not inflated when other jobs share the cores)."""
    script = (f"source {COMPLETIONS / 'maisi.bash'}; COMP_WORDS=({words}); COMP_CWORD={cword}; "
              "_maisi_completion maisi; printf '%s\\n' \"${COMPREPLY[@]}\"")
    env = {**os.environ, "PATH": f"{MAISI.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    before = os.times()
    done = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    after = os.times()
    seconds = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(), seconds


@needs_maisi
@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_round_trip_completes_commands_and_options_quickly():
    replies, _ = bash_complete("maisi gen", 1)
    assert replies == ["generate"]
    replies, _ = bash_complete("maisi generate --pro", 2)
    assert "--profile" in replies
    seconds = sorted(bash_complete("maisi gen", 1)[1] for _ in range(3))
    # The goal is < 0.3 s wall on an idle machine (bench/completion_time.py records it). CPU time is asserted here,
    # less inflated than wall time on a busy machine: 0.73-0.88 s of bash + maisi on the project's 2-core machines
    # in 2026-12 (the same before and after the issue-21 redesign), while importing torch adds 2 s or more.
    assert statistics.median(seconds) < 1.5, seconds


@needs_maisi
def test_zsh_and_fish_requests_answer():
    base = {**os.environ, "_MAISI_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "maisi generate --pro"}
    done = subprocess.run([str(MAISI)], capture_output=True, text=True, env=base, timeout=60)
    assert done.returncode == 0 and '"--profile"' in done.stdout, done.stderr
    fish = {**os.environ, "_MAISI_COMPLETE": "complete_fish", "_TYPER_COMPLETE_FISH_ACTION": "get-args",
            "_TYPER_COMPLETE_ARGS": "maisi prof"}
    done = subprocess.run([str(MAISI)], capture_output=True, text=True, env=fish, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("profiles"), done.stderr


def test_completing_imports_neither_torch_nor_monai():
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted({'torch', 'monai'} & set(sys.modules))))\n"
            "from maisi_cli.cli.app import app\n"
            "app(prog_name='maisi')\n")
    env = {**os.environ, "_MAISI_COMPLETE": "complete_bash", "COMP_WORDS": "maisi generate --model ",
           "COMP_CWORD": "3"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"

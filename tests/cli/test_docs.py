"""The documentation: docs/cli.md is what the app generates today, the README stays short and keeps CI's test
command, and every relative link in README.md and docs/*.md reaches a file (and a heading, where it names one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
# Written by the lead of issue 21 alongside the API; until it lands, links to it are not checked.
PENDING = {DOCS / "python-api.md"}


def test_committed_cli_md_equals_what_the_app_generates(tmp_path):
    # Values that must not reach the page: the user's settings, a Slurm task, a narrow terminal, installed plugins
    # (MAISI_LOAD_PLUGINS unset loads them all), another working folder.
    env = {key: value for key, value in os.environ.items() if key != "MAISI_LOAD_PLUGINS"}
    env |= {"MAISI_WEIGHTS_DIR": str(tmp_path / "weights"), "MAISI_HOME": str(tmp_path / "home"),
            "MAISI_PROFILE_PATH": str(tmp_path), "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "7",
            "COLUMNS": "37", "LINES": "5"}
    done = subprocess.run([sys.executable, str(DOCS / "generate_cli_md.py"), "--out", "-"], capture_output=True,
                          env=env, cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == (DOCS / "cli.md").read_bytes(), (
        "docs/cli.md is out of date: run `python docs/generate_cli_md.py` and commit the result")


def test_cli_md_covers_every_command_and_no_plugin():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for command in ("maisi generate", "maisi weights download", "maisi data masks index", "maisi train vae",
                    "maisi export trt", "maisi profiles plan"):
        assert f"`{command}`" in text
    assert "- `-n, --num-samples N`: Number of image + label pairs. `[default: 1; x>=1]`" in text
    assert "maisi mr" not in text and str(ROOT) not in text


def test_readme_is_short_and_keeps_the_ci_test_command():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"
    long = [number for number, line in enumerate(lines, 1) if len(line) > 200]
    assert not long, f"README.md lines over 200 characters: {long}"
    # .ci/run runs "the README's test command": the README must name exactly that one.
    assert "python -m pytest -q" in lines


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation but '-' and '_' dropped, spaces to
    '-', a repeated anchor numbered (-1, -2, …); headings inside code blocks are not headings."""
    anchors: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not (match := re.match(r"#{1,6} (.+)", line)):
            continue
        anchor = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        numbered, count = anchor, 0
        while numbered in anchors:
            count += 1
            numbered = f"{anchor}-{count}"
        anchors.add(numbered)
    return anchors


def relative_links(page: Path) -> list[str]:
    """Every link target in a page that is neither a web address nor a mailto, code blocks excluded."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if destination in PENDING and not destination.exists():
            continue
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"

"""docs/python-api.md: every ```python block runs, in order, in one namespace, in a fresh folder (the page's
promise). A block marked ```python no-test (it needs downloaded weights) must at least compile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```$", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    return [(info.strip(), code) for info, code in BLOCK.findall(PAGE.read_text())]


def test_the_page_has_runnable_examples():
    runnable = [code for info, code in blocks() if info != "no-test"]
    assert len(runnable) >= 6 and any("Generator(" in code for code in runnable)
    for info, code in blocks():
        assert info in ("", "no-test"), f"unknown block marker {info!r}"
        compile(code, str(PAGE), "exec")


@pytest.mark.filterwarnings("ignore::maisi_cli.api.MaisiWarning")
def test_every_example_runs_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "python_api_docs"}
    for number, (info, code) in enumerate(blocks(), start=1):
        if info == "no-test":
            continue
        try:
            exec(compile(code, f"{PAGE.name} block {number}", "exec"), namespace)
        except Exception as error:  # name the block that failed
            raise AssertionError(f"{PAGE.name} block {number} failed: {error!r}\n{code}") from error
    printed = capsys.readouterr().out
    assert "quality check passed: off" in printed and "networks loaded 1 time(s)" in printed
    assert "UsageError --spacing" in printed
    assert sorted(p.name for p in (tmp_path / "demo-out").iterdir()) == [
        "maisi-run.json", "maisi_labels.ctbl", "maisi_labels_itksnap.txt", "preview.png", "sample_0000.json",
        "sample_0000_image.nii.gz", "sample_0000_label.nii.gz",
        "sample_0001.json", "sample_0001_image.nii.gz", "sample_0001_label.nii.gz"]

"""One demo Generator for the serve tests: its networks load once, as one server keeps its own."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def generator():
    from maisi_cli.api import Generator

    return Generator(model="demo", profile="cpu", device="cpu")

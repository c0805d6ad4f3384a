"""Shared fixtures for the unit tests: tiny MAISI model specs built from tests/helpers.py."""

from __future__ import annotations

import json

import pytest

from tests.helpers import tiny_spec_document


@pytest.fixture(scope="session")
def tiny_spec_path(tmp_path_factory):
    """Path to a tiny rflow model spec (MONAI's MAISI classes at a small size)."""
    path = tmp_path_factory.mktemp("tiny-model") / "tiny-rflow.json"
    path.write_text(json.dumps(tiny_spec_document("rflow")))
    return path


@pytest.fixture(scope="session")
def tiny_spec(tiny_spec_path):
    from maisi_cli.models import get_model

    return get_model(str(tiny_spec_path))

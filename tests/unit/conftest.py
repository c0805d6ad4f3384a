"""Shared fixtures for the unit tests: tiny MAISI model specs built from tests/helpers.py."""

from __future__ import annotations

import json
import os

# OpenMP spin-waiting makes some runs on a 2-vCPU VM 10x slower at random (monai-facts.md §7); this must be set
# before torch starts, and conftest.py is imported before any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from tests.helpers import tiny_spec_document  # noqa: E402


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

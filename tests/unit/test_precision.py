"""Which precision a generation runs in: --precision, the profile's, and bf16 only where the CPU computes it."""

from __future__ import annotations

import pytest

from maisi_cli.engine import runtime
from maisi_cli.engine.memory import resolve_profile
from maisi_cli.errors import UsageError


@pytest.fixture
def cpu_profile():
    return resolve_profile("cpu", "cpu")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_cpu_profile_runs_bf16_only_on_a_cpu_that_computes_it(monkeypatch, cpu_profile, native, expected):
    monkeypatch.setattr(runtime, "cpu_computes_bf16", lambda: native)
    assert cpu_profile.precision == "bf16"
    assert runtime.resolve_precision(None, cpu_profile, "cpu") == expected


def test_an_explicit_precision_is_kept_as_asked(monkeypatch, cpu_profile):
    monkeypatch.setattr(runtime, "cpu_computes_bf16", lambda: False)
    assert runtime.resolve_precision("bf16", cpu_profile, "cpu") == "bf16"
    assert runtime.resolve_precision("fp32", cpu_profile, "cpu") == "fp32"
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        runtime.resolve_precision("fp16", cpu_profile, "cpu")


def test_gpu_profiles_keep_their_precision_and_a_cpu_run_of_one_uses_fp32(cpu_profile):
    gpu = resolve_profile("24g", "cuda")
    assert runtime.resolve_precision(None, gpu, "cuda") == gpu.precision == "fp16"
    assert runtime.resolve_precision(None, gpu, "cpu") == "fp32"
    assert runtime.resolve_precision(None, cpu_profile, "cuda") == "fp16"


def test_the_bf16_check_answers_without_raising():
    assert isinstance(runtime.cpu_computes_bf16(), bool)

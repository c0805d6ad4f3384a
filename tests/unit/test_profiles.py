"""Profile selection: `auto` by free GPU memory, `cpu` without a GPU; profile files validated."""

from __future__ import annotations

import pytest

from maisi_cli.engine import memory
from maisi_cli.engine.memory import resolve_profile
from maisi_cli.errors import UsageError
from maisi_cli.profiles import get_profile, pick_gpu_profile, read_profile


@pytest.mark.parametrize(
    ("free_bytes", "expected"),
    [
        (8 * 10**9, "16g"),  # below every class: the smallest GPU profile
        (16_945_512_448, "16g"),  # V100 16GB
        (25_757_220_864, "24g"),  # RTX 4090
        (34_089_730_048, "32g"),  # V100 32GB
        (42_505_273_344, "32g"),  # A100 40GB
        (85_520_809_984, "80g"),  # H100 80GB
        (150 * 10**9, "80g"),  # H200
    ],
)
def test_auto_picks_the_largest_profile_that_fits(free_bytes, expected):
    assert pick_gpu_profile(free_bytes).name == expected


def test_auto_without_gpu_is_cpu():
    assert resolve_profile("auto", "cpu").name == "cpu"
    assert resolve_profile("24g", "cpu").name == "24g"


def test_auto_on_a_gpu_plans_for_its_free_memory(monkeypatch):
    """The free memory is asked of the chosen device (faked here); the profile keeps its table, with that budget."""
    asked = []
    monkeypatch.setattr(memory, "gpu_free_memory", lambda device: asked.append(device) or 25_757_220_864)
    profile = resolve_profile("auto", "cuda:1")
    assert asked == ["cuda:1"] and profile.name == "24g" and profile.memory_gb == 23.99
    assert profile.decode == get_profile("24g").decode and "(auto: 24.0 GiB free)" in profile.description


def test_profile_file_errors_name_the_field(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\ndevice = "tpu"\nprecision = "fp32"\n[fallback]\nmax_roi_latent_voxels = 9000\n'
                      "overlap = 0.5\ntp_splits = 1\n")
    with pytest.raises(UsageError, match="field 'device'"):
        read_profile(broken)
    not_toml = tmp_path / "bad.toml"
    not_toml.write_text("name = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        get_profile(str(not_toml))


def test_every_built_in_gpu_profile_matches_its_reference_rows():
    """Each tabled size of each profile reproduces the reference decode settings (reference-inference.md §14.1)."""
    reference = {
        ("16g", (256, 256, 128)): ((96, 96, 96), 0.25, 2),
        ("16g", (256, 256, 256)): ((48, 48, 64), 0.6666, 4),
        ("16g", (512, 512, 128)): ((64, 64, 32), 0.5, 2),
        ("24g", (256, 256, 256)): ((64, 64, 64), 0.25, 4),
        ("24g", (512, 512, 128)): ((80, 80, 32), 0.4, 2),
        ("24g", (512, 512, 512)): ((64, 64, 48), 0.4, 2),
        ("32g", (512, 512, 512)): ((80, 80, 48), 0.4, 4),
        ("80g", (512, 512, 512)): ((80, 80, 80), 0.4, 2),
        ("80g", (512, 512, 768)): ((80, 80, 96), 0.4, 4),
    }
    found = {}
    for name in ("16g", "24g", "32g", "80g"):
        for entry in get_profile(name).decode:
            found[(name, entry.size)] = (entry.roi, entry.overlap, entry.tp_splits)
    assert found == reference

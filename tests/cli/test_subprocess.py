"""The installed `maisi` executable, run as a user would: a real process, stdout and stderr apart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def maisi_executable() -> list[str]:
    beside_python = Path(sys.executable).parent / "maisi"
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("maisi")
    return [found] if found else [sys.executable, "-m", "maisi_cli"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*maisi_executable(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_generate_in_a_real_process_prints_one_json_document(tiny_model, mask_file, tmp_path):
    spec, weights = tiny_model
    out = tmp_path / "out"
    done = run("--json", "generate", "--model", str(spec), "--mask", str(mask_file), "--out", str(out), "-n", "2",
               "--no-qc", env={"MAISI_WEIGHTS_DIR": str(weights)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole of stdout is one document
    assert report["written"] == [0, 1]
    assert "sample 0001 denoise" in done.stderr  # progress goes to stderr as log lines off a TTY
    for k in range(2):
        image = nib.load(out / f"sample_{k:04d}_image.nii.gz")
        assert image.shape == (32, 32, 32) and image.get_data_dtype() == np.int16


def test_process_matches_cli_runner_output(tiny_model, mask_file, tmp_path):
    """The executable and the in-process app give the same bytes for the same seed."""
    from typer.testing import CliRunner

    from maisi_cli.cli.app import app

    spec, weights = tiny_model
    args = ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask_file), "--seed", "5",
            "--no-qc"]
    in_process = CliRunner().invoke(app, ["--quiet", *args, "--out", str(tmp_path / "a")])
    assert in_process.exit_code == 0, in_process.stderr
    done = run("--quiet", *args, "--out", str(tmp_path / "b"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    for name in ("sample_0000_image.nii.gz", "sample_0000_label.nii.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_error_in_a_real_process_is_one_line_and_exit_code(tmp_path):
    done = run("generate", "--size", "100", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("Error: --size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["models", "--help"], ["profiles", "list"]])
def test_help_and_listings_do_not_import_torch_or_monai(args):
    """`maisi --help` (and shell completion, which runs the program on every TAB) must answer without torch."""
    code = (
        "import sys\n"
        f"sys.argv = ['maisi', *{args!r}]\n"
        "from maisi_cli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'nibabel', 'huggingface_hub') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY=\n" in done.stderr or done.stderr.rstrip().endswith("HEAVY="), done.stderr


def test_version():
    from maisi_cli import __version__

    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"maisi {__version__}"


PRINT_WAIT_POLICY = ("import os, sys; sys.argv = ['maisi', *sys.argv[1:]]; import maisi_cli.cli.app; "
                     "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))")


@pytest.mark.parametrize(("args", "env_value", "expected"), [
    (["generate", "--help"], None, "PASSIVE"),   # inference: passive waiting, no erratic slow runs
    (["--json", "qc", "x.nii.gz"], None, "PASSIVE"),
    (["train", "vae", "--help"], None, "unset"),  # training: libgomp's short spin (up to 2.2x faster per CPU step)
    (["--json", "train", "diffusion"], None, "unset"),
    (["train", "vae"], "PASSIVE", "PASSIVE"),    # the user's own value always wins
    (["generate"], "ACTIVE", "ACTIVE"),
])
def test_openmp_wait_policy_is_chosen_per_command_before_torch_loads(args, env_value, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    done = subprocess.run([sys.executable, "-c", PRINT_WAIT_POLICY, *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected

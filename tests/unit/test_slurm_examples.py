"""examples/slurm_generate.sh and examples/slurm_train.sh: valid bash, and the parts the README promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("name", ["slurm_generate.sh", "slurm_train.sh"])
def test_example_is_valid_bash(name):
    done = subprocess.run(["bash", "-n", str(EXAMPLES / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_examples_use_the_array_and_torchrun_across_nodes():
    generate = (EXAMPLES / "slurm_generate.sh").read_text()
    assert "#SBATCH --array=0-9" in generate and "maisi --json generate" in generate and "-n 100" in generate
    train = (EXAMPLES / "slurm_train.sh").read_text()
    assert "srun torchrun" in train and '--nnodes "$SLURM_NNODES"' in train and "--rdzv_backend c10d" in train
    assert "-m maisi_cli train diffusion" in train

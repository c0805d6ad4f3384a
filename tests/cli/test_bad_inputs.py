"""Issue 20 item 5: bad inputs, walked through the real `maisi` command (a subprocess each, as a user's shell runs
it). Every one must end with the documented exit code, exactly one line on stderr, no traceback, and no file left
behind in the folder it ran in.

The cases run in a module fixture, each in a process of its own (forked, two at a time, from one that imported torch
and maisi once), then each case's test reads its own result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import phantom_labels, write_mask


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {kit} is the folder of prepared inputs, {spec}/{weights} the tiny model's
    exit_code: int
    fragments: tuple[str, ...] = ()  # each must be in the one stderr line


def generate(*args: str) -> tuple[str, ...]:
    return ("generate", "--out", "out", *args)


def demo(*args: str) -> tuple[str, ...]:
    return generate("--model", "demo", "--dry-run", *args)


def tiny(*args: str, weights: str = "{weights}") -> tuple[str, ...]:
    return generate("--model", "{spec}", "--weights-dir", weights, "--steps", "1", "--no-qc", *args)


CASES = [
    # --- option values: exit 2, before anything loads ---------------------------------------------------------
    Case("size not a number", generate("--size", "big"), 2, ("--size", "'big'")),
    Case("size zero", generate("--size", "0x64x64"), 2, ("--size", "positive")),
    Case("size four numbers", generate("--size", "64x64x64x64"), 2, ("--size",)),
    Case("spacing negative", generate("--spacing", "1x-1x1"), 2, ("--spacing",)),
    Case("spacing inf", demo("--spacing", "inf"), 2, ("--spacing", "inf")),
    Case("spacing nan", demo("--spacing", "nan"), 2, ("--spacing", "nan")),
    Case("spacing 1e-300", demo("--spacing", "1e-300", "--allow-any-size"), 2, ("--spacing",)),
    Case("spacing 0.001 any size", demo("--spacing", "0.001", "--allow-any-size"), 2, ("--spacing",)),
    Case("spacing huge", demo("--spacing", "1e6", "--allow-any-size"), 2, ("--spacing",)),
    Case("unknown model", generate("--model", "no-such-model"), 2, ("--model", "no-such-model")),
    Case("unknown profile", demo("--profile", "48g"), 2, ("--profile", "48g")),
    Case("shard out of range", generate("--shard", "3/2"), 2, ("--shard",)),
    Case("shard not I/N", generate("--shard", "half"), 2, ("--shard",)),
    Case("device unknown", demo("--device", "tpu"), 2, ("--device", "tpu")),
    Case("device absent gpu", demo("--device", "cuda:7"), 2, ("--device", "not available")),
    Case("precision unknown", generate("--precision", "fp8"), 2, ("--precision",)),
    Case("fp16 on the cpu", demo("--device", "cpu", "--precision", "fp16"), 2, ("--precision", "GPU")),
    Case("label mode unknown", generate("--label-mode", "some"), 2, ("--label-mode",)),
    Case("zero samples", generate("--num-samples", "0"), 2, ("--num-samples",)),
    Case("negative seed", generate("--seed", "-1"), 2, ("--seed",)),
    Case("zero steps", generate("--steps", "0"), 2, ("--steps",)),
    Case("steps not a number", generate("--steps", "many"), 2, ("--steps",)),
    Case("backend unknown", generate("--backend", "tensorflow"), 2, ("--backend",)),
    Case("onnx dir without onnx", generate("--onnx-dir", "x"), 2, ("--onnx-dir",)),
    Case("strict qc without qc", generate("--strict-qc", "--no-qc"), 2, ("--strict-qc",)),
    Case("guidance negative", generate("--guidance", "-1"), 2, ("--guidance", "negative")),
    Case("anatomy size not a number", generate("--anatomy", "liver:big"), 2, ("--anatomy",)),
    Case("anatomy kinds mixed", generate("--anatomy", "liver", "--anatomy", "spleen:0.5"), 2, ("--anatomy",)),
    Case("anatomy unknown name", demo("--anatomy", "kidney"), 2, ("--anatomy", "kidney")),
    Case("requested labels without anatomy", demo("--label-mode", "requested"), 2, ("--label-mode",)),
    Case("size over the machine", demo("--size", "4096", "--allow-any-size"), 2, ("--size",)),
    Case("unknown option", generate("--colour", "red"), 2, ("--colour",)),
    Case("option without its value", generate("--seed"), 2, ("--seed",)),
    Case("unknown command", ("generat",), 2, ("generat",)),
    Case("qc without its files", ("qc",), 2, ("IMAGE",)),
    Case("fid with one folder", ("fid", "{kit}"), 2, ("SYNTH",)),
    Case("model spec with a foreign class", tiny("--mask", "{kit}/mask.nii.gz") + ("--model", "{kit}/hostile.json"),
         2, ("os.system",)),
    Case("model spec value of the wrong type", ("generate", "--model", "{kit}/wrong-type.json", "--dry-run"), 2,
         ("wrong-type.json", "default_steps")),
    # --- inputs that cannot be used: exit 1 -------------------------------------------------------------------
    Case("mask missing", tiny("--mask", "{kit}/nope.nii.gz"), 1, ("--mask", "does not exist")),
    Case("mask not nifti", tiny("--mask", "{kit}/not-nifti.nii.gz"), 1, ("--mask", "not a readable NIfTI")),
    Case("mask labels over 255", tiny("--mask", "{kit}/wide.nii.gz"), 1, ("--mask", "0..255")),
    Case("mask fractional labels", tiny("--mask", "{kit}/fractional.nii.gz"), 1, ("--mask", "fractional")),
    Case("mask with zero spacing", tiny("--mask", "{kit}/zero-spacing.nii"), 1, ("--mask",)),
    Case("mask with non-finite affine", tiny("--mask", "{kit}/nan-affine.nii"), 1, ("--mask",)),
    Case("mask four-dimensional", tiny("--mask", "{kit}/four-d.nii.gz"), 1, ("--mask", "3-D")),
    Case("anatomy not in the mask", tiny("--mask", "{kit}/mask.nii.gz", "--anatomy", "pancreas"), 1,
         ("--anatomy", "pancreas")),
    Case("weights missing", tiny("--mask", "{kit}/mask.nii.gz", weights="{kit}/empty"), 1,
         ("autoencoder_v1.pt", "maisi weights download")),
    Case("checkpoint truncated", tiny("--mask", "{kit}/mask.nii.gz", weights="{kit}/truncated"), 1,
         ("not a readable PyTorch checkpoint",)),
    Case("checkpoint with pickled code", tiny("--mask", "{kit}/mask.nii.gz", weights="{kit}/pickled"), 1,
         ("weights_only",)),
    Case("checkpoint scale factor not a number", tiny("--mask", "{kit}/mask.nii.gz", weights="{kit}/bad-scale"), 1,
         ("scale_factor",)),
    Case("output under a file", tiny("--mask", "{kit}/mask.nii.gz") + ("--out", "{kit}/a-file/out"), 1,
         ("--out", "cannot write")),
    Case("output image path is a folder", tiny("--mask", "{kit}/mask.nii.gz") + ("--out", "{kit}/taken"), 1,
         ("sample_0000_image.nii.gz", "directory")),
    Case("lock file is a link", tiny("--mask", "{kit}/mask.nii.gz") + ("--out", "{kit}/linked"), 1,
         (".sample_0000.lock", "symbolic link")),
    Case("export into a read-only folder", ("export", "onnx", "--model", "demo", "--component", "vae-decoder",
                                            "--out", "/proc/self/maisi-export"), 1, ("--out", "cannot")),
    Case("qc on grids that differ", ("qc", "{kit}/ct.nii.gz", "{kit}/small-mask.nii.gz"), 1, ()),
    Case("qc on a missing image", ("qc", "{kit}/nope.nii.gz", "{kit}/mask.nii.gz"), 1, ("nope.nii.gz",)),
    Case("preview of a missing image", ("preview", "{kit}/nope.nii.gz", "--out", "p.png"), 2, ("nope.nii.gz",)),
    Case("fid of an empty folder", ("fid", "{kit}/empty", "{kit}/empty"), 1, ()),
    # --- a check that fails: exit 3 ---------------------------------------------------------------------------
    Case("qc on an all-NaN CT", ("qc", "{kit}/nan-ct.nii.gz", "{kit}/mask.nii.gz"), 3, ("non-finite",)),
]


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def save_with_sform_entry(path: Path, data: np.ndarray, row: int, column: int, value: float) -> None:
    """An uncompressed NIfTI whose sform has `value` at (row, column), which nibabel refuses to write (a zero
    spacing or a NaN has no quaternion): the header's bytes are patched — srow_x/y/z are 4 float32 each from byte
    280, qform_code (int16) is at byte 252 and set to 0, sform_code at byte 254 set to 1."""
    save(path, data)
    raw = bytearray(path.read_bytes())
    offset = 280 + 16 * row + 4 * column
    raw[offset:offset + 4] = np.float32(value).tobytes()
    raw[252:254] = np.int16(0).tobytes()
    raw[254:256] = np.int16(1).tobytes()
    path.write_bytes(bytes(raw))


def damaged_weights(source: Path, target: Path, damage) -> None:
    shutil.copytree(source, target)
    damage(target / "models")


def truncate(models: Path) -> None:
    path = models / "autoencoder_v1.pt"
    path.write_bytes(path.read_bytes()[:1000])


class Pickled:
    """Not a tensor: a weights_only load must refuse it."""


def add_pickled_object(models: Path) -> None:
    path = models / "autoencoder_v1.pt"
    state = torch.load(path, weights_only=True)
    state["extra"] = Pickled()
    torch.save(state, path)


def break_scale_factor(models: Path) -> None:
    path = models / "diff_unet_3d_rflow-ct.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["scale_factor"] = "x"
    torch.save(checkpoint, path)


def make_kit(kit: Path, spec: Path, weights: Path) -> None:
    """The inputs the cases name: label maps good and bad, damaged weight folders, hostile specs, occupied outputs."""
    size = (32, 32, 32)
    write_mask(kit / "mask.nii.gz", size, (2.0, 2.0, 2.0))
    (kit / "not-nifti.nii.gz").write_text("not an image")
    wide = phantom_labels(size).astype(np.uint16)
    wide[10:12, 10:12, 10:12] = 300
    save(kit / "wide.nii.gz", wide)
    fractional = phantom_labels(size).astype(np.float32)
    fractional[0, 0, 0] = 1.5
    save(kit / "fractional.nii.gz", fractional)
    save_with_sform_entry(kit / "zero-spacing.nii", phantom_labels(size), 1, 1, 0.0)
    save_with_sform_entry(kit / "nan-affine.nii", phantom_labels(size), 0, 3, np.nan)
    save(kit / "four-d.nii.gz", np.stack([phantom_labels(size)] * 2, axis=-1))
    save(kit / "small-mask.nii.gz", phantom_labels((16, 16, 16)))
    save(kit / "ct.nii.gz", np.zeros(size, dtype=np.int16))
    save(kit / "nan-ct.nii.gz", np.full(size, np.nan, dtype=np.float32))
    (kit / "empty").mkdir()
    for name, damage in (("truncated", truncate), ("pickled", add_pickled_object), ("bad-scale", break_scale_factor)):
        damaged_weights(weights, kit / name, damage)
    document = json.loads(spec.read_text())
    hostile = json.loads(json.dumps(document))
    hostile["network"]["controlnet_def"]["_target_"] = "os.system"
    (kit / "hostile.json").write_text(json.dumps(hostile))
    (kit / "wrong-type.json").write_text(json.dumps({**document, "default_steps": "ten"}))
    (kit / "a-file").write_text("")
    (kit / "taken" / "sample_0000_image.nii.gz").mkdir(parents=True)
    (kit / "linked").mkdir()
    (kit / "linked" / ".sample_0000.lock").symlink_to(kit / "a-file")


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# One process imports torch, MONAI and maisi once, then forks a child per case: each child is a real `maisi`
# process (its own exit code, stdout and stderr, files and working folder) without paying the imports again, which
# took most of this module's three minutes when each case started a fresh interpreter.
DRIVER = r"""
import json, os, sys
cases = json.load(open(sys.argv[1]))
import torch, monai, nibabel  # noqa: F401  (imported once, before the forks)
import maisi_cli.api, maisi_cli.engine.run, maisi_cli.engine.loading  # noqa: F401
from maisi_cli.cli.app import main

def run(case):
    os.chdir(case["folder"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.argv = ["maisi", *case["args"]]
    code = 1
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

running, codes = {}, {}
for case in cases:
    if len(running) >= 2:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid == 0:
        run(case)
    running[pid] = case["name"]
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump(codes, open(sys.argv[2], "w"))
"""


def run_cases(cases: list[Case], kit: Path, spec: Path, weights: Path, home: Path) -> dict[str, dict]:
    """Each case's exit code, stdout, stderr, what it left in its working folder and what it added to the kit."""
    env = {**os.environ, "MAISI_HOME": str(home / "maisi-home"), "HF_HOME": str(home / "hf-home"),
           "HF_HUB_OFFLINE": "1", "MAISI_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    for name in ("MAISI_WEIGHTS_DIR", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(name, None)
    plan = []
    for case in cases:
        folder = home / "cases" / case.name.replace(" ", "-")
        folder.mkdir(parents=True)
        plan.append({"name": case.name, "folder": str(folder), "stdout": str(home / f"{folder.name}.out"),
                     "stderr": str(home / f"{folder.name}.err"),
                     "args": [a.format(kit=kit, spec=spec, weights=weights) for a in case.args]})
    (home / "cases.json").write_text(json.dumps(plan))
    kit_before = files_under(kit)
    subprocess.run([sys.executable, "-c", DRIVER, str(home / "cases.json"), str(home / "codes.json")], env=env,
                   check=True, timeout=900, stdin=subprocess.DEVNULL)
    codes = json.loads((home / "codes.json").read_text())
    return {entry["name"]: {"exit_code": codes[entry["name"]], "stdout": Path(entry["stdout"]).read_text(),
                            "stderr": Path(entry["stderr"]).read_text(),
                            "left_in_folder": sorted(files_under(Path(entry["folder"]))),
                            "added_to_kit": sorted(files_under(kit) - kit_before)} for entry in plan}


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory) -> dict[str, dict]:
    home = tmp_path_factory.mktemp("bad-inputs")
    spec, weights = tiny_model
    kit = home / "kit"
    kit.mkdir()
    make_kit(kit, spec, weights)
    return run_cases(CASES, kit, spec, weights, home)


def test_the_table_holds_at_least_forty_bad_inputs():
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_with_its_exit_code_and_leaves_nothing(results, case):
    result = results[case.name]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["exit_code"] == case.exit_code, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith("Error: "), lines
    for fragment in case.fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result["left_in_folder"] == [], result["left_in_folder"]
    assert result["added_to_kit"] == [], result["added_to_kit"]

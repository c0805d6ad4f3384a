"""The one line an interrupted command (Ctrl-C, SIGTERM) ends with: what it had completed, and the command line that
continues it. Read from the command's options and from what is on disk, never from the half-done work: a sample is
complete once its sidecar is there (engine/run.py writes it last, atomically); a training epoch once
`train_state.pt` holds it (the renderer saw its "epoch" event, which comes after the save).

No torch here: a run can be interrupted while torch is still importing.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from maisi_cli.cli import terminal

SIDECAR = re.compile(r"sample_(\d+)\.json")


def interruption(signal_name: str, command: list[str], params: dict[str, Any], argv: list[str],
                 started: float = 0.0) -> str:
    """`command`: the words naming it (["maisi", "generate"]); `params`: its options as parsed (empty when the
    signal came before they were); `argv`: the command line as written after the program name; `started`: when the
    run began (time.time()), for samples rewritten under --overwrite."""
    head = f"interrupted ({signal_name})"
    prog, name = command[0], tuple(command[1:])
    if name == ("generate",) and params:
        args = [arg for arg in argv if arg != "--overwrite"]  # a resumed run must keep what this one completed
        note = "" if len(args) == len(argv) else " (without --overwrite: it would make them again)"
        return (f"{head}: {generate_done(params, started)}; to resume (complete samples are skipped), run"
                f"{note}: {shlex.join([prog, *args])}")
    if name[:1] == ("train",) and name[1:] not in (("embed",),):
        return train_line(head, prog, argv)
    if name in (("train", "embed"), ("data", "embed")):
        return (f"{head}: the latents written so far are kept; to resume (they are skipped), run: "
                f"{shlex.join([prog, *argv])}")
    return head


def complete_indices(folder: Path, started: float = 0.0) -> set[int]:
    """Indices of the samples in `folder` whose sidecar exists (written at or after `started`, when given)."""
    found = set()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = SIDECAR.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if started and entry.stat().st_mtime < started:
                continue
        except OSError:
            continue
        found.add(int(match.group(1)))
    return found


def generate_done(params: dict[str, Any], started: float) -> str:
    out = Path(params.get("out") or "maisi-out")
    since = started if params.get("overwrite") else 0.0
    if params.get("manifest"):  # one folder per case under --out
        cases = [folder for folder in sorted(out.iterdir()) if folder.is_dir()] if out.is_dir() else []
        done = sum(len(complete_indices(folder, since)) for folder in cases)
        return f"{done} sample(s) complete under {out}"
    from maisi_cli.config import parse_shard
    from maisi_cli.errors import UsageError

    total = int(params.get("num_samples") or 1)
    try:  # --shard, else a SLURM array, as the run itself read them
        index, count = parse_shard(params.get("shard"))
    except UsageError:
        index, count = 0, 1
    where = f" of shard {index}/{count}" if count > 1 else ""
    wanted = set(range(index, total, count))
    done = len(wanted & complete_indices(out, since))
    return f"{done} of {len(wanted)} sample(s){where} complete in {out}"


def train_line(head: str, prog: str, argv: list[str]) -> str:
    """Training: the last epoch saved by this run (the renderer notes it) and the command with --resume."""
    out = terminal.facts.get("train_out")
    epoch = terminal.facts.get("epoch")  # (done, total) of the last epoch saved
    saved = (Path(out) / "train_state.pt").is_file() if out is not None else epoch is not None
    if epoch is not None:
        done = f"epoch {epoch[0]} of {epoch[1]} saved" + (f" in {out}" if out is not None else "")
    elif saved:
        done = f"no new epoch finished; {out} holds the epochs saved before"
    else:
        done = "no epoch finished, nothing saved"
    if not saved:
        return f"{head}: {done}; to start again, run: {shlex.join([prog, *argv])}"
    return f"{head}: {done}; to resume, run: {shlex.join([prog, *resumed_args(argv)])}"


def resumed_args(argv: list[str]) -> list[str]:
    """`argv` that continues the run in --out: --resume added (and --no-resume or --init FILE, which a resume
    refuses, dropped)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--init":
            skip = True
            continue
        if arg.startswith("--init=") or arg == "--no-resume":
            continue
        args.append(arg)
    if "--resume" not in args:
        command_end = next((i for i, arg in enumerate(args) if arg == "--"), len(args))
        args.insert(command_end, "--resume")
    return args

"""Load and fault test of `maisi serve` on 127.0.0.1 (issue 27, "Must show"): N concurrent job submissions to a
real server (uvicorn, its own process), every one answered 202 or 429 and none lost; then kill -9 while a job
runs, restart on the same --data, and every accepted job completes once, each result byte for byte equal to
`maisi generate`'s for its seed.

The demo model on the CPU at 32^3 with one denoising step and no quality check (server and reference runs alike);
the jobs use --seeds distinct seeds, so --seeds reference runs of the CLI cover them all. "Once": a job done before
the kill keeps its sidecar untouched (same bytes, same mtime) and was started once; the job the kill interrupted
was started twice and its sample written by the second start only.

Usage: python bench/serve_load.py [--jobs 50] [--seeds 5] [--max-queue 40] → bench/results/serve_load.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SERVER_ARGS = ["--model", "demo", "--profile", "cpu", "--device", "cpu", "--steps", "1", "--no-qc",
               "--allow-any-size"]
CLI_ARGS = ["--quiet", "generate", "--model", "demo", "--profile", "cpu", "--device", "cpu", "--steps", "1",
            "--no-qc", "--allow-any-size", "--size", "32x32x32"]
PAIR = ("sample_0000_image.nii.gz", "sample_0000_label.nii.gz")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read() or b"{}")


def start_server(data: Path, port: int, max_queue: int, log: Path) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "maisi_cli", "serve", *SERVER_ARGS, "--data", str(data),
                               "--port", str(port), "--max-queue", str(max_queue)],
                              stdout=log.open("a"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            if call(port, "GET", "/v1/health/ready", timeout=5)[0] == 200:
                return server, time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not become ready; see {log}")
        time.sleep(0.2)


def jobs_in_store(data: Path) -> dict[str, dict]:
    with sqlite3.connect(data / "maisi-serve.db") as db:
        db.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in db.execute("SELECT id, state, starts, out FROM jobs")}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-queue", type=int, default=40)
    parser.add_argument("--done-before-kill", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="maisi-serve-load-"))
    data, log, port = work / "data", work / "server.log", free_port()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    server, ready_s = start_server(data, port, args.max_queue, log)
    bodies = [{"num_output_samples": 1, "body_region": ["abdomen"], "output_size": [32, 32, 32],
               "seed": k % args.seeds} for k in range(args.jobs)]

    def submit(body: dict) -> tuple[int, dict, float]:
        started = time.perf_counter()
        status, answer = call(port, "POST", "/v1/jobs", body)
        return status, answer, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        answers = list(pool.map(submit, bodies))
    accepted = {answer["id"]: body["seed"] for (status, answer, _), body in zip(answers, bodies) if status == 202}
    statuses = sorted({status for status, _, _ in answers})
    assert set(statuses) <= {202, 429}, statuses
    assert len(accepted) == min(args.jobs, args.max_queue), (len(accepted), statuses)

    # kill -9 while a job runs, once a few are done
    while True:
        counts = call(port, "GET", "/v1/jobs")[1]["counts"]
        if counts["done"] >= args.done_before_kill and counts["running"] == 1:
            running = [i for i, job in jobs_in_store(data).items() if job["state"] == "running"]
            os.kill(server.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    server.wait()
    at_kill = jobs_in_store(data)
    done_before = {i for i, job in at_kill.items() if job["state"] == "done"}
    before = {i: ((Path(at_kill[i]["out"]) / "sample_0000.json").read_bytes(),
                  (Path(at_kill[i]["out"]) / "sample_0000.json").stat().st_mtime_ns) for i in done_before}
    interrupted = running[0] if running else None
    interrupted_files = sorted(p.name for p in Path(at_kill[interrupted]["out"]).glob("*")) if interrupted else []

    server, restart_ready_s = start_server(data, port, args.max_queue, log)
    finish_started = time.perf_counter()
    while True:
        counts = call(port, "GET", "/v1/jobs")[1]["counts"]
        if counts["queued"] == 0 and counts["running"] == 0:
            break
        time.sleep(0.2)
    after_restart_s = time.perf_counter() - finish_started
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    final = jobs_in_store(data)

    references = {}
    for seed in range(args.seeds):
        out = work / f"cli-seed{seed}"
        subprocess.run([sys.executable, "-m", "maisi_cli", *CLI_ARGS, "--seed", str(seed), "--out", str(out)],
                       check=True)
        references[seed] = {name: digest(out / name) for name in PAIR}

    lost = sorted(set(accepted) - set(final))
    not_done = sorted(i for i in accepted if final[i]["state"] != "done")
    unequal = sorted(i for i, seed in accepted.items()
                     if {name: digest(Path(final[i]["out"]) / name) for name in PAIR} != references[seed])
    rerun = sorted(i for i in done_before
                   if final[i]["starts"] != 1 or before[i] != (
                       (Path(final[i]["out"]) / "sample_0000.json").read_bytes(),
                       (Path(final[i]["out"]) / "sample_0000.json").stat().st_mtime_ns))
    starts = {i: final[i]["starts"] for i in accepted}
    latencies = [seconds for _, _, seconds in answers]
    result = {
        "jobs_submitted": args.jobs, "max_queue": args.max_queue, "seeds": args.seeds,
        "accepted": len(accepted), "refused_429": sum(status == 429 for status, _, _ in answers),
        "other_statuses": [s for s in statuses if s not in (202, 429)],
        "submit_latency_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3)},
        "ready_s": round(ready_s, 1), "restart_ready_s": round(restart_ready_s, 1),
        "done_at_kill": len(done_before), "interrupted_job": interrupted,
        "interrupted_job_files_at_kill": interrupted_files,
        "interrupted_job_starts": final[interrupted]["starts"] if interrupted else None,
        "finish_after_restart_s": round(after_restart_s, 1),
        "lost": lost, "not_done": not_done, "unequal_to_cli": unequal, "done_before_kill_rerun": rerun,
        "max_starts": max(starts.values()), "jobs_started_twice": sorted(i for i, n in starts.items() if n > 1),
        "all_ok": not (lost or not_done or unequal or rerun)
        and (interrupted is None or final[interrupted]["starts"] == 2),
        "load_average_1min": os.getloadavg()[0],
        "machine": f"{os.cpu_count()} CPU(s), {sys.platform}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not result["all_ok"]:
        raise SystemExit(f"serve load test failed; server log: {log}")


if __name__ == "__main__":
    main()

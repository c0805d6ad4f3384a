"""README Table 3 on a GPU: time per stage and peak memory of `maisi generate`'s engine for every row, fp16.

For each Table 3 row (profile, output size; the decode ROI / overlap / TP splits come from the profile's table,
as `maisi generate --profile P --size S` resolves them) and each backend, one generation runs through the engine
(`Generator.plan_run` + `Generator.run`, the code path of `maisi generate`): rflow-ct, the row's
spacing (reference config_infer_* files), a phantom condition mask (`--mask`), 1 sample, no quality check, fp16.

Recorded per run:
- per stage seconds: load (hash + build + load weights), denoise and decode (from the sample's sidecar timings),
  write; end-to-end (run_generation wall time) and generate = denoise + decode (what Table 3's rflow time counts);
- peak GPU memory per stage: `torch.cuda.max_memory_allocated` and `max_memory_reserved`, the peak statistics reset
  before each stage (the engine's `load_networks`, `sampling.denoise` and `decode.decode_latents` are wrapped here for
  that; they are looked up at call time, so the engine runs unchanged).
Beside them: the published time ("rflow s / ddpm s", A100 80G) and peak, and the memory planner's prediction.

Backends: `torch` always; `trt` when `tensorrt` imports and the engine's request takes a `backend` field
(`maisi generate --backend`); otherwise the trt run is recorded as skipped with the reason.

Weights: the released rflow-ct files from `--weights-dir` or the Hugging Face cache (as `maisi generate`), or
`--random-weights` (the released layout with small random weights written to a temp folder: times and memory do
not depend on the values; outputs that overflow fp16 are recorded, the stage numbers are kept).

    python bench/gpu_table3.py [--weights-dir DIR | --random-weights] [--backends torch,trt] [--rows ID,...]
                               [--steps 30] [--repeats 1] [--out bench/results]
        → OUT/gpu_table3.json, OUT/gpu_table3.md
    python bench/gpu_table3.py --tiny [--out DIR]
        → the same code path on the CPU: the tiny test spec, 32³, 2 steps, fp32, random weights, no CUDA memory
          statistics (a smoke test) → OUT/gpu_table3_tiny.json, OUT/gpu_table3_tiny.md

Row ids: PROFILE-SIZE, e.g. 16g-256x256x128, 80g-512x512x768.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

# Spacing of each Table 3 size in the reference config_infer_* files (reference-inference.md §14.1).
SPACINGS = {
    (256, 256, 128): (1.5, 1.5, 4.0),
    (256, 256, 256): (1.5, 1.5, 2.0),
    (512, 512, 128): (0.75, 0.75, 4.0),
    (512, 512, 512): (0.75, 0.75, 1.0),
    (512, 512, 768): (0.75, 0.75, 0.66667),
}
TINY_SIZE = (32, 32, 32)
GIB = 1024**3


def table3_rows() -> list[dict[str, Any]]:
    """The nine rows with the planner's prediction: bench/results/memory_table3.json, else memory_fit.TABLE3."""
    path = HERE / "results" / "memory_table3.json"
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
    else:
        from memory_fit import TABLE3

        rows = TABLE3
    out = []
    for row in rows:
        size = tuple(row["size"])
        out.append({"id": f"{row['profile']}-{'x'.join(map(str, size))}", "profile": row["profile"],
                    "size": list(size), "roi": row["roi"], "overlap": row["overlap"], "tp_splits": row["tp_splits"],
                    "published": {"time_rflow_ddpm": row.get("time"), "peak_gib": row.get("peak_gib")},
                    "predicted_peak_gib": row.get("predicted_gib")})
    return out


def tensorrt_status() -> str | None:
    """None when a trt run can go ahead, else why not."""
    from maisi_cli.request import GenerateRequest

    if "backend" not in GenerateRequest.model_fields:
        return "the engine has no backend choice yet (GenerateRequest has no `backend`; `maisi generate --backend`)"
    try:
        import tensorrt  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return f"tensorrt does not import ({type(error).__name__}: {error})"
    return None


class StageMeter:
    """Wraps the engine's stage functions: seconds and (on CUDA) peak allocated / reserved bytes per stage."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.stages: dict[str, dict[str, float]] = {}

    def _begin(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def _end(self, name: str, start: float) -> None:
        import torch

        record: dict[str, float] = {}
        if self.cuda:
            torch.cuda.synchronize()
            record = {"allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                      "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}
        record["seconds"] = round(time.perf_counter() - start, 3)
        self.stages[name] = record

    def wrap(self, name: str, function):
        def measured(*args, **kwargs):
            start = self._begin()
            try:
                return function(*args, **kwargs)
            finally:
                self._end(name, start)

        return measured

    @contextlib.contextmanager
    def installed(self):
        """The engine's load_networks, denoise and decode_latents measured while inside."""
        from maisi_cli import api
        from maisi_cli.engine import samples

        # the names as the engine calls them: the Generator's load, the sample's denoising loop and decode
        originals = [(api, "load_networks"), (samples, "sample"), (samples, "decode_latents")]
        saved = [(module, attr, getattr(module, attr)) for module, attr in originals]
        names = {"load_networks": "load", "sample": "denoise", "decode_latents": "decode"}
        try:
            for module, attr, function in saved:
                setattr(module, attr, self.wrap(names[attr], function))
            yield self
        finally:
            for module, attr, function in saved:
                setattr(module, attr, function)


def run_once(row: dict[str, Any], backend: str, options: argparse.Namespace, model: str, weights_dir: Path | None,
             work: Path, cuda: bool) -> dict[str, Any]:
    """One generation of the row; never raises (a failure is recorded with the stages measured so far)."""
    import torch

    from maisi_cli.request import GenerateRequest
    from maisi_cli.api import Generator
    from maisi_cli.engine.qc import QCOptions
    from tests.helpers import write_mask

    size = tuple(TINY_SIZE if options.tiny else row["size"])
    spacing = (4.0, 4.0, 4.0) if options.tiny else SPACINGS.get(size, (1.0, 1.0, 1.0))
    mask = work / f"mask_{'x'.join(map(str, size))}.nii"
    if not mask.exists():
        write_mask(mask, size, spacing)
    out = work / f"out_{row['id']}_{backend}"
    fields: dict[str, Any] = {
        "model": model, "profile": row["profile"], "size": size, "spacing": spacing, "mask": mask, "out": out,
        "steps": options.steps, "device": "cuda" if cuda else "cpu", "precision": "fp16" if cuda else "fp32",
        "allow_any_size": True, "weights_dir": weights_dir, "overwrite": True, "seed": 0,
    }
    if backend != "torch":
        fields["backend"] = backend
    result: dict[str, Any] = {"backend": backend, "precision": fields["precision"], "status": "ok"}
    meter = StageMeter(cuda)
    started = time.perf_counter()
    try:
        request = GenerateRequest(**fields)
        generator = Generator.for_request(request)
        plan = generator.plan_run(request, QCOptions(enabled=False))
        result["decode_plan"] = plan.decode.model_dump()
        result["predicted"] = {k: plan.memory_estimate()[k] for k in ("peak_gib", "peak_stage", "diffusion_gib",
                                                                       "decode_gib")}
        with meter.installed():
            report = generator.run(plan)
        sidecar = json.loads(plan.samples[0].sidecar.read_text())
        result["sidecar_timings_s"] = sidecar["timings"]
        result["warnings"] = list(report.plan.get("warnings", []))
    except Exception as error:  # OOM, non-finite output of random weights, a missing weight file
        result["status"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
    end_to_end = time.perf_counter() - started
    timings = result.get("sidecar_timings_s", {})
    stage = meter.stages

    def seconds(name: str) -> float | None:
        value = timings.get(f"{name}_s", stage.get(name, {}).get("seconds"))
        return None if value is None else round(float(value), 3)

    result["timings_s"] = {"load": seconds("load"), "denoise": seconds("denoise"), "decode": seconds("decode"),
                           "write": seconds("write"), "end_to_end": round(end_to_end, 3)}
    if result["timings_s"]["denoise"] is not None and result["timings_s"]["decode"] is not None:
        result["timings_s"]["generate"] = round(result["timings_s"]["denoise"] + result["timings_s"]["decode"], 3)
    result["peak_memory_gib"] = ({name: {k: v for k, v in record.items() if k != "seconds"}
                                  for name, record in stage.items()} if cuda else None)
    if cuda:
        peaks = [r["allocated_gib"] for r in stage.values()]
        result["peak_allocated_gib"] = max(peaks) if peaks else None
        result["peak_reserved_gib"] = max((r["reserved_gib"] for r in stage.values()), default=None)
        gc.collect()
        torch.cuda.empty_cache()
    return result


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one row and backend: the last run's record with median times and the largest peaks."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[-1])
    merged["timings_s"] = {key: (round(statistics.median(v), 3) if v else None) for key in runs[-1]["timings_s"]
                           for v in [[r["timings_s"][key] for r in runs if r["timings_s"].get(key) is not None]]}
    for key in ("peak_allocated_gib", "peak_reserved_gib"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            merged[key] = max(values)
    merged["repeats"] = len(runs)
    merged["all_timings_s"] = [r["timings_s"] for r in runs]
    return merged


def markdown(document: dict[str, Any]) -> str:
    def value(v: Any, spec: str = ".1f", unit: str = "") -> str:
        return "–" if v is None else f"{format(v, spec)}{unit}"

    lines = [f"# README Table 3 measured ({document['device']})", "",
             f"{document['what']}", "",
             "| row | backend | decode | load | denoise | decode | generate (published rflow / ddpm) | end to end | "
             "peak allocated: denoise / decode | peak reserved | published peak | predicted | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in document["rows"]:
        for result in row["results"]:
            if result.get("skipped"):
                lines.append(f"| {row['id']} | {result['backend']} | | | | | | | | | | | skipped: {result['skipped']} |")
                continue
            plan = result.get("decode_plan") or {}
            roi = "×".join(map(str, plan.get("roi", []))) if plan else "–"
            decode = f"{plan.get('mode', '–')} {roi}, {plan.get('windows', '–')} win, TP {plan.get('tp_splits', '–')}"
            t = result["timings_s"]
            peaks = result.get("peak_memory_gib") or {}
            lines.append(
                f"| {row['id']} | {result['backend']} {result['precision']} | {decode} | {value(t['load'], unit=' s')} | "
                f"{value(t['denoise'], unit=' s')} | {value(t['decode'], unit=' s')} | "
                f"{value(t.get('generate'), unit=' s')} ({row['published']['time_rflow_ddpm'] or '–'}) | "
                f"{value(t['end_to_end'], unit=' s')} | "
                f"{value(peaks.get('denoise', {}).get('allocated_gib'), '.2f')} / "
                f"{value(peaks.get('decode', {}).get('allocated_gib'), '.2f')} G | "
                f"{value(result.get('peak_reserved_gib'), '.2f', ' G')} | "
                f"{value(row['published']['peak_gib'], '.1f', ' G')} | {value(row['predicted_peak_gib'], '.1f', ' G')} | "
                f"{result['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, help="released rflow-ct files (default: MAISI_WEIGHTS_DIR, "
                        "maisi's store, the Hugging Face cache)")
    parser.add_argument("--random-weights", action="store_true", help="time with random weights (no download)")
    parser.add_argument("--backends", default="torch,trt")
    parser.add_argument("--rows", help="comma-separated row ids (default: all nine)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny spec, 32³, random weights")
    options = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available() and not options.tiny
    if not cuda and not options.tiny:
        print("gpu_table3: no CUDA GPU here; run it on a GPU, or pass --tiny for the CPU smoke test",
              file=sys.stderr)
        return 2
    rows = table3_rows()
    if options.rows:
        wanted = [r.strip() for r in options.rows.split(",") if r.strip()]
        unknown = [w for w in wanted if w not in {r["id"] for r in rows}]
        if unknown:
            print(f"gpu_table3: unknown row(s) {', '.join(unknown)}; known: {', '.join(r['id'] for r in rows)}",
                  file=sys.stderr)
            return 2
        rows = [r for r in rows if r["id"] in wanted]
    backends = [b.strip() for b in options.backends.split(",") if b.strip()]
    work = Path(tempfile.mkdtemp(prefix="maisi-gpu-table3-"))
    os.environ.setdefault("MAISI_HOME", str(work / "home"))

    from maisi_cli.models import get_model
    from tests.helpers import write_released_weights, write_tiny_model

    if options.tiny:
        spec_path, weights_dir = write_tiny_model(work / "tiny", mask_generator=False)
        model, weights_label = str(spec_path), "random (tiny test spec)"
        options.steps = options.steps or 2
    else:
        model = "rflow-ct"
        weights_dir = options.weights_dir
        weights_label = f"released ({weights_dir or 'store / Hugging Face cache'})"
        if options.random_weights:
            weights_dir = work / "weights"
            write_released_weights(get_model(model), weights_dir)
            weights_label = "random (released layout, tests/helpers.write_released_weights)"
    spec = get_model(model)
    options.steps = options.steps or spec.default_steps
    trt_reason = tensorrt_status()

    import monai

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    document: dict[str, Any] = {
        "what": (f"maisi generate engine, {spec.name}, {options.steps} steps, 1 sample, phantom mask, no QC, "
                 f"{'fp16' if cuda else 'fp32'}, weights: {weights_label}"
                 + (f"; tiny smoke test at {'x'.join(map(str, TINY_SIZE))} (the rows' profiles, not their sizes)"
                    if options.tiny else "")),
        "device": device, "tiny": options.tiny, "steps": options.steps, "weights": weights_label,
        "versions": {"torch": torch.__version__, "monai": monai.__version__,
                     "cuda": torch.version.cuda if cuda else None},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": [],
    }
    stem = "gpu_table3_tiny" if options.tiny else "gpu_table3"
    options.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        entry = {**row, "results": []}
        if options.tiny:
            entry["size_run"] = list(TINY_SIZE)
        for backend in backends:
            if backend == "trt" and trt_reason is not None:
                entry["results"].append({"backend": "trt", "skipped": trt_reason})
                continue
            runs = [run_once(row, backend, options, model, weights_dir, work, cuda) for _ in range(options.repeats)]
            result = combine(runs)
            entry["results"].append(result)
            t = result["timings_s"]
            print(f"{row['id']} {backend}: {result['status']}, denoise {t['denoise']} s, decode {t['decode']} s, "
                  f"peak {result.get('peak_allocated_gib')} GiB", file=sys.stderr)
        document["rows"].append(entry)
        # Written after every row: a run stopped at a time limit (a lent GPU is held for minutes) keeps its rows.
        (options.out / f"{stem}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
        (options.out / f"{stem}.md").write_text(markdown(document))
    print(options.out / f"{stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

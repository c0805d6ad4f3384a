"""Host-side seconds per stage of `maisi generate` at 512x512x512, measured on the CPU with the networks replaced by
cheap stand-ins (a UNet and ControlNet that return zeros, a decoder that upsamples the latents to a CT-like volume), so
that everything the sidecar times besides the networks runs at full size: the condition mask, the condition inputs,
the denoising loop's scheduler steps, the decoder's output on the host, the finiteness check, the HU conversion and body
crop, the label map, the quality check, the writes and the sidecar.

The run goes through the real engine (engine/run.py run_generation via maisi_cli.Generator.run) into a fresh folder
with a 512³ label map on the target grid (bench/nrrd_write_512.py's synthetic torso, 20 organs and the body), two
samples (the second shows the background write overlapping the next sample). Each sample's sidecar timings are
reported, with `unaccounted_s`: total_s less the stages the sidecar names (other_s included), so the same script run
on older code (PYTHONPATH=an export of it) shows what that code's timings missed.

On a CPU the ControlNet's 8 condition bit planes (4 GiB at 512³) are made in host memory; on a GPU they are made there
(engine/samples.condition_inputs), so condition_s here is an upper bound of the GPU's host work.

Usage: python bench/host_stages_512.py [--size 512] [--samples 2] [--format nifti] [--label NAME]
    → bench/results/host_stages_512.json (a run per --label is kept: e.g. before/after)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(REPO))  # tests.helpers; maisi_cli from PYTHONPATH first (an older export)
from nrrd_write_512 import synthetic_pair  # noqa: E402  (the same synthetic torso as the write benches)


class ZeroUNet(torch.nn.Module):
    """The diffusion UNet's call, returning zeros: the scheduler's steps still run."""

    def forward(self, x, timesteps, **_inputs):
        return torch.zeros_like(x)


class NoControlNet(torch.nn.Module):
    """The ControlNet's call, returning no residuals (the stand-in UNet ignores them)."""

    def forward(self, x, timesteps, controlnet_cond=None, **_inputs):
        return [], None


class UpsamplingDecoder(torch.nn.Module):
    """(1, C, x, y, z) latents → (1, 1, 4x, 4y, 4z) in about [0, 1]: nearest upsampling of the first channel plus a
    fixed smooth field, a volume a CT decoder could give, made in a second or two."""

    def forward(self, z):
        base = torch.nn.functional.interpolate(z[:, :1].float(), scale_factor=4, mode="nearest")
        return torch.sigmoid(base * 0.5 + 0.2)


def mask_file(folder: Path, size: int) -> Path:
    import nibabel as nib

    _ct, labels, _affine = synthetic_pair(size, np.random.default_rng(0))
    if size != 512:
        labels = labels[:size, :size]
    path = folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--format", default="nifti")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "host_stages_512.json")
    options = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    import maisi_cli
    from maisi_cli.engine.qc import QCOptions
    from tests.helpers import write_tiny_model

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        spec, weights = write_tiny_model(work / "model")
        start = time.perf_counter()
        mask = mask_file(work, options.size)
        made_mask_s = time.perf_counter() - start
        generator = maisi_cli.Generator(model=str(spec), weights_dir=weights, device="cpu", precision="fp32")
        size = f"{options.size}x{options.size}x{options.size}"
        request = generator.request(mask=mask, out=work / "out", num_samples=options.samples, steps=2, seed=0,
                                    size=maisi_cli.api._triple(size), spacing=(1.0, 1.0, 1.0), allow_any_size=True,
                                    output_format=options.format)
        start = time.perf_counter()
        plan = generator.plan_run(request, QCOptions(enabled=True, max_attempts=1))
        plan_s = time.perf_counter() - start  # reads and fits the user's mask: before any sample

        real_networks = generator.networks

        def stand_ins(plan, on_progress):
            loaded = real_networks(plan, on_progress)  # the real weights' hashes and scheduler
            return dataclasses.replace(loaded, unet=ZeroUNet(), controlnet=NoControlNet(),
                                       decoder=UpsamplingDecoder())

        generator.networks = stand_ins
        start = time.perf_counter()
        report = generator.run(plan, on_warning=lambda message: None)
        run_s = time.perf_counter() - start
        samples = []
        for result in report.samples:
            sidecar = json.loads((work / "out" / f"sample_{result.index:04d}.json").read_text())
            timings = sidecar["timings"]
            named = sum(v for k, v in timings.items() if k != "total_s")
            samples.append({"index": result.index, "timings": timings,
                            "unaccounted_s": round(timings["total_s"] - named, 3)})
        decode = plan.decode.model_dump()
    result = {
        "what": f"host-side seconds per sidecar stage, {size}, networks replaced by stand-ins (bench docstring)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": [round(v, 1) for v in os.getloadavg()]},
        "format": options.format, "decode": {k: decode[k] for k in ("mode", "roi", "overlap") if k in decode},
        "synthetic_mask_s": round(made_mask_s, 3), "plan_s (reads and fits the mask)": round(plan_s, 3),
        "run_s": round(run_s, 3), "run_timings": {k: round(v, 3) for k, v in report.timings.items()},
        "samples": samples,
    }
    recorded = json.loads(options.out.read_text()) if options.out.exists() else {}
    recorded[options.label] = result
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(recorded, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

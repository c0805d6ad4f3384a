"""Where and how the engine computes: the device, the precision, and the process group of a `torchrun` job.

Shared by generation, training and FID; nothing here knows about models or files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maisi_cli.errors import UsageError
from maisi_cli.profiles import Profile


def resolve_device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.split(":", 1)[1]) if ":" in text and text.split(":", 1)[1].isdigit() else 0
        if ":" in text and not text.split(":", 1)[1].isdigit():
            raise UsageError(f"--device: '{text}' is not a device; use auto, cpu, cuda or cuda:N")
        if index >= count:
            raise UsageError(f"--device: '{text}' is not available (this machine has {count} GPU(s)); use --device cpu")
        return text
    raise UsageError(f"--device: '{text}' is not a device; use auto, cpu, cuda or cuda:N")


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX; oneDNN's own check). Without it bf16 is emulated
    and slower than fp32, so a profile's bf16 falls back to fp32 there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str | None, profile: Profile, device: str) -> str:
    """--precision, else the profile's (bf16 on a CPU only where `cpu_computes_bf16`), else fp16 on a GPU and fp32
    on a CPU. An explicit --precision bf16 is kept as asked."""
    on_gpu = device.startswith("cuda")
    if requested is None:
        if profile.device == ("cuda" if on_gpu else "cpu"):
            requested = profile.precision
            if requested == "bf16" and not on_gpu and not cpu_computes_bf16():
                requested = "fp32"
        else:
            requested = "fp16" if on_gpu else "fp32"
    if requested == "fp16" and not on_gpu:
        raise UsageError("--precision: fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return requested


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # a process group was initialised here

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_text: str) -> Runtime:
    """Device, and a process group when started by `torchrun` (WORLD_SIZE > 1): NCCL on GPUs, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_name = resolve_device(device_text)
    if device_name.startswith("cuda") and world_size > 1:
        device_name = f"cuda:{local_rank}"  # one GPU per process; the node's GPUs by LOCAL_RANK
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    runtime = Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)
    if world_size > 1:

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                    rank=rank, world_size=world_size)
            runtime.distributed = True
    return runtime


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed:

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:

        dist.barrier()

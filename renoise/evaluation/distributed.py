"""torch.distributed for `renoise eval`: one process per GPU (or CPU share), started by torchrun.

    ctx = setup("auto")          # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1
    ctx.device, ctx.rank, ctx.world
    ctx.broadcast(obj)           # rank 0's object on every rank
    ctx.barrier(); ctx.close()

NCCL when the processes use GPUs, gloo on CPU. The process group's timeout is long (default 24 h,
$RENOISE_EVAL_TIMEOUT_MIN minutes): ranks wait at the final barrier until the slowest has finished
its share, which on a large data set is far longer than torch's default.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "launched"]


def launched() -> bool:
    """Whether torchrun (or another launcher that sets WORLD_SIZE) started this process."""
    return "WORLD_SIZE" in os.environ


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: bool = False                 # whether this process initialised a process group

    def broadcast(self, obj):
        if not self.group:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def barrier(self):
        if self.group:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self):
        if self.group and dist.is_initialized():
            dist.destroy_process_group()
            self.group = False

    def _collective_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _device(name: str, local_rank: int) -> torch.device:
    """renoise.devices' choice; under torchrun a CUDA device means this process's LOCAL_RANK GPU."""
    from ..devices import resolve_device
    device = resolve_device(name)
    if launched() and device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; start at "
                             "most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
    elif launched() and device.type != "cpu":
        raise ValueError(f"--device {name}: under torchrun the processes use CUDA GPUs or the CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def setup(device: str = "auto") -> Context:
    """Join torchrun's process group (when launched by it) and pick this process's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    if not launched():                                   # a plain run; under torchrun even 1 process joins
        return Context(device=dev)
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; run eval as one process")
    minutes = float(os.environ.get("RENOISE_EVAL_TIMEOUT_MIN", 24 * 60))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev, group=True)

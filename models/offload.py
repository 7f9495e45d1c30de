"""Block offloading: run a transformer whose weights do not fit on the GPU.

    handle = enable_offload(model, "cuda")      # blocks live in host memory, the rest on the GPU
    out = model(x.cuda(), ...)                  # each block's weights go to the GPU just before it runs
    handle.remove()                             # back to plain modules, every weight in host memory

Each block of `model.transformer_blocks` (and `model.single_transformer_blocks`, FLUX) keeps its
weights in host memory (pinned when the target is CUDA, so copies are asynchronous). A forward
pre-hook points the block's parameters at fresh device copies; a forward hook points them back at
the host tensors, so the device copies are freed as soon as the block is done. Weights are never
copied back: the host tensors stay the weights (merging a LoRA between calls changes them).
Peak device memory: the non-block modules plus one block's weights and the activations.
"""
from __future__ import annotations

import torch
from torch import nn

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class Offload:
    """The hooks and host tensors of an offloaded model; `remove()` undoes `enable_offload`."""

    def __init__(self, model, blocks, device, host):
        self.model, self.blocks, self.device, self.host = model, blocks, device, host
        self.stored: dict[nn.Parameter | torch.Tensor, torch.Tensor] = {}
        self.handles = []
        self.transfers = 0             # blocks moved to the device so far (for tests and logs)

    def _load(self, block, args):
        for t in _tensors(block):
            t.data = self.stored[t].to(self.device, non_blocking=True, copy=True)
        self.transfers += 1

    def _unload(self, block, args, out):
        for t in _tensors(block):
            t.data = self.stored[t]
        return out

    def remove(self):
        """Remove the hooks; every block's weights stay in host memory (the rest of the model too)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.model.to(self.host)


def _tensors(block):
    return [*block.parameters(recurse=True), *block.buffers(recurse=True)]


def enable_offload(model: nn.Module, device, *, blocks=None) -> Offload:
    """Keep `blocks` (default: the model's transformer block lists) in host memory and move each to
    `device` only while it runs; everything else of `model` goes to `device` now. Returns the handle."""
    device = torch.device(device)
    if blocks is None:
        blocks = [b for name in BLOCK_LISTS for b in getattr(model, name, ())]
    blocks = list(blocks)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no {' / '.join(BLOCK_LISTS)}; pass blocks= (the modules "
                         "to offload)")
    params = [t for b in blocks for t in _tensors(b)]
    if any(t.is_meta for t in params):
        raise ValueError("the model still has meta tensors: load its weights before enable_offload")
    host = params[0].device
    if host.type != "cpu":
        raise ValueError(f"the blocks' weights are on {host}; load the model on the CPU to offload it")
    handle = Offload(model, blocks, device, host)
    in_blocks = {id(t) for t in params}
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in in_blocks:
                t.data = t.data.to(device)
        for t in params:
            handle.stored[t] = t.data.pin_memory() if device.type == "cuda" else t.data
            t.data = handle.stored[t]
    for b in blocks:
        handle.handles.append(b.register_forward_pre_hook(handle._load))
        handle.handles.append(b.register_forward_hook(handle._unload))
    return handle

"""torch.distributed plumbing: process group from torchrun's environment, DDP/FSDP wrapping,
metric reduction and per-rank RNG state. A single process (no ``WORLD_SIZE``) is world 1 and
every helper here is then a no-op.

Strategies: ``ddp`` wraps the whole distiller in DistributedDataParallel (teachers hold no
trainable parameters, so they are replicated, not wrapped); ``fsdp`` shards the student (per
stage, then the root), projectors and loss modules with FSDP2's ``fully_shard`` while the
frozen teachers stay whole on every rank. On CPU the backend is gloo, on CUDA nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment (or stay single)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def device_for(name: str, d: Dist) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None and d.active:
        return torch.device("cuda", d.local_rank)
    return dev


def wrap(distiller: nn.Module, strategy: str, d: Dist, find_unused: bool = False) -> nn.Module:
    """The module the loop calls: the distiller itself, DDP around it, or FSDP2 inside it."""
    if not d.active:
        return distiller
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(distiller.student.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        return DDP(distiller, device_ids=ids, find_unused_parameters=find_unused)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dev = next(distiller.student.parameters()).device
        mesh = init_device_mesh(dev.type, (d.world,))
        student = distiller.student
        for path in getattr(student, "stages", []):
            mod = student.get_submodule(path)
            if any(p.requires_grad for p in mod.parameters()):
                fully_shard(mod, mesh=mesh)
        fully_shard(student, mesh=mesh)
        extras = [*distiller.projectors.values(), *distiller.loss_modules.values()]
        if getattr(distiller, "mixture", None) is not None:
            extras.append(distiller.mixture)
        for mod in extras:
            if any(p.requires_grad for p in mod.parameters()):
                fully_shard(mod, mesh=mesh)
        return distiller
    raise ValueError(f"unknown strategy {strategy!r}")


def all_reduce_sums(sums: dict, d: Dist) -> dict:
    """Sum metric sums over ranks. Scalars (floats or 0-d tensors) come back as floats,
    larger tensors (a confusion matrix) as CPU float64 tensors, and ``cat:`` entries
    (retrieval embeddings) are concatenated in rank order."""
    scalars = sorted(k for k, v in sums.items() if not torch.is_tensor(v) or v.dim() == 0)
    scalars = [k for k in scalars if not k.startswith("cat:")]
    out = {}
    if scalars:
        t = torch.tensor([float(sums[k]) for k in scalars], dtype=torch.float64)
        if d.active:
            dist.all_reduce(t)
        out.update(zip(scalars, t.tolist()))
    for k, v in sums.items():
        if k in out:
            continue
        if k.startswith("cat:"):
            v = v.detach().cpu()
            if d.active:
                parts = [None] * d.world
                dist.all_gather_object(parts, v)
                v = torch.cat(parts)
            out[k] = v
        else:
            v = v.detach().double()
            if d.active:
                v = v.clone()
                dist.all_reduce(v)
            out[k] = v.cpu()
    return out


def gather_rng(d: Dist) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (rank order), so a resumed run restores each rank's own."""
    state = torch.get_rng_state()
    if not d.active:
        return [state]
    out = [torch.empty_like(state) for _ in range(d.world)]
    dist.all_gather(out, state)
    return out


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: a barrier, then destroy it. A rank that exits while
    its peer is still tearing gloo down can abort the peer ("terminate called without an
    active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

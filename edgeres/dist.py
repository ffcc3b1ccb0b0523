"""torchrun: the process group (gloo on CPU, nccl on CUDA) and the sharding of a global batch across processes.

`train` and QAT run under `torchrun --nproc-per-node N` with the recipe's batch as the GLOBAL batch; only rank 0
evaluates what is reported and writes.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

from edgeres.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _leave() -> None:
    """Tear the process group down before the interpreter exits: a gloo group left to the C++ destructors can
    abort the process at exit ("terminate called without an active exception", SIGABRT) after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_of_global_batches(n: int, global_batch: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                            drop_last: bool = True) -> list[int]:
    """Rank `rank`'s sample indices, in order, for one epoch: global batch i is slice i of the (seed, epoch)
    permutation that a single process walks (the one `make_loader` draws), and each rank takes its contiguous
    1/world of it. Summed over ranks, step i sees exactly the single process's batch i, so averaged gradients
    match one process up to float noise."""
    import torch

    if global_batch % world:
        raise ConfigError(f"batch size {global_batch} must divide by the {world} processes")
    g = torch.Generator()
    g.manual_seed(seed + epoch)   # DistributedSampler's draw, as make_loader uses it with one replica
    perm = torch.randperm(n, generator=g).tolist()
    per = global_batch // world
    steps = n // global_batch if drop_last else -(-n // global_batch)
    out: list[int] = []
    for i in range(steps):
        batch = perm[i * global_batch:(i + 1) * global_batch]
        out += batch[rank * per:(rank + 1) * per] if len(batch) == global_batch else \
            batch[rank::world]   # the last, short batch (drop_last=False): split as evenly as it goes
    return out


def all_sum(values, device=None):
    """Sum a list of floats over every process (the list itself when alone)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(device or "cuda")
    dist.all_reduce(t)
    return t.cpu().tolist()

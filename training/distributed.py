"""Training on several processes or machines, as `torchrun` starts them.

torchrun runs `vae-train` once per rank with RANK, WORLD_SIZE and LOCAL_RANK set; alone, the
program is rank 0 of a world of 1 and nothing here does anything. Every rank holds the whole
(small) data set in memory and draws the same shuffled order each epoch; each takes every
world_size-th row of every global batch (`--batch-size` is the global batch), and
DistributedDataParallel averages the gradients: gloo on CPU, NCCL on GPU. Only rank 0 prints,
evaluates, writes checkpoints and exports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: every size-th one, so shares differ by one row at most."""
        return rows[self.rank :: self.size]

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: on CUDA, the GPU of its local rank."""
        if device.type != "cuda" or self.size == 1:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise SystemExit(f"rank {self.rank}: local rank {self.local_rank} has no GPU of its own (this machine has "
                             f"{torch.cuda.device_count()}); start at most that many processes per node "
                             f"(torchrun --nproc_per_node), or train on the CPU with --device cpu")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def sum(self, value: float, device: torch.device) -> float:
        """`value` summed over the ranks (every rank gets the total)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())


def start(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

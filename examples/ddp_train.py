"""DistributedDataParallel + batchnorm.SyncBatchNorm on CPU equals single-process training.

Run (2 processes on this machine, gloo over loopback; any number of processes works)::

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 5

Each rank trains on its shard of the batch (the shards may be uneven); every rank also
trains a torch.nn copy of the model, one process, on the whole batch. After N steps the
parameters and running statistics must agree to 1e-10 (float64). Prints a verdict and
exits with status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchnorm.convert import convert_sync_batchnorm

TOLERANCE = 1e-10


def make_model() -> nn.Module:
    """A small CNN with BatchNorm2d and BatchNorm1d (torch.nn layers), float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 4),
    ).double()


def full_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(size, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (size,), generator=g))


def shard_sizes(size: int, world: int) -> list[int]:
    """As even as possible; the first ``size % world`` ranks take one more sample."""
    return [size // world + (r < size % world) for r in range(world)]


def train(model: nn.Module, steps: int, batch: int, rank: int, world: int) -> None:
    """``steps`` SGD steps on this rank's shard. The loss is the rank's share of the mean
    over the whole batch (sum / batch * world): DDP averages gradients over ranks, so the
    update is that of the full-batch mean loss even with uneven shards."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sizes = shard_sizes(batch, world)
    start = sum(sizes[:rank])
    for step in range(steps):
        x, y = full_batch(step, batch)
        x, y = x[start:start + sizes[rank]], y[start:start + sizes[rank]]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * world / batch
        loss.backward()
        opt.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=13, help="global batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    ddp = DistributedDataParallel(convert_sync_batchnorm(make_model()))
    train(ddp, args.steps, args.batch, rank, world)
    single = make_model()
    train(single, args.steps, args.batch, rank=0, world=1)

    ours, ref = ddp.module.state_dict(), single.state_dict()
    diff = max((ours[k].double() - ref[k].double()).abs().max().item() for k in ref)
    worst = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    equal = worst.item() <= TOLERANCE
    if rank == 0:
        print(f"ddp_train: {world} ranks x {args.steps} steps, batch {args.batch} split "
              f"{shard_sizes(args.batch, world)}: max |difference| from single-process training "
              f"over parameters and running statistics = {worst.item():.2e} -> "
              f"{'EQUAL' if equal else 'MISMATCH'} (tolerance {TOLERANCE:g})")
    # Every rank reaches this point before any tears gloo down: a rank that exits while
    # another still talks to it can abort in gloo's threads ("terminate called without
    # an active exception") after the results are in.
    del ddp  # its reducer holds gloo work; release it before the process group
    dist.barrier()
    dist.destroy_process_group()
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())

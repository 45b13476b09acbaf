"""Several processes on one job, started by PyTorch's launcher: ``torchrun --nproc_per_node N -m captioner ...``.

torchrun gives each process its place in environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). Without them (a plain
``captioner ...``) a command is rank 0 of 1 and nothing here communicates, so single-process
behaviour never depends on torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# How long a rank waits for the others at a barrier. Ranks get equal shares, but one may start
# later or run on a slower device; torchrun stops every rank as soon as one fails, so a long wait
# only happens when a peer is alive but stuck.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)
STOP_GRACE_SECONDS = 2.0  # a rank that stops because another failed waits this long before it exits


def env_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}: expected "
                         "whole numbers (these are set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"WORLD_SIZE={world}, RANK={rank}: expected 0 <= RANK < WORLD_SIZE (set by torchrun)")
    return rank, world


@dataclass
class Group:
    """This process's rank among ``world`` processes, and the few collectives the commands need."""

    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable, small)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_numbers(self, values: list[float]) -> list[float]:
        """Rank 0's numbers on every rank (cheaper than :meth:`broadcast`: called once per step)."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0)
        return t.tolist()

    def broadcast_tensors(self, tensors) -> None:
        """Overwrite ``tensors`` (e.g. a model's state_dict().values()) in place with rank 0's."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        box: list[Any] = [None] * self.world
        dist.all_gather_object(box, obj)
        return box

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by every rank; when it fails on any rank, every rank fails: the first rank
        that failed raises its own error, the others a ValueError with its message (a RuntimeError
        for a bug), instead of going on to wait in a collective for a rank that has stopped."""
        if self.world == 1:
            return fn()
        result, failure = None, None
        error: BaseException | None = None
        try:
            result = fn()
        except Exception as e:  # shared below, then raised again here
            error = e
            user = isinstance(e, (ValueError, OSError))
            text = (f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror
                    else str(e))
            failure = (user, text if user else f"{type(e).__name__}: {e}")
        for rank, failed in enumerate(self.gather(failure)):
            if failed is None:
                continue
            if rank == self.rank:
                raise error
            user, text = failed
            # torchrun stops every rank as soon as one exits: leave rank `rank` a moment to report its own error
            time.sleep(STOP_GRACE_SECONDS)
            raise (ValueError if user else RuntimeError)(f"{text} (rank {rank} stopped; so does rank {self.rank})")
        return result

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 only; its result is handed to every rank, and so is its failure:
        the other ranks raise a ValueError with rank 0's message instead of waiting for it forever."""
        if self.world == 1:
            return fn()
        return self.broadcast(self.agree(fn if self.rank == 0 else lambda: None))


def one_node(world: int) -> bool:
    """True when all ``world`` processes are on this machine (torchrun's LOCAL_WORLD_SIZE says so)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is None or not local.isdigit() or int(local) == world


def backend_for(device) -> str:
    """The process group backend for ranks whose networks run on ``device`` (a torch.device, or None
    when it is not known yet): gloo on CPUs; on GPUs NCCL for the GPU tensors (DDP's gradients) and
    gloo for the CPU tensors (the few numbers and objects the commands exchange)."""
    return "cpu:gloo,cuda:nccl" if device is not None and device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(backend: str = "gloo"):
    """The :class:`Group` of this process: under torchrun (WORLD_SIZE > 1) a process group is set up
    for the duration (unless one already is); otherwise rank 0 of 1, with no communication.
    ``backend``: see :func:`backend_for` (a CUDA backend needs ``torch.cuda.set_device`` first)."""
    rank, world = env_world()
    if world == 1:
        yield Group()
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    # torn down on a failure too, with gloo: a process that ends with the group alive can abort in C++ at
    # exit ("terminate called without an active exception", SIGABRT instead of its exit status). Not with
    # NCCL, whose teardown can wait for ranks that are not tearing down (they may still be running)
    ok = False
    try:
        yield Group(dist.get_rank(), dist.get_world_size())
        ok = True
    finally:
        if created and (ok or "nccl" not in backend):
            dist.destroy_process_group()

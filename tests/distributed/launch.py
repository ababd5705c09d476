"""Run a function on N gloo ranks (CPU processes), with a deadline so a hang fails the test."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

# Two ranks import torch and eightbit and step a few small models: seconds. A hung collective
# would block CI forever; past this many seconds the ranks are killed and the test fails.
DEADLINE_S = 180


def join_group(store: str, rank: int, world_size: int) -> None:
    """Join a gloo group of ``world_size`` ranks met through the file ``store``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=DEADLINE_S))


def _entry(rank: int, fn, world_size: int, store: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # the ranks share 2 cores
    import torch

    torch.set_num_threads(1)
    join_group(store, rank, world_size)
    try:
        fn(rank, world_size, *args)
        if dist.is_initialized():  # fn may have left its group (workers.scenario does)
            dist.barrier()  # no rank tears down gloo while a peer still talks to it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # A rank that finished leaves without interpreter teardown: now and then torch's C++
    # teardown after an FSDP2 run aborted the process ("terminate called without an active
    # exception") after all its work was done and written, failing a launch that had passed.
    # A rank that raised does not get here: its exception still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, world_size: int, *args, deadline_s: float = DEADLINE_S) -> None:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in one gloo
    group (a file store: no port to pick); a rank's exception fails the caller."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_entry, args=(fn, world_size, f"{tmp}/store", args),
                                     nprocs=world_size, join=False, start_method="spawn")
        end = time.monotonic() + deadline_s
        while not context.join(timeout=max(0.1, end - time.monotonic())):
            if time.monotonic() > end:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {deadline_s} s")

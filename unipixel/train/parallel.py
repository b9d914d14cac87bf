"""Data-parallel training processes, shared by the trainer and `sam_stage`.

Every process draws its own scenes, runs its own copy of the model (on the one GPU when there is
one, else on one CPU thread) and averages its gradients with the others every step (gloo, the
backend that also runs without a GPU). The small shapes models are bound by kernel launches and by
drawing scenes on the CPU, so processes, not batch size, are what scale: on a 2-core CPU two
processes of one thread do about 1.6x the samples of one process with two threads, and 12
processes on a 16-core GPU machine about 9x.
"""
from __future__ import annotations

import socket

import torch


def spawn(fn, workers: int, *args, **kwargs) -> None:
    """Run `fn(*args, rank=rank, workers=workers, **kwargs)` in `workers` processes joined in one
    process group; with one worker, here, with the threads it has."""
    if workers == 1:
        fn(*args, rank=0, workers=1, **kwargs)
        return
    with socket.socket() as sock:  # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(fn, workers, port, args, kwargs), nprocs=workers)


def _worker(rank: int, fn, workers: int, port: int, args: tuple, kwargs: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    try:
        fn(*args, rank=rank, workers=workers, **kwargs)
    finally:
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], workers: int) -> None:
    """All-reduce every gradient as one flat buffer (a path a sample did not use counts as zero),
    on the host, where gloo reduces."""
    import torch.distributed as dist

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    host = flat.cpu()
    dist.all_reduce(host)
    flat = host.to(flat.device) / workers
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def agreed_spent(spent: float, workers: int) -> float:
    """The largest share of the time budget any process has used: every process then takes the same
    learning rate and stops at the same step."""
    if workers == 1:
        return spent
    flag = torch.tensor([spent])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item()

"""Chapter 09's worker processes: a tensor-parallel MLP and an all-reduce timing, on torch.distributed.

Processes started with ``spawn`` are fresh interpreters: they find the function they run by importing its
module, so that function cannot live in a notebook.  It lives here, and the notebook imports this module
and calls :func:`run_ranks`.

Each rank makes the same random weights from a seed and keeps only its slice of them, as a real rank reads
only its slice of a checkpoint.  Results come back as pickled bytes over a pipe, one per rank.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOOPBACK = "127.0.0.1"


def make_mlp(seed: int, hidden: int, intermediate: int):
    """The full weights of a SwiGLU MLP (gate, up: [intermediate, hidden]; down: [hidden, intermediate])."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(intermediate, hidden, generator=g) / hidden ** 0.5
    up = torch.randn(intermediate, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(hidden, intermediate, generator=g) / intermediate ** 0.5
    return gate, up, down


def shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s equal slice of ``t`` along ``dim`` (of ``size`` slices)."""
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n)


def mlp_rank(rank: int, size: int, seed: int, x: torch.Tensor, hidden: int, intermediate: int):
    """One rank of a tensor-parallel MLP: column-parallel gate and up, row-parallel down, one all-reduce.
    Returns (this rank's partial sum, the all-reduced output)."""
    gate, up, down = make_mlp(seed, hidden, intermediate)
    gate, up, down = shard(gate, 0, rank, size), shard(up, 0, rank, size), shard(down, 1, rank, size)
    h = F.silu(F.linear(x, gate)) * F.linear(x, up)  # this rank's intermediate features: no communication
    partial = F.linear(h, down)  # a full-shaped partial sum
    y = partial.clone()
    dist.all_reduce(y)  # sum over the ranks, in place, on every rank
    return partial, y


def allreduce_timing(rank: int, size: int, numels: list[int], repeats: int = 20):
    """Median seconds of one all-reduce of ``n`` float32 values, for each ``n``."""
    out = []
    for n in numels:
        t = torch.ones(n)
        dist.all_reduce(t)  # warm-up (and the first contact for this size)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        out.append(sorted(times)[len(times) // 2])
    return out


def _rank_main(fn, rank, size, port, conn, args):
    """What each spawned process runs: join the group, call ``fn(rank, size, *args)``, send the result."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))  # the ranks share the CPU's cores
    try:
        store = dist.TCPStore(LOOPBACK, port, None, False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
        try:
            result = fn(rank, size, *args)
        finally:
            dist.destroy_process_group()
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException as e:
        conn.send_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


def run_ranks(fn, size: int, *args, timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, size, *args)`` in ``size`` fresh processes that form one gloo process group; return
    each rank's result, in rank order.  The processes have exited when this returns (or raises)."""
    ctx = mp.get_context("spawn")
    # the rendezvous: a key-value store on a port the OS picks (port 0), so nothing fixed can collide
    store = dist.TCPStore(LOOPBACK, 0, None, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    procs, conns = [], []
    try:
        for rank in range(size):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_main, args=(fn, rank, size, store.port, child, args), daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        results = []
        deadline = time.monotonic() + timeout_s
        for rank, conn in enumerate(conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"rank {rank} sent nothing within {timeout_s:.0f} s")
            try:
                status, value = pickle.loads(conn.recv_bytes())
            except EOFError:
                procs[rank].join(5.0)
                status, value = "error", f"exited without a result (exit code {procs[rank].exitcode})"
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed: {value}")
            results.append(value)
        return results
    finally:
        for proc in procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in conns:
            conn.close()
        del store

"""A tensor-parallel engine: rank 0 in the caller's process, ranks 1..N-1 in worker processes.

``LLM(..., tensor_parallel_size=N)`` makes a ``TensorParallelRunner`` instead of a ``ModelRunner``; the
scheduler cannot tell them apart.  What happens:

Start.  Before anything is spawned, the model's shape is checked against N (heads, KV heads, vocabulary,
MLP width; on CUDA, the number of GPUs), so a bad size fails at once with the sizes that would work.
Rank 0 opens a rendezvous store on a free loopback port and starts N-1 workers with the ``spawn``
context (a fresh interpreter each: CUDA cannot survive a fork).  Each worker says hello, joins the
engine's process group (``group.py``: NCCL on CUDA, rank r on GPU r; gloo on CPU), builds a
``ModelRunner`` inside ``tensor_parallel(...)``, so every layer keeps its slice of the weights and the
group, and reports how many KV blocks it could allocate.  Rank 0 does the same, and the engine uses the
smallest count.

Each step.  Rank 0 schedules and samples; the workers only compute.  Before its own forward pass rank 0
sends every worker one pickled tuple over a pipe: per sequence its id, length, number of computed tokens,
the tokens it computes this step, and the blocks added to its block table, plus the ids of sequences
that have finished.  A worker never needs the tokens whose K/V are already cached, so it keeps a *shadow*
of each sequence, exact in length and block table, filled in only where tokens were computed, and runs
the same ``ModelRunner.run`` on it (with greedy sampling, whose result it throws away).  A decode step of
256 sequences is a few kB and well under a millisecond to send and apply.  The collectives inside
the forward pass keep the ranks in step; there is no reply per step.

Failure and shutdown.  A thread in rank 0 watches the workers' pipes and process handles.  A worker that
raises sends its traceback and exits; rank 0's next (or current) collective then fails, and rank 0 raises
``RuntimeError`` with that traceback.  Any exception in a step, a ``KeyboardInterrupt`` included, leaves
the ranks out of step, so the engine shuts down: workers are stopped (terminated if they do not answer),
the group is aborted, and later calls raise.  Workers ignore SIGINT (Ctrl-C is rank 0's to handle) and
exit by themselves when rank 0's process disappears.  ``shutdown()`` is idempotent, and a
``weakref.finalize`` calls it when the engine is garbage-collected or the interpreter exits.  Nothing is
written to /dev/shm or to disk, and no port or name is fixed, so engines never collide.

Scripts (not notebooks) that start a tensor-parallel engine need the usual ``if __name__ == "__main__":``
guard: ``spawn`` imports the main module in each worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
import traceback
import weakref
from dataclasses import replace
from multiprocessing.connection import wait

import torch

from nanovllm.distributed import TPGroup, tensor_parallel
from nanovllm.distributed.group import connect_store, destroy_group, make_group, new_group_name, open_store
from nanovllm.engine.sequence import ScheduledBatch, Sequence
from nanovllm.loading.resolve import ResolvedModel
from nanovllm.sampling_params import SamplingParams

RENDEZVOUS_TIMEOUT_S = 300.0  # for the workers to connect, once they have said hello
REPORT_GRACE_S = 2.0  # after an error in rank 0, how long to wait for a worker's traceback
STOP_TIMEOUT_S = 10.0  # for workers to exit when asked, before they are terminated
GREEDY = SamplingParams(temperature=0.0)


def check_tensor_parallel(hf_config, size: int, device: torch.device) -> None:
    """Raise ValueError, naming the sizes that work, when ``size`` ranks cannot split this model."""
    import torch.distributed as dist

    from nanovllm.layers.linear import check_head_split

    heads = hf_config.num_attention_heads
    check_head_split(heads, getattr(hf_config, "num_key_value_heads", None) or heads, size)
    for name in ("vocab_size", "intermediate_size"):
        n = getattr(hf_config, name)
        if n % size:
            ok = [s for s in range(1, heads + 1) if heads % s == 0 and n % s == 0]
            raise ValueError(f"tensor_parallel_size={size} does not divide {name}={n}; sizes that may work "
                             f"for this model: {ok}")
    if not dist.is_available():
        raise RuntimeError("tensor parallelism needs torch.distributed, which this PyTorch build lacks")
    if device.type == "cuda":
        first, count = device.index or 0, torch.cuda.device_count()
        if first + size > count:
            raise ValueError(f"tensor_parallel_size={size} from {device} needs GPUs {first}..{first + size - 1}, "
                             f"but {count} are visible")


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """Rank r's device: GPU (first + r) on CUDA, the CPU otherwise."""
    if device.type == "cuda":
        first = device.index or 0
        return [torch.device("cuda", first + r) for r in range(size)]
    return [torch.device("cpu")] * size


class TensorParallelRunner:
    """Rank 0 of a tensor-parallel engine; used like a ``ModelRunner`` (``run``, ``logits``,
    ``num_kvcache_blocks``); other attributes are rank 0's ``ModelRunner``'s (``self.runner``).

    No overlapped execution: its next step would read the tokens just sampled on rank 0's GPU, which the
    workers do not have, so ``LLM`` runs the plain step loop."""

    supports_overlap = False

    def __init__(self, config, model: ResolvedModel):
        from nanovllm.engine.model_runner import ModelRunner

        size = config.tensor_parallel_size
        check_tensor_parallel(model.hf_config, size, model.device)
        devices = rank_devices(model.device, size)
        self.size = size
        self.workers = Workers(size, devices[0])
        self._finalizer = weakref.finalize(self, self.workers.shutdown)
        self._live: dict[int, tuple] = {}  # seq_id -> (sequence, block table, its length) as last sent
        try:
            self.workers.start(config, model, devices)
            with tensor_parallel(TPGroup(0, size, self.workers.group)):
                self.runner = ModelRunner(config, replace(model, device=devices[0]))
            blocks = self.workers.wait_for("ready")
            self.num_kvcache_blocks = min(self.runner.num_kvcache_blocks, *blocks)
        except BaseException as e:
            self._fail(e)

    # -- one step, on every rank ---------------------------------------------------------------------
    def run(self, batch: ScheduledBatch, warmup: bool = False) -> list[int]:
        return self._call("run", batch, warmup)

    def logits(self, batch: ScheduledBatch) -> torch.Tensor:
        return self._call("logits", batch)

    def _call(self, method: str, batch: ScheduledBatch, *args):
        """Tell the workers to run ``method`` on their shadows of ``batch``, then run it here."""
        if self.workers.closed:
            why = f", after this failure:\n{self.workers.failure}" if self.workers.failure else ""
            raise RuntimeError(f"this tensor-parallel engine has been shut down{why}")
        try:
            self.workers.send(pickle.dumps((method, self.describe(batch), *args), pickle.HIGHEST_PROTOCOL))
            out = getattr(self.runner, method)(batch, *args)
        except BaseException as e:
            self._fail(e)
        if self.workers.failed.is_set():  # NCCL: an aborted collective may return garbage instead of raising
            self._fail(None)
        return out

    def describe(self, batch: ScheduledBatch) -> tuple:
        """The batch as plain values: what a worker needs to update its shadows (see ``apply``).  A block
        table only grows at its end until the block manager replaces it, so mostly only new blocks go."""
        gone = [sid for sid, (seq, _, _) in self._live.items() if seq.is_finished]
        for sid in gone:
            del self._live[sid]
        items = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, table = seq.num_computed_tokens, seq.block_table
            _, sent, sent_len = self._live.get(seq.seq_id, (None, None, 0))
            keep = sent_len if sent is table and len(table) >= sent_len else 0  # blocks the worker has
            items.append((seq.seq_id, len(seq), start, seq.token_ids[start:start + n], keep, table[keep:]))
            self._live[seq.seq_id] = seq, table, len(table)
        return batch.is_prefill, batch.num_new_tokens, items, gone

    def _fail(self, exc: BaseException | None):
        """Shut down, then raise.  When a worker failed, rank 0 sees a broken collective or pipe (a
        RuntimeError or OSError): raise the worker's traceback instead.  Other errors are rank 0's own."""
        if not isinstance(exc, KeyboardInterrupt):
            self.workers.failed.wait(REPORT_GRACE_S)  # its report may still be on the way
        self.shutdown(abort=True)
        failure = self.workers.failure
        if failure and (exc is None or isinstance(exc, (RuntimeError, OSError, EOFError))):
            raise RuntimeError(f"tensor-parallel {failure}") from exc
        if failure and hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"(also, tensor-parallel {failure})")
        raise exc

    # -- lifetime ------------------------------------------------------------------------------------
    def shutdown(self, abort: bool = False) -> None:
        """Stop the workers and release the process group (idempotent)."""
        if self._finalizer.alive:
            self._finalizer.detach()
            self.workers.shutdown(abort)
            close = getattr(self.__dict__.get("runner"), "close", None)
            if close is not None:  # rank 0's GPU memory
                close()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers.procs]

    def __getattr__(self, name):
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)


class Workers:
    """Ranks 1..N-1 of one engine: their processes, their pipes, rank 0's process group, and a thread that
    watches the workers.  Holds no reference to the runner, so the runner can be garbage-collected."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device
        self.procs: list = []
        self.conns: list = []
        self.store = self.group = self.watcher = None
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: str | None = None
        self.failed = threading.Event()
        self.closed = False

    def start(self, config, model: ResolvedModel, devices) -> None:
        ctx = mp.get_context("spawn")
        self.store = open_store(RENDEZVOUS_TIMEOUT_S)
        name = new_group_name()
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            args = (rank, self.size, self.store.port, name, child, os.getpid(), config,
                    replace(model, device=devices[rank]))
            proc = ctx.Process(target=worker_main, args=args, name=f"nanovllm-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.watcher = threading.Thread(target=self.watch, name="nanovllm-tp-watcher", daemon=True)
        self.watcher.start()
        self.wait_for("hello")
        self.group = make_group(self.store, 0, self.size, self.device, name)

    def wait_for(self, kind: str) -> list:
        """One ``kind`` message from every worker (their payloads, in rank order)."""
        got = {}
        while len(got) < self.size - 1:
            try:
                msg = self.messages.get(timeout=0.5)
            except queue.Empty:
                msg = None
            if self.failed.is_set():
                raise RuntimeError("a tensor-parallel worker failed while starting")
            if msg is not None and msg[0] == kind:
                got[msg[1]] = msg[2:]
        return [got[r][0] if got[r] else None for r in sorted(got)]

    def send(self, payload: bytes) -> None:
        for conn in self.conns:
            conn.send_bytes(payload)

    def watch(self) -> None:
        """Runs in a thread until every worker has exited: queues their messages, notes failures."""
        conns = {conn: rank for rank, conn in enumerate(self.conns, 1)}
        alive = {proc.sentinel: (rank, proc) for rank, proc in enumerate(self.procs, 1)}
        while alive:
            ready = wait(list(conns) + list(alive))
            for conn in [c for c in ready if c in conns]:
                self._receive(conn, conns)
            for sentinel in [s for s in ready if s in alive]:
                rank, proc = alive.pop(sentinel)
                conn = self.conns[rank - 1]
                while conn in conns and conn.poll():  # a last message (its traceback) comes before the exit
                    self._receive(conn, conns)
                if not self.closed:  # (reading the exit code reaps the process: not while shutdown joins it)
                    self._report(f"worker (rank {rank}) exited unexpectedly (exit code {proc.exitcode})")

    def _receive(self, conn, conns) -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            del conns[conn]
            return
        if msg[0] == "error":
            self._report(f"worker (rank {msg[1]}) failed:\n{msg[2]}")
        else:
            self.messages.put(msg)

    def _report(self, failure: str) -> None:
        if self.closed or self.failure is not None:  # expected exits, or not the first failure
            return
        self.failure = failure
        self.failed.set()
        if self.device.type == "cuda" and self.group is not None:
            destroy_group(self.group)  # NCCL: make rank 0's pending collectives give up

    def shutdown(self, abort: bool = False) -> None:
        """Stop every worker: ask them to exit (unless ``abort``), terminate those that don't, kill those
        that still don't; then release the pipes and the process group.  Idempotent."""
        if self.closed:
            return
        self.closed = True  # from here on, workers exiting is expected
        if not abort:
            stop = pickle.dumps(("stop",))
            for conn in self.conns:
                try:
                    conn.send_bytes(stop)
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.watcher is not None and self.watcher is not threading.current_thread():
            self.watcher.join(5.0)
        for conn in self.conns:
            conn.close()
        if self.group is not None:
            destroy_group(self.group)
        self.group = self.store = None


# -- the worker process ------------------------------------------------------------------------------
def apply(shadows: dict[int, Sequence], description: tuple) -> ScheduledBatch:
    """Update the shadow sequences from rank 0's ``describe`` and return the batch they form."""
    is_prefill, num_new_tokens, items, gone = description
    for sid in gone:
        shadows.pop(sid, None)
    seqs = []
    for sid, length, start, new_tokens, keep, new_blocks in items:
        seq = shadows.get(sid)
        if seq is None:
            seq = shadows[sid] = Sequence(sid, [], GREEDY)
        tokens = seq.token_ids
        if len(tokens) < length:
            tokens.extend([0] * (length - len(tokens)))  # never read: their K/V is cached, or comes later
        else:
            del tokens[length:]
        tokens[start:start + len(new_tokens)] = new_tokens
        seq.num_computed_tokens = start
        del seq.block_table[keep:]
        seq.block_table.extend(new_blocks)
        seqs.append(seq)
    return ScheduledBatch(seqs, num_new_tokens, is_prefill)


def exit_when_orphaned(parent_pid: int) -> None:
    """If rank 0's process dies without shutting us down (killed, say), exit too."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def worker_main(rank, size, port, group_name, conn, parent_pid, config, model: ResolvedModel):
    """Rank ``rank``: join the group, build the model slice, then run what rank 0 sends until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal; rank 0 decides
    threading.Thread(target=exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    group = None
    try:
        from nanovllm.engine.model_runner import ModelRunner

        device = model.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks share the CPU's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        conn.send(("hello", rank))
        group = make_group(connect_store(port, RENDEZVOUS_TIMEOUT_S), rank, size, device, group_name)
        with tensor_parallel(TPGroup(rank, size, group)):
            runner = ModelRunner(config, model)
        conn.send(("ready", rank, runner.num_kvcache_blocks))
        shadows: dict[int, Sequence] = {}
        while True:
            method, *args = pickle.loads(conn.recv_bytes())
            if method == "stop":
                break
            getattr(runner, method)(apply(shadows, args[0]), *args[1:])
    except EOFError:  # rank 0 closed the pipe: it is gone
        pass
    except BaseException:
        try:
            conn.send(("error", rank, traceback.format_exc()))
        except OSError:
            pass
    finally:
        if group is not None:
            destroy_group(group)
        conn.close()

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

Failure.  Rank 0 never blocks inside a gloo collective, where Python cannot run: it waits in slices of
``POLL_S`` (``Workers.wait``), so Ctrl-C is handled within one, and between slices it looks at its
workers.  A thread in rank 0 (the watcher) reads the workers' pipes and watches their processes; a thread
in each worker (its ``Heartbeat``) tells rank 0 every ``HEARTBEAT_S`` that the worker is alive and what
its main thread does: in a step or not, inside a collective or not, how long it has gone without using
the CPU, and where it is (its stack).  So rank 0 finds, within seconds:

- a worker that raised: it sends its traceback, then exits;
- a worker that died (killed, say): its process handle says so, with the exit code;
- while rank 0 has waited longer than ``stall_timeout_s`` in a collective: a worker whose heartbeat has
  been silent that long while its process does not run (it is stopped, say): it "stopped responding";
  and a worker in a step, outside any collective, that has not used the CPU for that long (asleep,
  blocked on a lock or a file): it "is stuck", and its stack says where.

A worker that computes is waited for, however long it takes: a big prefill on a slow CPU looks exactly
like a computation that never ends (even one holding Python's GIL, which silences the heartbeat while
the process runs).  Telling them apart is not possible from outside; Ctrl-C is the answer to that.

Any exception in a step, a ``KeyboardInterrupt`` included, leaves the ranks out of step, so the engine
shuts down (the workers are killed) and later calls raise, naming the failure.

Shutdown.  Workers are asked to stop, and killed if they do not; workers ignore SIGINT (Ctrl-C is rank
0's to handle) and exit by themselves when rank 0's process disappears.  Everything the engine holds is
released at once, not at the next garbage collection: the processes are reaped and closed, the pipes
closed, and the group (``TPGroup.close``), with gloo's threads and sockets and the rendezvous store's.
``shutdown()`` is idempotent, and a ``weakref.finalize`` calls it when the engine is garbage-collected
or the interpreter exits.  Nothing is written to /dev/shm or to disk, and no port or name is fixed, so
engines never collide.

Scripts (not notebooks) that start a tensor-parallel engine need the usual ``if __name__ == "__main__":``
guard: ``spawn`` imports the main module in each worker.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
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
STOP_TIMEOUT_S = 10.0  # for workers to exit when asked, before they are killed
POLL_S = 0.1  # rank 0 waits for a collective in slices this long (so Ctrl-C waits no longer)
HEARTBEAT_S = 0.25  # how often a worker tells rank 0 what it does
STALL_TIMEOUT_S = 10.0  # Workers.stall_timeout_s: how long a worker may go silent, or idle in a step
BUSY_CPU_SHARE = 0.05  # a worker that used less of a core than this between two heartbeats was idle
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
            with tensor_parallel(self.workers.tp):
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
        return list(self.workers.pids)

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
        self.pids: list[int] = []
        self.conns: list = []
        self.store = self.group = self.tp = self.watcher = None
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.beats: dict[int, tuple] = {}  # rank -> its last heartbeat: (received at, *what Heartbeat sends)
        self.stall_timeout_s = STALL_TIMEOUT_S
        self.failure: str | None = None
        self.failed = threading.Event()
        self.closed = False
        self.reaping = threading.Lock()  # one thread at a time waits for a process's exit (see watch)

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
            self.pids.append(proc.pid)
            self.conns.append(parent)
            self.beats[rank] = (time.monotonic(), False, 0.0, False, "")
        self.watcher = threading.Thread(target=self.watch, name="nanovllm-tp-watcher", daemon=True)
        self.watcher.start()
        self.wait_for("hello")
        self.group = self.connect(name)
        self.tp = TPGroup(0, self.size, self.group, self.wait if self.device.type == "cpu" else None)

    def connect(self, name: str):
        """Rank 0's side of the rendezvous (``make_group``), in a helper thread: it blocks in C++ until every
        worker has joined, so rank 0 waits for the thread in slices instead, handling Ctrl-C and a worker
        that dies meanwhile.  (The helper then stays blocked, holding the store, until the store's
        rendezvous timeout ends it.)"""
        done = []

        def connect():
            try:
                done.append(make_group(self.store, 0, self.size, self.device, name))
            except Exception as e:
                done.append(e)

        thread = threading.Thread(target=connect, name="nanovllm-tp-connect", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            if self.failed.is_set():
                raise RuntimeError("a tensor-parallel worker failed while starting")
        if isinstance(done[0], Exception):
            raise done[0]
        return done[0]

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

    # -- rank 0 waits for a collective (gloo) -------------------------------------------------------
    def wait(self, work) -> None:
        """Wait for a collective in slices of ``POLL_S``: between them Python runs (so Ctrl-C raises
        ``KeyboardInterrupt`` here), a failure the watcher found is raised, and once the wait has lasted
        ``stall_timeout_s`` the workers are checked for stalls.  A slice that runs out raises torch's
        "timed out" error, which leaves the collective pending; a collective that failed has completed."""
        start = time.monotonic()
        while True:
            try:
                work.wait(datetime.timedelta(seconds=POLL_S))
                return
            except RuntimeError:
                if work.is_completed():  # the collective itself failed (a peer is gone, say)
                    raise
            if not self.failed.is_set() and time.monotonic() - start > self.stall_timeout_s:
                self.check_stalls()
            if self.failed.is_set():
                raise RuntimeError(self.failure)

    def check_stalls(self) -> None:
        """While rank 0 has waited ``stall_timeout_s`` in a collective: report a worker that stopped
        responding or is stuck (see the module's docstring).  A worker inside a collective waits for
        another rank, so it is not blamed; one that computes is left alone."""
        now, limit = time.monotonic(), self.stall_timeout_s
        for rank, pid in enumerate(self.pids, 1):
            at, in_step, idle_s, in_collective, stack = self.beats[rank]
            if now - at > limit:
                state = process_state(pid)
                if state != "running":  # a running process that cannot beat: a long call holding the GIL
                    self._report(f"worker (rank {rank}) stopped responding: no heartbeat for {now - at:.1f} s "
                                 f"(its process is {state})")
            elif in_step and not in_collective and idle_s > limit:
                self._report(f"worker (rank {rank}) is stuck: {idle_s:.1f} s in a step without using the CPU, "
                             f"while rank 0 waits for it in a collective; its stack:\n{stack}")

    # -- the watcher thread ---------------------------------------------------------------------------
    def watch(self) -> None:
        """Runs in a thread until every worker has exited: queues their messages, keeps their heartbeats,
        notes failures."""
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
                with self.reaping:  # the process has closed its end: it is exiting, this returns soon
                    proc.join()
                if not self.closed:
                    self._report(f"worker (rank {rank}) exited unexpectedly ({exit_status(proc.exitcode)})")

    def _receive(self, conn, conns) -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            del conns[conn]
            return
        if msg[0] == "beat":
            self.beats[msg[1]] = (time.monotonic(), *msg[2:])
        elif msg[0] == "error":
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
        """Stop every worker: ask them to exit (unless ``abort``: their state is lost anyway), kill those
        that don't (SIGKILL also ends a stopped process, which SIGTERM would not); then release the
        processes, the pipes and the process group at once.  Idempotent."""
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
        with self.reaping:
            if not abort:
                deadline = time.monotonic() + STOP_TIMEOUT_S
                for proc in self.procs:
                    proc.join(max(0.0, deadline - time.monotonic()))
            for proc in self.procs:
                if proc.exitcode is None:
                    proc.kill()
            for proc in self.procs:
                proc.join()
        if self.watcher is not None and self.watcher is not threading.current_thread():
            self.watcher.join(5.0)  # it ends once every worker has exited
        for proc in self.procs:
            proc.close()  # its sentinel, now, rather than at a garbage collection
        for conn in self.conns:
            conn.close()
        if self.group is not None:
            destroy_group(self.group)
        if self.tp is not None:
            self.tp.close()  # rank 0's layers refer to it: drop the group from it
        self.group = self.store = self.tp = None


def exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"exit code {code}: killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def process_state(pid: int) -> str:
    """What the OS says process ``pid`` does, in words ("running", "stopped: ..."), from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "in a state this system does not tell"
    return {"R": "running", "S": "asleep", "D": "waiting in the kernel (disk or memory)",
            "T": "stopped: SIGSTOP, Ctrl-Z or a debugger", "t": "stopped by a debugger",
            "Z": "a zombie: it has exited"}.get(state, f"in state {state}")


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


class Heartbeat:
    """A worker's pulse: a thread that tells rank 0, every ``HEARTBEAT_S``, that this process is alive and
    what its main thread does, so that rank 0 can tell a worker that computes from one that is stuck
    (``Workers.check_stalls``).  A beat is ("beat", rank, in a step?, seconds the step has gone without
    using the CPU, inside a collective?, the main thread's stack when in a step).

    The thread runs whenever the main thread computes: torch's operations and gloo's waits release Python's
    GIL, and a pure-Python loop hands it over every few milliseconds.  Its CPU measure is the process's,
    so computing on torch's own threads counts as computing."""

    def __init__(self, rank: int, send):
        self.rank, self.send = rank, send
        self.step_started: float | None = None  # set by the main thread: when its current step began
        self.in_collective = False
        self.main = threading.get_ident()  # made by the main thread, whose stack it reports
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="nanovllm-tp-heartbeat", daemon=True)
        self.thread.start()

    def wait(self, work) -> None:
        """This worker's wait for a collective (gloo): torch's blocking wait, noted, since waiting for a
        slower rank is not being stuck."""
        self.in_collective = True
        try:
            work.wait()
        finally:
            self.in_collective = False

    def run(self) -> None:
        t0, cpu0 = time.monotonic(), time.process_time()
        busy_at = t0  # the end of the last interval between beats in which the process computed
        while not self.done.wait(HEARTBEAT_S):
            t, cpu = time.monotonic(), time.process_time()
            if cpu - cpu0 > BUSY_CPU_SHARE * (t - t0):
                busy_at = t
            t0, cpu0 = t, cpu
            started = self.step_started
            if started is None:
                beat = ("beat", self.rank, False, 0.0, False, "")
            else:
                stack = main_stack(self.main)
                beat = ("beat", self.rank, True, t - max(busy_at, started), self.in_collective, stack)
            try:
                self.send(beat)
            except (OSError, ValueError):  # the pipe is closed: the worker is exiting
                return

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def main_stack(ident: int) -> str:
    """Thread ``ident``'s stack, as a traceback prints it, from ``worker_main`` on."""
    frame = sys._current_frames().get(ident)
    entries = traceback.extract_stack(frame) if frame is not None else []
    del frame
    first = next((i for i, e in enumerate(entries) if e.name == "worker_main"), 0)
    return "".join(traceback.format_list(entries[first:]))


def worker_main(rank, size, port, group_name, conn, parent_pid, config, model: ResolvedModel):
    """Rank ``rank``: join the group, build the model slice, then run what rank 0 sends until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal; rank 0 decides
    threading.Thread(target=exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    lock = threading.Lock()  # the main thread and the heartbeat both send

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    beat = Heartbeat(rank, send)
    group = None
    try:
        from nanovllm.engine.model_runner import ModelRunner

        device = model.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks share the CPU's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        send(("hello", rank))
        group = make_group(connect_store(port, RENDEZVOUS_TIMEOUT_S), rank, size, device, group_name)
        tp = TPGroup(rank, size, group, beat.wait if device.type == "cpu" else None)
        with tensor_parallel(tp):
            runner = ModelRunner(config, model)
        send(("ready", rank, runner.num_kvcache_blocks))
        shadows: dict[int, Sequence] = {}
        while True:
            payload = conn.recv_bytes()
            beat.step_started = time.monotonic()
            method, *args = pickle.loads(payload)
            if method == "stop":
                break
            getattr(runner, method)(apply(shadows, args[0]), *args[1:])
            beat.step_started = None
    except EOFError:  # rank 0 closed the pipe: it is gone
        pass
    except BaseException:
        try:
            send(("error", rank, traceback.format_exc()))
        except OSError:
            pass
    finally:
        beat.stop()
        if group is not None:
            destroy_group(group)
        conn.close()

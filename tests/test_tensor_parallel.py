"""Tensor parallelism on the CPU (gloo): TP=2 gives the same greedy tokens as TP=1, engines start and
stop without leaving anything behind, and a worker that dies, stops or hangs is found within seconds
(while one that computes for long is left alone), and Ctrl-C always stops the engine.

Starting a TP=2 engine spawns a worker that imports torch (seconds), so the engines that compare outputs
are shared by the whole module: one tiny Qwen3 (4 query, 2 KV heads: both split over the ranks) and one
tiny Llama (4 query heads, 1 KV head: the KV head is replicated on both ranks), alive at the same time,
which also shows that two engines in one process do not collide.  Their caches are small and their
batch budget low, so the runs go through chunked prefill, preemption and prefix-cache hits.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time

import pytest
import torch
from conftest import make_tiny_model

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="checks processes through /proc (Linux)")
ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=48,
              kvcache_block_size=16, num_kvcache_blocks=14)
SHARED = list(range(3, 43))  # 40 tokens: two full blocks of a common prefix
PROMPTS = ([SHARED + [100 + i, 7 * i + 1] for i in range(4)]  # shared prefix -> prefix-cache hits
           + [[(31 * i + 5 * j) % 500 + 1 for j in range(20 + 9 * i)] for i in range(3)])
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def child_processes() -> set[int]:
    """Pids of this process's children, but for multiprocessing's resource tracker (one per process,
    started by the first spawn, lasting until the process exits; it is not the engine's)."""
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"resource_tracker" not in cmd:
            kids.add(int(entry))
    return kids


def shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def gone(pids) -> bool:
    return not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def threads_and_fds() -> tuple[int, int]:
    """This process's threads (every OS thread: gloo's and the store's too, not only Python's) and fds."""
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


class InWorker:
    """Unpickled by a worker in its step loop: runs ``code`` there, then is the message ``msg`` that rank 0
    meant to send, so the step goes on as usual afterwards (when ``code`` returns).  The code's lines are
    put in the worker's ``linecache`` under a file name, as a module's are, so that a stack printed in the
    worker shows them (code run from a bare string has no lines to show)."""

    FILE = "<injected by test_tensor_parallel>"

    def __init__(self, code: str, msg: tuple):
        self.code, self.msg = code, msg

    def __reduce__(self):
        lines = (len(self.code), None, self.code.splitlines(True), self.FILE)
        return eval, (f"(__import__('linecache').cache.__setitem__({self.FILE!r}, {lines!r}), "
                      f"exec(compile({self.code!r}, {self.FILE!r}, 'exec')), {self.msg!r})[2]",)


def inject(monkeypatch, llm, code: str, at_step: int = 3, then=None) -> None:
    """Have worker 1 run ``code`` before step ``at_step`` of rank 0 (and call ``then()`` when it is sent)."""
    workers, sent = llm.runner.workers, []

    def send(payload):
        sent.append(1)
        if len(sent) == at_step:
            payload = pickle.dumps(InWorker(code, pickle.loads(payload)))
            if then is not None:
                then()
        type(workers).send(workers, payload)

    monkeypatch.setattr(workers, "send", send)


def busy(seconds: float) -> str:
    return f"import time\nt = time.monotonic() + {seconds}\nwhile time.monotonic() < t: pass"


@contextlib.contextmanager
def deadline(pids, seconds: float):
    """Kill ``pids`` if the block still runs after ``seconds``: a regression (rank 0 stuck in a collective
    that only a dead peer ends) then fails the test instead of hanging it."""

    def kill():
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(seconds, kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two ranks on a 2-core machine: one thread each (the workers set theirs), or they fight for cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def baseline():
    """Children and /dev/shm entries before any engine of this module starts."""
    return child_processes(), shm()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {"qwen3": tmp_path_factory.mktemp("tp-qwen3"), "llama": tmp_path_factory.mktemp("tp-llama")}
    make_tiny_model("qwen3", dirs["qwen3"])
    make_tiny_model("llama", dirs["llama"], num_key_value_heads=1)
    return dirs


@pytest.fixture(scope="module")
def engines(model_dirs, baseline):
    """arch -> TP=2 engine; tests at the end of the module take them out to shut them down."""
    llms = {arch: LLM(path, tensor_parallel_size=2, **ENGINE) for arch, path in model_dirs.items()}
    yield llms
    for llm in llms.values():
        llm.shutdown()


@pytest.fixture(scope="module")
def reference(model_dirs):
    """arch -> (TP=1 outputs of PROMPTS twice, its preemption count)."""
    out = {}
    for arch, path in model_dirs.items():
        llm = LLM(path, **ENGINE)
        runs = [[o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] for _ in range(2)]
        out[arch] = runs, llm.scheduler.num_preemptions
    return out


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tp2_matches_tp1(arch, engines, reference):
    llm = engines[arch]
    runs, preemptions = reference[arch]
    first = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in first] == runs[0]
    second = llm.generate(PROMPTS, GREEDY, use_tqdm=False)  # now the prompts' blocks are cached
    assert [o.token_ids for o in second] == runs[1]
    assert preemptions > 0 and llm.scheduler.num_preemptions == preemptions
    assert llm.runner.supports_overlap is False  # the plain step loop
    assert any(o.num_cached_tokens >= 32 for o in first + second)
    assert len(set(map(tuple, runs[0]))) == len(PROMPTS)  # not degenerate


def test_replicated_kv_head(engines):
    """The Llama model has one KV head: each rank keeps all of it, and half the query heads."""
    attn = engines["llama"].runner.runner.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.qkv_proj.kv_replicas) == (2, 1, 2)
    attn = engines["qwen3"].runner.runner.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.qkv_proj.kv_replicas) == (2, 1, 1)


def test_tp1_takes_none_of_this_machinery(model_dirs):
    """One rank: a plain ModelRunner, no process group in any layer, no worker."""
    from nanovllm.engine.model_runner import ModelRunner

    llm = LLM(model_dirs["qwen3"], **ENGINE)
    assert type(llm.runner) is ModelRunner
    assert all(getattr(m, "tp_group", None) is None for m in llm.runner.model.modules())
    llm.shutdown()  # nothing to stop: a no-op


def test_two_engines_interleaved(engines, reference):
    """Two engines in one process, each with its own group: requests added to both, stepped in turn."""
    seqs = {arch: [llm.add_request(p, GREEDY) for p in PROMPTS[:2]] for arch, llm in engines.items()}
    while any(llm.has_unfinished_requests() for llm in engines.values()):
        for llm in engines.values():
            if llm.has_unfinished_requests():
                llm.step()
    assert len({llm.runner.workers.group.group_name for llm in engines.values()}) == 2
    for arch, arch_seqs in seqs.items():
        assert [s.completion_token_ids for s in arch_seqs] == reference[arch][0][0][:2]


def test_bad_head_count_fails_before_spawning(tmp_path):
    """SmolLM2's shape: 9 query heads, 3 KV heads: TP=2 cannot split it, and says which sizes can."""
    make_tiny_model("llama", tmp_path, hidden_size=72, num_attention_heads=9, num_key_value_heads=3)
    before = child_processes(), mp.active_children()
    with pytest.raises(ValueError, match=r"9 query heads and 3 KV heads.*sizes that work for this model: \[1, 3, 9\]"):
        LLM(tmp_path, tensor_parallel_size=2, **ENGINE)
    assert (child_processes(), mp.active_children()) == before


def test_worker_error_reaches_the_caller(model_dirs):
    before = child_processes()
    with LLM(model_dirs["qwen3"], tensor_parallel_size=2, **ENGINE) as llm:
        pids = llm.runner.worker_pids
        assert pids and not gone(pids)
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        llm.runner.workers.send(pickle.dumps(("no_such_method", None)))  # the worker raises AttributeError
        with pytest.raises(RuntimeError, match=r"(?s)worker \(rank 1\) failed.*AttributeError.*no_such_method"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        assert gone(pids)
        with pytest.raises(RuntimeError, match="shut down"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert child_processes() == before


def test_keyboard_interrupt_stops_workers(model_dirs, monkeypatch):
    """Ctrl-C in rank 0 mid-step: the worker is stuck in a collective, so it is terminated."""
    before = child_processes()
    llm = LLM(model_dirs["llama"], tensor_parallel_size=2, **ENGINE)
    pids = llm.runner.worker_pids

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.runner.runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert gone(pids) and not llm.has_unfinished_requests() and child_processes() == before
    llm.shutdown()  # idempotent


def test_worker_dying_while_connecting_fails_within_seconds(model_dirs, monkeypatch):
    """A worker killed after its hello, before it joins the group: rank 0, waiting for it in the rendezvous,
    fails within seconds naming it (not when the rendezvous times out, minutes later)."""
    from nanovllm.engine import tp_runner

    before = child_processes()

    def kill_then_connect(*args, **kwargs):
        for pid in child_processes() - before:
            os.kill(pid, signal.SIGKILL)
        return make_group(*args, **kwargs)

    make_group = tp_runner.make_group
    monkeypatch.setattr(tp_runner, "make_group", kill_then_connect)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker \(rank 1\) exited unexpectedly \(exit code -9"):
        LLM(model_dirs["qwen3"], tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - t < 15  # most of it: the worker's start (importing torch)
    assert child_processes() == before


LONG = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)  # ~80 steps


@pytest.mark.parametrize("how,expect", [
    ("os.kill(os.getpid(), signal.SIGKILL)", r"worker \(rank 1\) exited unexpectedly \(exit code -9"),
    ("os.kill(os.getpid(), signal.SIGSTOP)", r"worker \(rank 1\) stopped responding: no heartbeat for .* s "
                                              r"\(its process is stopped"),
    ("time.sleep(60)", r"(?s)worker \(rank 1\) is stuck: .* s in a step.*time.sleep\(60\)"),
])
def test_dead_or_stuck_worker_fails_within_seconds(model_dirs, monkeypatch, how, expect):
    """A worker killed, stopped or asleep mid-run: a clear error naming it within seconds, not a hang;
    then the engine refuses further calls with the reason, and no process is left."""
    before = child_processes()
    llm = LLM(model_dirs["qwen3"], tensor_parallel_size=2, **ENGINE)
    pids = llm.runner.worker_pids
    llm.runner.workers.stall_timeout_s = 1.5
    inject(monkeypatch, llm, f"import os, signal, time\n{how}", at_step=4)
    t = time.monotonic()
    with deadline(pids, 20), pytest.raises(RuntimeError, match=expect):
        llm.generate(PROMPTS, LONG, use_tqdm=False)
    took = time.monotonic() - t
    assert took < 6, f"found after {took:.1f} s"
    assert gone(pids) and child_processes() == before
    assert not llm.has_unfinished_requests()
    with pytest.raises(RuntimeError, match=f"(?s)shut down, after this failure.*{expect.removeprefix('(?s)')}"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    llm.shutdown()


def test_worker_computing_for_long_is_not_hung(engines, reference, monkeypatch):
    """A worker that computes for longer than the stall timeout (a big prefill on a slow CPU) is alive:
    the step waits for it, and the tokens are right."""
    llm = engines["qwen3"]
    monkeypatch.setattr(llm.runner.workers, "stall_timeout_s", 1.0)
    inject(monkeypatch, llm, busy(3.0))
    t = time.monotonic()
    out = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert time.monotonic() - t > 3.0
    assert [o.token_ids for o in out] == reference["qwen3"][0][0]


def test_ctrl_c_while_a_worker_computes(model_dirs, monkeypatch):
    """Ctrl-C in rank 0 while it waits in a collective for a worker busy for a minute (alive, so no stall
    is found): KeyboardInterrupt at once, the workers are gone, the engine refuses further calls."""
    before = child_processes()
    llm = LLM(model_dirs["llama"], tensor_parallel_size=2, **ENGINE)
    pids = llm.runner.worker_pids
    llm.runner.workers.stall_timeout_s = 1.0
    interrupted = []

    def ctrl_c_soon():
        def ctrl_c():
            interrupted.append(time.monotonic())
            _thread.interrupt_main()

        threading.Timer(1.0, ctrl_c).start()

    inject(monkeypatch, llm, busy(60.0), then=ctrl_c_soon)
    with deadline(pids, 15), pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, LONG, use_tqdm=False)
    took = time.monotonic() - interrupted[0]
    assert took < 1.0, f"KeyboardInterrupt {took:.1f} s after Ctrl-C"
    assert gone(pids) and child_processes() == before and not llm.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


def test_start_and_shutdown_release_threads_and_fds(model_dirs):
    """Five engines made and shut down in turn: threads (gloo's, the store's, ours) and file descriptors
    (pipes, sockets) are back where they were, without a garbage collection."""
    def cycle():
        llm = LLM(model_dirs["qwen3"], tensor_parallel_size=2, **ENGINE)
        llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        llm.shutdown()

    cycle()  # the first spawn starts multiprocessing's resource tracker (one per process, for good)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = threads_and_fds()
        for _ in range(5):
            cycle()
        assert threads_and_fds() == start
    finally:
        if was_enabled:
            gc.enable()


def test_shutdown_and_garbage_collection_leave_nothing(engines, baseline):
    """Last: stop the shared engines, one explicitly, one by dropping it; nothing may remain."""
    qwen3, llama = engines.pop("qwen3"), engines.pop("llama")
    pids = qwen3.runner.worker_pids + llama.runner.worker_pids
    qwen3.shutdown()
    qwen3.shutdown()
    assert gone(qwen3.runner.worker_pids)
    with pytest.raises(RuntimeError, match="shut down"):
        qwen3.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    del llama
    gc.collect()
    assert gone(pids)
    assert child_processes() == baseline[0] and not mp.active_children()
    assert shm() == baseline[1]

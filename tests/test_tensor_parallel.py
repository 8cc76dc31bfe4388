"""Tensor parallelism on the CPU (gloo): TP=2 gives the same greedy tokens as TP=1, and engines start and
stop without leaving anything behind.

Starting a TP=2 engine spawns a worker that imports torch (seconds), so the engines that compare outputs
are shared by the whole module: one tiny Qwen3 (4 query, 2 KV heads: both split over the ranks) and one
tiny Llama (4 query heads, 1 KV head: the KV head is replicated on both ranks), alive at the same time,
which also shows that two engines in one process do not collide.  Their caches are small and their
batch budget low, so the runs go through chunked prefill, preemption and prefix-cache hits.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle

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

"""Check tensor parallelism on a machine with two or more CUDA GPUs:

    PYTHONPATH=. python3 tests/gpu/tp_check.py [--models tiny,0.6b] [--attention-backend triton] [--eager]

(``--device cpu`` runs the same checks on the CPU with gloo and the torch attention backend, to try the
script on a machine without GPUs.)

For a tiny Qwen3 and for the Qwen3-0.6B shape (``nanovllm/configs/qwen3-0.6b.json``), both with random
weights written as safetensors into a temporary folder, it runs the same prompts, greedy and in float32,
through a TP=1 engine on GPU 0 and a TP=2 engine on GPUs 0 and 1, both alive in this one process, and
checks that:

- the TP=2 logits of the prompts' last tokens match TP=1's (float32 tolerance);
- the greedy tokens are equal.  Where they first differ, the TP=1 logits at that point are looked at:
  if the top two are closer than the logit error measured above, the difference is a near-tie that
  summation order decides, and it is reported as such, not as a failure;
- the runs go through CUDA graphs (unless ``--eager``), chunked prefill, preemption and the prefix cache;
- after ``shutdown()`` no worker process is left and /dev/shm holds nothing new.

NVLink multicast stays off: ``NCCL_NVLS_ENABLE=0`` is set before anything loads NCCL, and the spawned
workers inherit it (checked in each worker's environment).

Prints one PASS/FAIL/NOTE line per check and goes on after a failure.  Exit status: 0 all passed,
1 a check failed, 2 the check could not run here (no CUDA, fewer than two GPUs).
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before torch loads NCCL; spawned workers inherit the environment

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root (spawned workers inherit it)

CONFIG_0_6B = Path(__file__).resolve().parents[2] / "nanovllm" / "configs" / "qwen3-0.6b.json"
TINY = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
            hidden_act="silu", attention_bias=False, torch_dtype="float32")
#       (model, weight scale, engine settings: small caches so that runs preempt)
CASES = {"tiny": (TINY, 2.0, dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                                  num_kvcache_blocks=20)),
         "0.6b": (None, 1.0, dict(max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512,
                                  num_kvcache_blocks=48))}
FAILURES: list[str] = []


def report(status: str, name: str, detail: str = "") -> None:
    if status == "FAIL":
        FAILURES.append(name)
    print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)


def write_random_qwen3(folder: Path, cfg: dict, scale: float, seed: int = 0) -> None:
    """config.json and one safetensors file of random weights, named as HF names Qwen3's (bf16 on disk:
    exact in float32, half the bytes).  ``scale``: weight std times sqrt(fan-in)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def matrix(rows, cols):
        return (torch.randn(rows, cols, generator=gen) * (scale / cols ** 0.5)).to(torch.bfloat16)

    def norm(n):
        return (torch.rand(n, generator=gen) + 0.5).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16),
               "model.norm.weight": norm(hidden)}
    if not cfg.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = matrix(vocab, hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden),
                    p + "self_attn.q_proj.weight": matrix(q, hidden), p + "self_attn.k_proj.weight": matrix(kv, hidden),
                    p + "self_attn.v_proj.weight": matrix(kv, hidden), p + "self_attn.o_proj.weight": matrix(hidden, q),
                    p + "self_attn.q_norm.weight": norm(head_dim), p + "self_attn.k_norm.weight": norm(head_dim),
                    p + "mlp.gate_proj.weight": matrix(inter, hidden), p + "mlp.up_proj.weight": matrix(inter, hidden),
                    p + "mlp.down_proj.weight": matrix(hidden, inter)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts; the first four share a 40-token prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, vocab) for _ in range(40)]
    prompts = [shared + [rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))] for _ in range(4)]
    prompts += [[rng.randrange(1, vocab) for _ in range(rng.randint(5, 90))] for _ in range(6)]
    return prompts


def last_token_logits(llm, prompts: list[list[int]]) -> torch.Tensor:
    """Logits after each prompt, from one prefill step through the engine (every rank takes part)."""
    from nanovllm import SamplingParams

    seqs = [llm.add_request(p, SamplingParams(temperature=0, max_tokens=1)) for p in prompts]
    rows = []
    while llm.has_unfinished_requests():
        batch = llm.scheduler.schedule()
        logits = llm.runner.logits(batch)
        sampling = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        rows += list(zip(sampling, logits.cpu()))
        llm.scheduler.postprocess(batch, logits.argmax(-1).tolist())
    by_seq = dict(((s.seq_id, row) for s, row in rows))
    return torch.stack([by_seq[s.seq_id] for s in seqs])


def worker_environments(llm) -> list[str | None]:
    values = []
    for pid in llm.runner.worker_pids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            values.append(next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"NCCL_NVLS_ENABLE=")), None))
        except OSError:
            values.append("unreadable")
    return values


def check_case(name: str, folder: Path, scale_settings: dict, args) -> None:
    from nanovllm import LLM, SamplingParams

    cfg = json.loads((folder / "config.json").read_text())
    engine = dict(device=args.device, dtype="float32", attention_backend=args.attention_backend,
                  enforce_eager=args.eager, **scale_settings)
    prompts = make_prompts(cfg["vocab_size"])
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()

    t = time.perf_counter()
    ref = LLM(folder, tensor_parallel_size=1, **engine)
    graphs = sorted(ref.runner.graphs.graphs) if ref.runner.graphs is not None else []  # captured batch sizes
    report("NOTE", f"{name}: TP=1 engine up", f"{time.perf_counter() - t:.1f} s, "
           f"CUDA graphs for {len(graphs)} batch sizes (up to {graphs[-1] if graphs else '-'})")
    if ref.runner.model.layers[0].mlp.down_proj.tp_group is not None:
        report("FAIL", f"{name}: TP=1 uses no process group")
    t = time.perf_counter()
    tp = LLM(folder, tensor_parallel_size=2, **engine)
    report("NOTE", f"{name}: TP=2 engine up", f"{time.perf_counter() - t:.1f} s, workers {tp.runner.worker_pids}, "
           f"{tp.runner.num_kvcache_blocks} KV blocks")
    envs = worker_environments(tp)
    report("PASS" if all(e == "0" for e in envs) else "FAIL", f"{name}: NCCL_NVLS_ENABLE=0 in every worker",
           f"{envs}")
    try:
        ref_logits, tp_logits = last_token_logits(ref, prompts), last_token_logits(tp, prompts)
        err = (ref_logits - tp_logits).abs().max().item()
        spread = ref_logits.std().item()
        report("PASS" if err <= 1e-3 * max(spread, 1.0) else "FAIL", f"{name}: prompt logits TP=2 vs TP=1",
               f"max |diff| {err:.2e}, logit std {spread:.2f}")

        for run in ("first run", "second run (prefix cache warm)"):
            t = time.perf_counter()
            want = [o.token_ids for o in ref.generate(prompts, greedy, use_tqdm=False)]
            t_ref = time.perf_counter() - t
            t = time.perf_counter()
            got = [o.token_ids for o in tp.generate(prompts, greedy, use_tqdm=False)]
            t_tp = time.perf_counter() - t
            same = sum(a == b for a, b in zip(want, got))
            detail = f"{same}/{len(prompts)} prompts equal; TP=1 {t_ref:.2f} s, TP=2 {t_tp:.2f} s"
            if same == len(prompts):
                report("PASS", f"{name}: greedy tokens, {run}", detail)
                continue
            ties = near_ties(ref, prompts, want, got, err)
            if all(ties):
                report("PASS", f"{name}: greedy tokens, {run}", detail + "; every difference starts at a near-tie")
            else:
                report("FAIL", f"{name}: greedy tokens, {run}", detail + f"; near-ties: {ties}")
        cached = ref.block_manager.hit_tokens, tp.block_manager.hit_tokens
        report("PASS" if cached[1] > 0 else "FAIL", f"{name}: prefix cache used", f"hit tokens TP=1/TP=2 {cached}")
        report("NOTE", f"{name}: preemptions TP=1/TP=2",
               f"{ref.scheduler.num_preemptions}/{tp.scheduler.num_preemptions}")
    finally:
        pids = tp.runner.worker_pids
        tp.shutdown()
        ref.shutdown()
        del ref, tp
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    report("PASS" if not alive else "FAIL", f"{name}: no worker left after shutdown", f"alive: {alive}")
    new = (set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()) - shm_before
    report("PASS" if not new else "FAIL", f"{name}: nothing new in /dev/shm", f"{sorted(new)}")


def near_ties(ref, prompts, want, got, err: float) -> list[bool]:
    """For each prompt whose tokens differ: is the first difference a near-tie in TP=1's logits?"""
    out = []
    for prompt, a, b in zip(prompts, want, got):
        if a == b:
            continue
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = last_token_logits(ref, [prompt + a[:k]])[0]
        top2 = logits.topk(2).values
        margin = (top2[0] - top2[1]).item()
        print(f"      prompt of {len(prompt)} tokens: first difference at token {k} ({a[k]} vs {b[k]}), "
              f"TP=1 top-2 margin {margin:.2e}, logit error {err:.2e}", flush=True)
        out.append(margin <= 10 * err + 1e-6)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,0.6b", help="comma-separated: tiny, 0.6b")
    parser.add_argument("--attention-backend", default=None,
                        help="triton (default on CUDA), torch (default on the CPU: Triton needs a GPU) or flash_attn")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs or torch.compile")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda:0", help="rank 0's device (cpu: try the script without GPUs)")
    args = parser.parse_args(argv)
    if args.attention_backend is None:
        args.attention_backend = "torch" if args.device == "cpu" else "triton"

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL "
          f"{'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)
    if args.device == "cpu":  # rank 0 and the worker share the cores (the worker sets its own share)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    elif not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"CANNOT RUN: tensor parallelism needs 2 CUDA GPUs, this machine has {n}", flush=True)
        return 2
    for i in range(torch.cuda.device_count()):
        print(f"GPU {i}: {torch.cuda.get_device_name(i)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nanovllm-tp-check-") as tmp:
        for name in args.models.split(","):
            if name not in CASES:
                report("FAIL", f"unknown model {name!r}", f"choose from {sorted(CASES)}")
                continue
            cfg, scale, settings = CASES[name]
            cfg = cfg or json.loads(CONFIG_0_6B.read_text())
            folder = Path(tmp) / name
            t = time.perf_counter()
            write_random_qwen3(folder, cfg, scale)
            report("NOTE", f"{name}: random weights written", f"{time.perf_counter() - t:.1f} s")
            try:
                check_case(name, folder, settings, args)
            except Exception:
                report("FAIL", f"{name}: ran to the end", traceback.format_exc())
    print(f"{'ALL PASSED' if not FAILURES else 'FAILED: ' + ', '.join(FAILURES)}", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

"""Chapters 09 (tensor parallelism) and 10 (benchmark): the from-scratch parallel layers equal the unsplit
computation and shard weights exactly as nanovllm's layers load them; the chapter's seed workload and floor
are the benchmark's; the results figure is drawn from a copy of the results table."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nbimport import load_chapter

ROOT = Path(__file__).resolve().parent.parent
FIGURE_SCRIPT = ROOT / "figures" / "fig_10_bench_results.py"
RESULTS_CSV = ROOT / "figures" / "data" / "bench_results.csv"


@pytest.fixture(scope="module")
def ch09():
    return load_chapter("09_tensor_parallel")


@pytest.fixture(scope="module")
def ch10():
    return load_chapter("10_benchmark")


# -- chapter 09: the from-scratch layers against the unsplit computation -----------------------------------
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_column_and_row_parallel_equal_unsplit(ch09, size):
    g = torch.Generator().manual_seed(size)
    x, w, b = torch.randn(7, 64, generator=g), torch.randn(48, 64, generator=g) / 8, torch.randn(48, generator=g)
    full = F.linear(x, w, b)
    cols = [ch09.column_parallel(x, w, b, r, size) for r in range(size)]
    assert all(c.shape == (7, 48 // size) for c in cols)
    torch.testing.assert_close(ch09.sim_all_gather(cols), full)
    rows = [ch09.row_parallel(ch09.shard(x, -1, r, size), w, b, r, size) for r in range(size)]
    assert all(p.shape == full.shape for p in rows)
    torch.testing.assert_close(ch09.sim_all_reduce(rows), full)


def test_shard_refuses_uneven_splits(ch09):
    with pytest.raises(AssertionError):
        ch09.shard(torch.zeros(9, 4), 0, 0, 2)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_parallel_mlp_and_merged_shards(ch09, size):
    g = torch.Generator().manual_seed(10 + size)
    x = torch.randn(5, 32, generator=g)
    gate, up = torch.randn(96, 32, generator=g) / 6, torch.randn(96, 32, generator=g) / 6
    down = torch.randn(32, 96, generator=g) / 10
    want = ch09.mlp(x, gate, up, down)
    torch.testing.assert_close(ch09.sim_all_reduce([ch09.parallel_mlp(x, gate, up, down, r, size)
                                                    for r in range(size)]), want)
    parts = []
    for r in range(size):
        g_r, u_r = ch09.shard_merged([gate, up], r, size).chunk(2)
        assert torch.equal(g_r, ch09.shard(gate, 0, r, size)) and torch.equal(u_r, ch09.shard(up, 0, r, size))
        parts.append(ch09.row_parallel(F.silu(F.linear(x, g_r)) * F.linear(x, u_r), down, None, r, size))
    torch.testing.assert_close(ch09.sim_all_reduce(parts), want)


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 4, 2), (4, 2, 2), (4, 1, 2), (8, 2, 4), (8, 2, 8), (6, 3, 3),
                                                 (8, 8, 4), (16, 8, 2), (4, 2, 1)])
def test_attention_split_by_heads(ch09, heads, kv_heads, size):
    hd, hidden = 8, 32
    g = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + size)
    x = torch.randn(6, hidden, generator=g)
    wq = torch.randn(heads * hd, hidden, generator=g) / 6
    wk, wv = (torch.randn(kv_heads * hd, hidden, generator=g) / 6 for _ in range(2))
    wo = torch.randn(hidden, heads * hd, generator=g) / 6
    want = ch09.attention(x, torch.cat([wq, wk, wv]), wo, hd, heads, kv_heads)
    parts = [ch09.attention(x, ch09.shard_qkv(wq, wk, wv, hd, kv_heads, r, size), ch09.shard(wo, 1, r, size), hd,
                            heads // size, max(1, kv_heads // size)) for r in range(size)]
    torch.testing.assert_close(ch09.sim_all_reduce(parts), want)


def test_attention_matches_sdpa_reference(ch09):
    """The chapter's attention is ordinary causal GQA attention (checked against a loop over positions)."""
    hd, heads, kv_heads, hidden, T = 4, 4, 2, 16, 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, hidden, generator=g)
    wqkv = torch.randn((heads + 2 * kv_heads) * hd, hidden, generator=g)
    wo = torch.randn(hidden, heads * hd, generator=g)
    q, k, v = F.linear(x, wqkv).split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
    q, k, v = q.view(T, heads, hd), k.view(T, kv_heads, hd), v.view(T, kv_heads, hd)
    out = torch.zeros(T, heads, hd)
    for t in range(T):
        for h in range(heads):
            kh = h // (heads // kv_heads)
            scores = (k[: t + 1, kh] @ q[t, h]) / hd ** 0.5
            out[t, h] = scores.softmax(0) @ v[: t + 1, kh]
    torch.testing.assert_close(ch09.attention(x, wqkv, wo, hd, heads, kv_heads), F.linear(out.reshape(T, -1), wo))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_vocab_parallel_embedding_and_lm_head(ch09, size):
    g = torch.Generator().manual_seed(size)
    weight, hidden = torch.randn(64, 16, generator=g), torch.randn(3, 16, generator=g)
    ids = torch.tensor([0, 1, 15, 16, 31, 32, 47, 48, 63])
    looked_up = [ch09.vocab_parallel_embedding(ids, weight, r, size) for r in range(size)]
    assert torch.equal(ch09.sim_all_reduce(looked_up), F.embedding(ids, weight))
    logits = [ch09.parallel_lm_head(hidden, weight, r, size) for r in range(size)]
    torch.testing.assert_close(ch09.sim_all_gather(logits), F.linear(hidden, weight))


def test_valid_tp_sizes_match_check_head_split(ch09):
    from nanovllm.layers.linear import check_head_split

    for heads in range(1, 17):
        for kv_heads in [d for d in range(1, heads + 1) if heads % d == 0]:
            valid = ch09.valid_tp_sizes(heads, kv_heads)
            for size in range(1, heads + 1):
                if size in valid:
                    check_head_split(heads, kv_heads, size)
                else:
                    listed = rf"sizes that work for this model: \[{', '.join(map(str, valid))}\]"
                    with pytest.raises(ValueError, match=listed):
                        check_head_split(heads, kv_heads, size)


# -- chapter 09: nanovllm's layers load exactly the chapter's shards ----------------------------------------
def build_for_rank(rank, size, make):
    from nanovllm.distributed import TPGroup, tensor_parallel

    with tensor_parallel(TPGroup(rank, size, None)):
        return make()


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 2), (4, 1, 2), (8, 2, 4), (8, 1, 4), (4, 4, 4), (6, 3, 3)])
def test_package_layers_load_the_chapters_shards(ch09, heads, kv_heads, size):
    from nanovllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from nanovllm.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    hd, hidden, inter, vocab = 8, 24, 48, 96
    g = torch.Generator().manual_seed(heads + kv_heads + size)
    wq = torch.randn(heads * hd, hidden, generator=g)
    wk, wv = torch.randn(kv_heads * hd, hidden, generator=g), torch.randn(kv_heads * hd, hidden, generator=g)
    bq, bk, bv = torch.randn(heads * hd, generator=g), torch.randn(kv_heads * hd, generator=g), torch.randn(
        kv_heads * hd, generator=g)
    wo, bo = torch.randn(hidden, heads * hd, generator=g), torch.randn(hidden, generator=g)
    gate, up, down = (torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g),
                      torch.randn(hidden, inter, generator=g))
    emb = torch.randn(vocab, hidden, generator=g)
    x_attn, x_mlp = torch.randn(3, heads * hd, generator=g), torch.randn(3, inter, generator=g)
    o_parts, down_parts = [], []
    for r in range(size):
        qkv = build_for_rank(r, size, lambda: QKVParallelLinear(hidden, hd, heads, kv_heads, bias=True))
        for sid, w, b in zip("qkv", (wq, wk, wv), (bq, bk, bv)):
            qkv.weight.weight_loader(qkv.weight, w, sid)
            qkv.bias.weight_loader(qkv.bias, b, sid)
        assert torch.equal(qkv.weight, ch09.shard_qkv(wq, wk, wv, hd, kv_heads, r, size))
        assert torch.equal(qkv.bias[:, None], ch09.shard_qkv(bq[:, None], bk[:, None], bv[:, None], hd, kv_heads,
                                                             r, size))
        assert qkv.kv_replicas == max(1, size // kv_heads)

        gate_up = build_for_rank(r, size, lambda: MergedColumnParallelLinear(hidden, [inter, inter]))
        for sid, w in enumerate((gate, up)):
            gate_up.weight.weight_loader(gate_up.weight, w, sid)
        assert torch.equal(gate_up.weight, ch09.shard_merged([gate, up], r, size))

        col = build_for_rank(r, size, lambda: ColumnParallelLinear(hidden, inter))
        col.weight.weight_loader(col.weight, gate)
        assert torch.equal(col.weight, ch09.shard(gate, 0, r, size))

        o = build_for_rank(r, size, lambda: RowParallelLinear(heads * hd, hidden, bias=True))
        o.weight.weight_loader(o.weight, wo)
        o.bias.weight_loader(o.bias, bo)
        assert torch.equal(o.weight, ch09.shard(wo, 1, r, size))
        o_parts.append(F.linear(ch09.shard(x_attn, -1, r, size), o.weight, o.bias))
        torch.testing.assert_close(o_parts[-1], ch09.row_parallel(ch09.shard(x_attn, -1, r, size), wo, bo, r, size))

        dn = build_for_rank(r, size, lambda: RowParallelLinear(inter, hidden))
        dn.weight.weight_loader(dn.weight, down)
        assert torch.equal(dn.weight, ch09.shard(down, 1, r, size))
        down_parts.append(F.linear(ch09.shard(x_mlp, -1, r, size), dn.weight))

        for cls in (VocabParallelEmbedding, ParallelLMHead):
            layer = build_for_rank(r, size, lambda cls=cls: cls(vocab, hidden))
            layer.weight.weight_loader(layer.weight, emb)
            assert torch.equal(layer.weight, ch09.shard(emb, 0, r, size))
    # the package's shards, summed as an all-reduce would, give the unsplit layers
    torch.testing.assert_close(sum(o_parts), F.linear(x_attn, wo, bo))
    torch.testing.assert_close(sum(down_parts), F.linear(x_mlp, down))


def test_loading_from_lazy_safetensors_slices(ch09, tmp_path):
    """From a checkpoint file, a layer reads only its slice (a safetensors slice object), and gets the same."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nanovllm.layers.linear import QKVParallelLinear, RowParallelLinear

    hd, heads, kv_heads, hidden, size = 8, 4, 1, 16, 2
    g = torch.Generator().manual_seed(0)
    tensors = {"q": torch.randn(heads * hd, hidden, generator=g), "k": torch.randn(kv_heads * hd, hidden, generator=g),
               "v": torch.randn(kv_heads * hd, hidden, generator=g), "o": torch.randn(hidden, heads * hd, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt", device="cpu") as f:
        for r in range(size):
            qkv = build_for_rank(r, size, lambda: QKVParallelLinear(hidden, hd, heads, kv_heads))
            for sid in "qkv":
                qkv.weight.weight_loader(qkv.weight, f.get_slice(sid), sid)
            assert torch.equal(qkv.weight, ch09.shard_qkv(tensors["q"], tensors["k"], tensors["v"], hd, kv_heads,
                                                          r, size))
            o = build_for_rank(r, size, lambda: RowParallelLinear(heads * hd, hidden))
            o.weight.weight_loader(o.weight, f.get_slice("o"))
            assert torch.equal(o.weight, ch09.shard(tensors["o"], 1, r, size))


@pytest.fixture(scope="module")
def tp_demo():
    """chapters/tp_demo.py, importable here and in spawned processes (which start with this sys.path)."""
    sys.path.insert(0, str(ROOT / "chapters"))
    try:
        import tp_demo

        yield tp_demo
    finally:
        sys.path.remove(str(ROOT / "chapters"))


def test_tp_demo_shards_like_the_chapter(tp_demo):
    """chapters/tp_demo.py holds the workers' functions at module level (spawn imports them by name)."""
    x = torch.randn(3, 16)
    gate, up, down = tp_demo.make_mlp(0, 16, 32)
    want = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    partials = [F.linear(F.silu(F.linear(x, tp_demo.shard(gate, 0, r, 2))) * F.linear(x, tp_demo.shard(up, 0, r, 2)),
                         tp_demo.shard(down, 1, r, 2)) for r in range(2)]
    torch.testing.assert_close(partials[0] + partials[1], want)
    assert tp_demo.mlp_rank.__module__ == "tp_demo" and tp_demo.allreduce_timing.__module__ == "tp_demo"


# -- chapter 10 ---------------------------------------------------------------------------------------------
def test_seed_workload_is_the_benchmarks(ch10):
    from nanovllm import bench

    prompts, output_lens = ch10.seed_workload()
    w = bench.seed_workload()
    assert prompts == w.prompts and output_lens == w.max_tokens
    assert sum(map(len, prompts)) == 142_827 and sum(output_lens) == 133_966  # nano-vllm's published totals
    small = bench.seed_workload(8, (16, 64), (8, 32))
    assert ch10.seed_workload(8, (16, 64), (8, 32)) == (small.prompts, small.max_tokens)


def test_floor_of_the_seed_benchmark(ch10):
    import json

    from nanovllm import bench

    cfg = json.loads(bench.QWEN3_0_6B_CONFIG.read_text())
    assert ch10.kv_bytes_per_token(cfg) == 28 * 2 * 8 * 128 * 2  # 112 KiB in bfloat16
    # weights: count the parameters of the real module (norms aside)
    import transformers

    skip = ("architectures", "torch_dtype", "model_type")
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.items() if k not in skip})
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(hf_cfg)
    params = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)
    assert ch10.weight_bytes(cfg, 1) == params
    prompts, outs = ch10.seed_workload()
    kv, w = ch10.decode_floor_bytes(list(map(len, prompts)), outs, ch10.kv_bytes_per_token(cfg), ch10.weight_bytes(cfg))
    assert 13.8e12 < kv < 13.9e12 and w == 1023 * ch10.weight_bytes(cfg)
    # a small case by hand: prompt 3, output 3 -> decode steps read 4 and 5 tokens
    assert ch10.decode_floor_bytes([3], [3], 1, 0) == (9, 0)


def test_measure_counts_output_tokens(ch10, tiny_qwen3):
    from nanovllm import LLM, SamplingParams

    path, _ = tiny_qwen3
    llm = LLM(str(path), device="cpu", dtype="float32", num_kvcache_blocks=32)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in (5, 7, 3)]
    tokens, seconds = ch10.measure(llm, prompts, params, SamplingParams(max_tokens=2))
    assert tokens == 15 and seconds > 0
    assert len(llm.step_log) > 1 and sum(not p for p, *_ in llm.step_log) == 6  # decode steps: 7 - 1


def test_bench_flags_the_chapter_names_exist(capsys):
    import json
    import re

    from nanovllm import bench
    from nanovllm.config import EngineConfig

    nb = json.loads((ROOT / "chapters" / "10_benchmark.ipynb").read_text())
    prose = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    flags = set(re.findall(r"`(--[a-z][a-z-]*)`", prose))
    assert {"--kvcache-block-size", "--block-size", "--tp"} <= flags
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    help_text = capsys.readouterr().out
    assert all(re.search(rf"{flag}(?![\w-])", help_text) for flag in flags), flags
    # "the benchmark's prefill steps hold up to 16,384 tokens ... LLM's default is 8,192"
    assert bench.BENCH_PREFILL_TOKENS == 16_384 and EngineConfig().max_num_batched_tokens == 8_192


# -- the results figure -------------------------------------------------------------------------------------
def run_figure(csv_path, png_path):
    return subprocess.run([sys.executable, str(FIGURE_SCRIPT), str(csv_path), str(png_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_figure_script_draws_the_stored_table(tmp_path):
    assert RESULTS_CSV.exists()
    copy = tmp_path / "bench_results.csv"
    shutil.copy(RESULTS_CSV, copy)
    result = run_figure(copy, tmp_path / "out.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_script_draws_several_panels(tmp_path):
    rows = list(csv.DictReader(RESULTS_CSV.open()))
    assert rows
    extra = [dict(rows[0], engine="vllm", tok_per_s="1000.0", note=""),
             dict(rows[0], tp="2", gpu="Some GPU", triton=""),
             dict(rows[0], workload="chat", engine="custom")]
    path = tmp_path / "more.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + extra)
    result = run_figure(path, tmp_path / "more.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "more.png").stat().st_size > 10_000


def test_figure_script_rejects_a_table_without_its_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("date,engine\n2026-01-01,nanovllm\n")
    result = run_figure(path, tmp_path / "bad.png")
    assert result.returncode != 0 and "lacks the columns" in result.stderr
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_tp_demo_runs_two_gloo_ranks(tp_demo):
    """The chapter's real two-process MLP: both ranks end with the unsplit MLP's output; nothing is left."""
    import multiprocessing as mp

    before = set(mp.active_children())
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    (p0, y0), (p1, y1) = tp_demo.run_ranks(tp_demo.mlp_rank, 2, 0, x, 32, 64)
    gate, up, down = tp_demo.make_mlp(0, 32, 64)
    want = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    assert torch.equal(y0, y1)
    torch.testing.assert_close(y0, want)
    torch.testing.assert_close(p0 + p1, want)
    assert set(mp.active_children()) == before

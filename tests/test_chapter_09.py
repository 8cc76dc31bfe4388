"""Chapter 09's build exercise, ``sharded_argmax``: the reader's function (or the solution's, ``--lab solutions``)
gets the logits slices that nanovllm's own ``ParallelLMHead`` computes when built for each rank, and must pick
the engine's greedy tokens, ties going to the lowest id.  And the figure script of the chapter draws."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import attempted, make_tiny_model
from nbimport import load_chapter

from nanovllm import LLM, SamplingParams
from nanovllm.distributed import TPGroup, tensor_parallel
from nanovllm.layers.embedding import ParallelLMHead

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = "09_tensor_parallel"
PROMPTS = [[(37 * i + 11 * j) % 500 + 1 for j in range(5 + 7 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen3 (vocabulary 512, tied LM head): the HF model, and nanovllm's greedy first token per prompt."""
    path = tmp_path_factory.mktemp("tiny-qwen3-09")
    model = make_tiny_model("qwen3", path)
    with LLM(path, device="cpu", dtype="float32", num_kvcache_blocks=32) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    return model, [o.token_ids[0] for o in outs]


def rank_logits(model, size):
    """Each rank's slice of the last position's logits for every prompt, from nanovllm's ParallelLMHead built
    for that rank and loaded (by its own weight_loader) from the HF model's LM head."""
    with torch.no_grad():
        hidden = torch.stack([model.model(torch.tensor([p])).last_hidden_state[0, -1] for p in PROMPTS])
        weight = model.lm_head.weight
        parts = []
        for rank in range(size):
            with tensor_parallel(TPGroup(rank, size, group=None)):
                head = ParallelLMHead(*weight.shape)
            head.weight.weight_loader(head.weight, weight)
            assert head.weight.shape[0] == weight.shape[0] // size
            parts.append(F.linear(hidden, head.weight))  # what rank `rank` computes before the all-gather
    return parts


def check_argmax(fn, model, greedy):
    """The exercise's contract: the engine's greedy tokens from the ranks' slices, and argmax's choice on ties."""
    for size in (1, 2, 4):
        got = torch.as_tensor(fn(rank_logits(model, size))).tolist()
        assert got == greedy, f"over {size} ranks: {got}, the engine's greedy tokens are {greedy}"
    logits = torch.randn(5, 512, generator=torch.Generator().manual_seed(3))
    for row, (a, b) in enumerate([(300, 40), (20, 10), (511, 0), (129, 128)]):
        logits[row, a] = logits[row, b] = logits[row].max() + 1
    for size in (2, 4):
        parts = [logits[:, r * 512 // size:(r + 1) * 512 // size] for r in range(size)]
        got = torch.as_tensor(fn(parts)).tolist()
        assert got == logits.argmax(-1).tolist(), f"ties over {size} ranks: {got}"


def test_sharded_argmax_picks_the_engines_greedy_tokens(lab_code, tiny):
    ch = load_chapter(CHAPTER, code=lab_code)
    with attempted(lab_code):
        check_argmax(ch.sharded_argmax, *tiny)


def test_wrong_sharded_argmaxes_fail_the_checks(tiny):
    def no_offsets(parts):  # each rank's position in its own slice, not in the vocabulary
        best = torch.stack([p.max(-1).values for p in parts]).argmax(0)
        return torch.stack([p.argmax(-1) for p in parts]).gather(0, best[None])[0]

    def last_rank_wins_ties(parts):
        values = torch.stack([p.max(-1).values for p in parts])
        best = len(parts) - 1 - values.flip(0).argmax(0)
        width = parts[0].shape[-1]
        return torch.stack([p.argmax(-1) + r * width for r, p in enumerate(parts)]).gather(0, best[None])[0]

    for wrong in (no_offsets, last_rank_wins_ties):
        with pytest.raises(AssertionError):
            check_argmax(wrong, *tiny)


def test_figure_script_draws_the_sharding(tmp_path):
    out = tmp_path / "fig_09_sharding.png"
    result = subprocess.run([sys.executable, str(ROOT / "figures" / "fig_09_sharding.py"), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

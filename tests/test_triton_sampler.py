"""The fused Gumbel-max sampling kernel against the definition of sampling (runs under Triton's
interpreter on a CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
from nanovllm.layers.sampler import row_seed  # noqa: E402
from nanovllm.layers.triton_sampler import gumbel_sample  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_greedy_rows_are_argmax_with_first_index_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 5000, device=DEVICE)
    logits[2, 17] = logits[2, 4000] = 100.0  # a tie: the lower index wins, as in torch.argmax
    temps = torch.zeros(6, device=DEVICE)
    seeds = torch.arange(6, device=DEVICE, dtype=torch.int64)
    out = gumbel_sample(logits, temps, seeds, block=1024)
    assert out.tolist() == logits.argmax(-1).tolist()
    assert out[2].item() == 17


def test_bf16_logits_and_a_vocab_that_is_not_a_multiple_of_the_block():
    logits = torch.randn(3, 1000, device=DEVICE).to(torch.bfloat16)
    out = gumbel_sample(logits, torch.zeros(3, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE),
                        block=256)
    assert out.tolist() == logits.float().argmax(-1).tolist()


def test_draws_follow_softmax_of_logits_over_temperature():
    rows, temp = 1200, 0.7
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], device=DEVICE)
    seeds = torch.tensor([row_seed(7, i) for i in range(rows)], dtype=torch.int64, device=DEVICE)
    out = gumbel_sample(logits.expand(rows, -1).contiguous(), torch.full((rows,), temp, device=DEVICE), seeds,
                        block=16)
    counts = torch.bincount(out.cpu(), minlength=6).double()
    expected = torch.softmax(logits.cpu().double() / temp, 0) * rows
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (counts.tolist(), expected.tolist())  # 5 degrees of freedom: p < 0.001


def test_same_seed_same_token_whatever_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 300, device=DEVICE)
    temps = torch.ones(4, device=DEVICE)
    seeds = torch.tensor([11, 12, 13, 14], dtype=torch.int64, device=DEVICE)
    together = gumbel_sample(logits, temps, seeds, block=128)
    alone = [gumbel_sample(logits[i:i + 1], temps[i:i + 1], seeds[i:i + 1], block=128).item() for i in range(4)]
    assert together.tolist() == alone
    draws = {gumbel_sample(logits[:1], temps[:1], torch.tensor([s], device=DEVICE), block=128).item()
             for s in range(40)}
    assert len(draws) > 5, "different seeds must give different draws"


@pytest.mark.parametrize("temp", [0.0, 0.8])
def test_the_draw_does_not_depend_on_how_rows_are_cut(temp):
    """Rows cut into column ranges (the default for small batches) give the token of one whole-row program,
    ties included: the noise of a column depends only on the row's seed, and the lowest index still wins."""
    torch.manual_seed(2)
    logits = torch.randn(5, 700, device=DEVICE)
    logits[1, 40] = logits[1, 650] = 50.0  # a tie across two chunks
    logits[3, :] = float("-inf")
    logits[3, 699] = 0.0  # the only finite logit sits in the last, partial chunk
    temps = torch.full((5,), temp, device=DEVICE)
    seeds = torch.tensor([row_seed(3, i) for i in range(5)], dtype=torch.int64, device=DEVICE)
    whole = gumbel_sample(logits, temps, seeds, block=64, num_chunks=1)
    for chunks in (2, 3, 11, None):
        assert torch.equal(gumbel_sample(logits, temps, seeds, block=64, num_chunks=chunks), whole), chunks
    assert whole[3].item() == 699
    if temp == 0.0:
        assert whole.tolist() == logits.argmax(-1).tolist() and whole[1].item() == 40


def test_float64_staged_parameters_give_the_same_tokens():
    """The engine stages temperatures and seeds in one float64 buffer; the kernel converts them itself."""
    torch.manual_seed(4)
    logits = torch.randn(6, 500, device=DEVICE)
    temps = torch.tensor([0.0, 0.5, 1.0, 0.7, 2.0, 0.0], device=DEVICE)
    seeds = torch.tensor([row_seed(9, i) for i in range(6)], dtype=torch.int64, device=DEVICE)
    staged = torch.stack([temps.double(), seeds.double()])
    assert torch.equal(gumbel_sample(logits, staged[0], staged[1], block=64),
                       gumbel_sample(logits, temps, seeds, block=64))

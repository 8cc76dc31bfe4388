"""Incremental detokenization (``nanovllm/detokenizer.py``): token by token, the pieces add up to what
decoding the whole completion at once gives, and no piece carries half a character."""

from __future__ import annotations

import random

import pytest

from nanovllm.detokenizer import REPLACEMENT, IncrementalDetokenizer
from nanovllm.loading import embedded
from nanovllm.loading.resolve import load_tokenizer

TEXTS = [
    " Paris is the capital of France.",
    " Café au lait, naïve façade — déjà vu.",
    " 東京は日本の首都です。北京是中国的首都。",
    " Emoji: 🎉🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵!",
    "\n\n```python\ndef f(x):\n    return x ** 2  # ≤ ∞\n```\n",
    "    leading spaces, tabs\tand  double  spaces ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(embedded.embedded_model_dir())


def stream(tokenizer, prompt_ids, completion_ids, chunk=1, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    pieces = [detok.add(completion_ids[i:i + chunk]) for i in range(0, len(completion_ids), chunk)]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text
    return pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_pieces_add_up_to_the_whole_decode(tokenizer, text, chunk):
    prompt = tokenizer("The user asked a question. Answer:").input_ids
    completion = tokenizer(text, add_special_tokens=False).input_ids
    pieces = stream(tokenizer, prompt, completion, chunk)
    whole = tokenizer.decode(completion, skip_special_tokens=True)
    assert "".join(pieces) == whole
    assert not any(REPLACEMENT in p for p in pieces), "a piece split a character"


def test_a_character_split_over_tokens_waits_for_its_last_byte(tokenizer):
    completion = tokenizer(" 🎉🚀", add_special_tokens=False).input_ids
    assert REPLACEMENT in tokenizer.decode(completion[:2]), "(the emoji spans several byte tokens here)"
    pieces = stream(tokenizer, tokenizer("Party:").input_ids, completion)
    assert "" in pieces[:-1] and "".join(pieces) == " 🎉🚀"


def test_special_tokens_skipped_or_kept(tokenizer):
    prompt = tokenizer("Hi").input_ids
    body = tokenizer(" Hello there", add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    completion = body + [eos]
    assert "".join(stream(tokenizer, prompt, completion)) == tokenizer.decode(completion, skip_special_tokens=True)
    kept = "".join(stream(tokenizer, prompt, completion, skip_special_tokens=False))
    assert kept == tokenizer.decode(completion, skip_special_tokens=False) and kept.endswith(tokenizer.eos_token)


def test_random_tokens(tokenizer):
    """Any ids at all (invalid byte sequences included): the pieces still add up to the whole decode."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(20):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        completion = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(tokenizer, prompt, completion)) == tokenizer.decode(completion, skip_special_tokens=True)

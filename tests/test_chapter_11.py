"""Chapter 11 (serving): the chapter's engine loop gives AsyncLLM's tokens and frees an aborted request's blocks,
its incremental detokenizer sends nanovllm's pieces, its stop-string filter streams what the engine returns,
and its serving driver shows the stall that mixed batches remove."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import attempted
from nbimport import load_chapter

from nanovllm import LLM, SamplingParams

CHAPTER = Path(__file__).resolve().parent.parent / "chapters" / "11_serving.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def ch11():
    return load_chapter("11_serving")


@pytest.fixture(scope="module")
def tokenizer():
    from nanovllm.loading import embedded
    from nanovllm.loading.resolve import load_tokenizer

    return load_tokenizer(embedded.embedded_model_dir())


@pytest.fixture(scope="module")
def engine():
    """nanovllm's AsyncLLM around the embedded SmolLM2 (it has a tokenizer: stop strings need one); the
    chapter's loop drives the same LLM (engine.llm) while the AsyncLLM's loop is idle."""
    from nanovllm.async_llm import AsyncLLM

    engine = AsyncLLM(llm=LLM(device="cpu", dtype="float32", max_num_seqs=8, max_model_len=512,
                              num_kvcache_blocks=64))
    yield engine
    engine.shutdown()  # the LLM with it


@pytest.fixture(scope="module")
def smol(engine):
    return engine.llm


# -- incremental detokenization ------------------------------------------------------------------------------
TEXTS = [" Paris is the capital of France.", " Café au lait, naïve façade — déjà vu.", " 東京は日本の首都です。",
         " Emoji: 🎉🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵!", "\n\n```python\ndef f(x):\n    return x ** 2  # ≤ ∞\n```\n"]


def test_detokenizer_sends_the_packages_pieces(ch11, tokenizer):
    from nanovllm.detokenizer import REPLACEMENT, IncrementalDetokenizer

    rng = random.Random(1)
    prompt = tokenizer("The user asked a question. Answer:").input_ids
    cases = [tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    cases += [tokenizer(" Hello there", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    for k, completion in enumerate(cases):
        ours, theirs = ch11.MyDetokenizer(tokenizer, prompt), IncrementalDetokenizer(tokenizer, prompt)
        pieces = [ours.add([t]) for t in completion]
        assert pieces == [theirs.add([t]) for t in completion]
        assert "".join(pieces) == ours.text
        whole = tokenizer.decode(completion, skip_special_tokens=True)
        if not whole.endswith(REPLACEMENT):
            assert ours.text == whole
        if k < len(TEXTS):
            assert not any(REPLACEMENT in p for p in pieces)


def test_an_emoji_waits_for_its_last_byte(ch11, tokenizer):
    ids = tokenizer(" Party time 🎉!", add_special_tokens=False).input_ids
    detok = ch11.MyDetokenizer(tokenizer, tokenizer("Say something:").input_ids)
    assert [detok.add([t]) for t in ids] == [" Party", " time", "", "", " 🎉", "!"]


# -- stop strings ----------------------------------------------------------------------------------------------
def test_stop_filter_holds_back_and_cuts(ch11):
    rng = random.Random(0)
    alphabet = "ab \n"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[:min(cuts)] if cuts else text
        f, sent, pos = ch11.StopFilter(stops), "", 0
        while pos < len(text) and f.stop is None:
            n = rng.randint(1, 3)
            piece = f.add(text[pos:pos + n])
            pos += n
            sent += piece
            assert expected.startswith(sent)  # nothing beyond the cut is ever sent
            if f.stop is None:  # the last hold - 1 characters are held back
                assert len(sent) == max(0, len(text[:pos]) - f.hold)
        if f.stop is None:
            sent += f.text[f.sent:]  # the end of the request: what was held back goes out
        assert sent == expected and (f.stop is not None) == bool(cuts)


def test_stream_text_equals_the_engine_and_async_llm(ch11, engine, smol, tokenizer):
    prompt = "The capital of France is"
    full = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    words = full.text.split()
    for stop in [" ".join(words[2:4]), words[3], full.text[len(full.text) // 2:][:3]]:
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "§§§"])
        want = smol.generate(prompt, params, use_tqdm=False)[0]
        pieces, text, found = ch11.stream_text(tokenizer, tokenizer(prompt).input_ids, full.token_ids, [stop, "§§§"])
        assert (text, found) == (want.text, want.stop_reason) and "".join(pieces) == text
        assert want.finish_reason == "stop"
        streamed = list(engine.add_request(prompt, params))
        assert "".join(d.text for d in streamed) == text


# -- the engine loop -------------------------------------------------------------------------------------------
def test_my_loop_gives_async_llm_and_generate_tokens(ch11, engine, smol):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "List three colours:",
               [5, 6, 7, 8, 9, 10], "Hello"]
    params = [SamplingParams(temperature=0, max_tokens=10), SamplingParams(temperature=0.8, seed=1, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=1.0, seed=7, max_tokens=9),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=2, n=2, max_tokens=5)]
    mine = ch11.MyAsyncEngine(smol)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            ours = list(pool.map(lambda a: [t for new in mine.add_request(*a) for t in new], zip(prompts, params)))
    finally:
        mine.shutdown()
    assert not mine.thread.is_alive()
    want = smol.generate(prompts, params, use_tqdm=False)
    assert ours == [o.token_ids for o in want]
    streams = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    theirs = [[t for d in s if d.index == 0 for t in d.token_ids] for s in streams]
    assert ours == theirs


def test_my_loop_aborts_and_frees_blocks(ch11, smol):
    bm = smol.block_manager
    mine = ch11.MyAsyncEngine(smol)
    try:
        stream = mine.add_request("Tell me a long story.", SamplingParams(temperature=0, max_tokens=400,
                                                                          ignore_eos=True))
        other = mine.add_request("Hello", SamplingParams(temperature=0, max_tokens=4))
        got, aborted = 0, False
        for new in stream:
            got += len(new)
            if got >= 5 and not aborted:
                assert bm.num_free_blocks < bm.num_blocks
                mine.abort(stream)
                aborted = True
        assert stream.finish_reason == "abort" and got < 400
        assert len([t for new in other for t in new]) == 4 and other.finish_reason == "length"
        assert bm.num_free_blocks == bm.num_blocks and not smol.has_unfinished_requests()
        # a request still running when the loop stops is aborted, and its stream ends
        late = mine.add_request("Count to a thousand:", SamplingParams(temperature=0, max_tokens=400,
                                                                       ignore_eos=True))
        next(iter(late))
    finally:
        mine.shutdown()
    assert late.finish_reason == "abort" and bm.num_free_blocks == bm.num_blocks


# -- mixed batches ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixed", [False, True])
def test_serve_workload_shows_the_stall(ch11, tiny_qwen3, mixed):
    path, _ = tiny_qwen3
    llm = LLM(str(path), device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=16,
              kvcache_block_size=4, num_kvcache_blocks=64, mixed_batches=mixed)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        workload = [(0, [5, 6, 7], greedy), (0, [8, 9, 10, 11], greedy), (2, list(range(100, 140)), greedy)]
        run = ch11.serve_workload(llm, workload)
        ttft, itl = ch11.latency(run, [0, 1], [2])
    finally:
        llm.shutdown()
    assert [len(t) for t in run["times"]] == [12, 12, 12] and len(ttft) == 1 and len(itl) == 22
    assert all(b >= a for t in run["times"] for a, b in zip(t, t[1:]))
    gaps = [b - a for i in (0, 1) for a, b in zip(run["token_steps"][i], run["token_steps"][i][1:])]
    if mixed:  # every step: both decodes and a 14-token chunk (as tests/test_mixed_batches.py has it)
        assert max(gaps) == 1
        assert [s["prefill_tokens"] for s in run["steps"][2:5]] == [14, 14, 12]
    else:  # three prefill steps of the 40-token prompt, the generating requests waiting
        assert max(gaps) == 4
        assert [s["prefill_tokens"] for s in run["steps"][2:5]] == [16, 16, 8]


# -- the lab's build exercise: a detokenizer that flushes an incomplete character at the end ------------------
def check_flush(cls, tokenizer, completions, prompt):
    """The exercise's contract: flush() sends what IncrementalDetokenizer.flush sends, the pieces and the flush
    add up to decoding the whole completion, and a second flush() sends nothing."""
    from nanovllm.detokenizer import IncrementalDetokenizer

    for completion in completions:
        ours, theirs = cls(tokenizer, prompt), IncrementalDetokenizer(tokenizer, prompt)
        pieces = [ours.add([t]) for t in completion]
        assert pieces == [theirs.add([t]) for t in completion]
        last = ours.flush()
        assert last == theirs.flush(), (completion, last)
        assert "".join(pieces) + last == tokenizer.decode(completion, skip_special_tokens=True), completion
        assert ours.flush() == "", completion


def flush_cases(tokenizer, smol):
    """Completions cut in the middle of emoji, random token ids, and the engine's own sampled completions."""
    emoji = [tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS[3:]]
    cases = [ids[:k] for ids in emoji for k in range(1, len(ids) + 1)]
    rng = random.Random(2)
    cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 16))] for _ in range(30)]
    outs = smol.generate(["Write three emoji:", "Say hello in Japanese:"],
                         SamplingParams(temperature=1.2, seed=0, max_tokens=7, n=3), use_tqdm=False)
    cases += [o.token_ids for out in outs for o in out.outputs]
    return cases


def test_flushing_detokenizer_ends_like_the_package(lab_code, tokenizer, smol):
    ch = load_chapter("11_serving", code=lab_code)
    prompt = tokenizer("Reply with emoji only:").input_ids
    with attempted(lab_code):
        check_flush(ch.FlushingDetokenizer, tokenizer, flush_cases(tokenizer, smol), prompt)


def test_wrong_flushes_fail_the_checks(ch11, tokenizer, smol):
    class NeverFlushes(ch11.MyDetokenizer):  # the incomplete character is lost
        def flush(self):
            return ""

    class FlushesTwice(ch11.MyDetokenizer):  # sends the rest, but leaves the offsets where they were
        def flush(self):
            sent, rest = self.decode(self.tokens[self.prefix:self.read]), self.decode(self.tokens[self.prefix:])
            return rest[len(sent):]

    prompt = tokenizer("Reply with emoji only:").input_ids
    for wrong in (NeverFlushes, FlushesTwice):
        with pytest.raises(AssertionError):
            check_flush(wrong, tokenizer, flush_cases(tokenizer, smol), prompt)


# -- the committed notebook ------------------------------------------------------------------------------------
def test_notebook_is_commit_clean():
    text = CHAPTER.read_text()
    nb = json.loads(text)
    assert "widgets" not in nb["metadata"], "widget state saved in the notebook"
    assert not any("execution" in c["metadata"] for c in nb["cells"]), "execution timestamps saved"
    assert WIDGET_VIEW not in text, "widget views (random model ids) saved"
    assert not re.search(r"/(work|tmp|root|home)/", text), "a machine path in the notebook"
    assert not re.search(r"127\.0\.0\.1:\d+", text), "a port number in the outputs"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("export" in c.get("metadata", {}).get("tags", []) for c in code)
    for c in code:
        src = "".join(c["source"])
        if c.get("outputs"):
            assert c["execution_count"] is not None, "kept outputs need their execution count (nbval)"
        assert not any(o.get("output_type") == "error" for o in c.get("outputs", [])), "an error output"
        assert not any(o.get("name") == "stderr" for o in c.get("outputs", [])), "stderr kept (warnings?)"
        if "BlockTableViewer(" in src:
            assert src.startswith("# NBVAL_IGNORE_OUTPUT")
        assert not src.startswith("!")
    # the chapter stops what it starts: the server (and with it the engine), the mixed-batch engines
    sources = "".join("".join(c["source"]) for c in code)
    assert "server.stop()" in sources and "mine.shutdown()" in sources and "with LLM(" in sources

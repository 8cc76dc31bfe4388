"""The public entry point: ``LLM(model).generate(prompts, sampling_params)``, vLLM-compatible.

Everything the user passes is validated before any work starts; if a step fails anyway, every request
is dropped and its KV blocks released, so the engine stays usable.  One caller drives the engine at a time
(``_exclusive``): concurrent calls from other threads wait, a re-entrant call is refused.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import numbers
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from nanovllm.config import DEFAULT_MODEL, EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.overlap import OverlappedLoop, OverlapScheduler
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils import check_bool


class LLM:
    """An inference engine for one model.

    >>> llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    >>> out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text

    ``llm.startup_seconds``: how long the engine took to start (loading, KV cache, compilation, CUDA graphs).
    ``llm.shutdown()`` (or leaving ``with LLM(...) as llm:``) gives its memory back at once.
    """

    def __init__(self, model: str | Path = DEFAULT_MODEL, **engine_args):
        """``model``: the embedded default's name, a HF-style folder, a .gguf file or a hub id.
        ``engine_args``: any field of ``nanovllm.config.EngineConfig`` (its defaults are the engine's)."""
        from nanovllm.attention import backend_class, check_runs_here, resolve_backend_name
        from nanovllm.engine.model_runner import ModelRunner
        from nanovllm.loading.resolve import ResolvedModel, load_tokenizer, read_eos_token_ids

        started = time.perf_counter()
        config = EngineConfig.from_kwargs("LLM()", engine_args)
        resolved = ResolvedModel.resolve(model, config.device, config.dtype)
        self.model_dir, self.hf_config = resolved.folder, resolved.hf_config
        self.device, self.dtype = resolved.device, resolved.dtype
        self.tokenizer = load_tokenizer(self.model_dir)
        # what the settings become for this model and machine: a concrete backend, the block size it needs
        backend = resolve_backend_name(config.attention_backend, self.device, self.dtype, config.kv_cache_dtype)
        check_runs_here(backend, self.device, config.kv_cache_dtype, self.dtype)
        self.config = config = replace(
            config, attention_backend=backend,
            kvcache_block_size=backend_class(backend).block_size(config.kvcache_block_size),
            max_model_len=min(config.max_model_len, self.hf_config.max_position_embeddings),
            eos_token_ids=read_eos_token_ids(self.model_dir, self.hf_config))
        if config.tensor_parallel_size > 1:  # rank 0 here, ranks 1.. in worker processes
            from nanovllm.engine.tp_runner import TensorParallelRunner

            self.runner = TensorParallelRunner(config, resolved)
        else:
            draft = self._resolve_draft(config) if config.speculative_method == "draft" else None
            # a draft model's KV cache has as many blocks as the target's: sized together from the same memory
            extra = 0 if draft is None else kv_bytes_per_token(draft.hf_config, self.dtype) * config.kvcache_block_size
            self.runner = ModelRunner(config, resolved, extra_kv_bytes_per_block=extra)
        self.block_manager = BlockManager(self.runner.num_kvcache_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.overlapped = None  # the overlapped loop generate() uses, where the runner allows it
        self.spec = None  # speculative decoding (engine/spec_decode.py): the plain loop, each step through it
        if self.runner.supports_overlap and config.speculative_method is None:
            self.scheduler = OverlapScheduler(config, self.block_manager)
            self.overlapped = OverlappedLoop(self.scheduler, self.runner)
        else:
            self.scheduler = Scheduler(config, self.block_manager)
        if config.speculative_method is not None:
            from nanovllm.engine.spec_decode import SpecDecoder

            if draft is not None:  # the same device, dtype and block size, a cache of as many blocks
                draft = ModelRunner(replace(config, num_kvcache_blocks=self.runner.num_kvcache_blocks,
                                            load_format="auto", speculative_method=None, speculative_model=None),
                                    draft)
            self.spec = SpecDecoder(config, self.runner, self.scheduler, draft)
        self._ids = itertools.count()
        self._lock, self._driver = threading.Lock(), None  # see _exclusive
        self.step_log: list[tuple[bool, int, int, float]] = []
        self._closed = False  # see shutdown()
        self.startup_seconds = time.perf_counter() - started

    def _resolve_draft(self, config: EngineConfig):
        """The draft model (``speculative_model``), on the target's device and in its dtype; it must share the
        target's vocabulary."""
        from nanovllm.loading.resolve import ResolvedModel

        draft = ResolvedModel.resolve(config.speculative_model, str(self.device), self.dtype)
        if draft.hf_config.vocab_size != self.hf_config.vocab_size:
            raise ValueError(f"speculative_model {str(config.speculative_model)!r} has a vocabulary of "
                             f"{draft.hf_config.vocab_size} tokens, the model {self.hf_config.vocab_size}: a draft "
                             "model must share the target's vocabulary")
        return draft

    # -- validation ----------------------------------------------------------------------------------
    def _prompt_ids(self, prompts) -> tuple[list[list[int]], list[str | None]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a list of str or a list of token-id lists, "
                            f"got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty")
        ids, texts = [], []
        vocab = self.hf_config.vocab_size
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:  # checked first: the more specific problem
                    raise ValueError(f"prompt {i} is an empty string")
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is text, but the model at {self.model_dir.name} has no "
                                     "tokenizer: pass token-id lists instead")
                check_text(f"prompt {i}", p)
                toks = self.tokenizer(p).input_ids
                texts.append(p)
            elif isinstance(p, (list, tuple)):
                wrong = [t for t in p if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
                if wrong:
                    raise TypeError(f"prompt {i}: a token-id prompt must be a list of ints, got a "
                                    f"{type(wrong[0]).__name__} in it")
                toks = [int(t) for t in p]  # numpy's integers too
                texts.append(None)
            else:
                raise TypeError(f"prompt {i} must be a str or a list of token ids, got {type(p).__name__}")
            if not toks:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in toks if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            if len(toks) >= self.config.max_model_len:
                raise ValueError(f"prompt {i} has {len(toks)} tokens; max_model_len={self.config.max_model_len} "
                                 f"allows at most {self.config.max_model_len - 1}")
            ids.append(toks)
        return ids, texts

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != n:
                raise ValueError(f"got {len(sampling_params)} sampling_params for {n} prompts: "
                                 "pass one, or one per prompt")
            if not all(isinstance(p, SamplingParams) for p in sampling_params):
                raise TypeError("sampling_params must be SamplingParams objects")
            return list(sampling_params)
        raise TypeError(f"sampling_params must be SamplingParams or a list of them, "
                        f"got {type(sampling_params).__name__}")

    def _check_fits(self, ids: list[list[int]], params: list[SamplingParams]) -> None:
        """Each request alone must fit in the KV cache, or it could never finish; stop strings need a
        tokenizer."""
        bm = self.block_manager
        for i, (toks, p) in enumerate(zip(ids, params)):
            if p.prompt_logprobs is not None and self.config.tensor_parallel_size > 1:
                raise ValueError(f"prompt {i} asks for prompt_logprobs, which a tensor-parallel engine does not "
                                 "compute (its LM head is split over the ranks)")
            if p.stop and self.tokenizer is None:
                raise ValueError(f"prompt {i} has stop strings, but the model at {self.model_dir.name} has no "
                                 "tokenizer to find them with: use stop_token_ids")
            need = bm.blocks_for(min(len(toks) + p.max_tokens, self.config.max_model_len))
            if need > bm.num_blocks:
                raise ValueError(f"prompt {i} may need {need} KV blocks but the cache has {bm.num_blocks} "
                                 "(num_kvcache_blocks): raise it or lower max_tokens")

    # -- generation ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self, what: str, closed_ok: bool = False):
        """One caller drives the engine at a time: calls from other threads wait their turn (their requests
        then run after the current ones); a call from inside a running call of the same thread (a callback,
        say) is refused, since it would interleave with the outer call's steps.  After ``shutdown()`` every
        call is refused."""
        if self._driver == threading.get_ident():
            raise RuntimeError(f"{what} called while this thread is already inside generate()/step() of the same "
                               "engine (re-entrant use); call it after that returns")
        with self._lock:
            if self._closed and not closed_ok:
                kind = "tensor-parallel " if self.config.tensor_parallel_size > 1 else ""
                raise RuntimeError(f"this {kind}engine has been shut down")
            self._driver = threading.get_ident()
            try:
                yield
            finally:
                self._driver = None

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt; returns one ``RequestOutput`` per prompt, in order.  Safe to call from several
        threads: the calls run one after another."""
        with self._exclusive("generate()"):
            return self._generate(prompts, sampling_params, use_tqdm)

    def _generate(self, prompts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        ids, texts = self._prompt_ids(prompts)
        params = self._params_list(sampling_params, len(ids))
        self._check_fits(ids, params)
        seqs = [self._make_seq(toks, p) for toks, p in zip(ids, params)]
        try:
            with no_full_gc():
                self._run(seqs, use_tqdm)
        except BaseException:
            self._abort_all()
            raise
        return [self.output(s, text) for s, text in zip(seqs, texts)]

    def _make_seq(self, token_ids: list[int], params: SamplingParams) -> Sequence:
        """The request's sequence; with ``n`` > 1 the other completions are its ``children``, seeded
        ``seed + i`` (the scheduler queues them once its prompt is computed)."""
        seq = Sequence(next(self._ids), token_ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.stop:
            from nanovllm.detokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids)
        if params.min_tokens:
            eos = () if params.ignore_eos else tuple(self.config.eos_token_ids)
            seq.stop_ids = eos + tuple(params.stop_token_ids or ())
        if params.n > 1:
            seed = params.seed
            seq.children = [self._make_seq(token_ids, replace(
                params, n=1, prompt_logprobs=None, seed=None if seed is None else (seed + i) % 2 ** 64))
                for i in range(1, params.n)]
        return seq

    def output(self, seq: Sequence, prompt: str | None = None) -> RequestOutput:
        """The ``RequestOutput`` of a request added with ``add_request`` (finished or not: the tokens so far),
        the same as ``generate`` returns."""
        outs = [self._completion(i, s) for i, s in enumerate([seq] + seq.children)]
        first = outs[0]
        return RequestOutput(seq.seq_id, prompt, seq.prompt_token_ids, first.token_ids, first.text,
                             first.finish_reason, seq.num_cached_tokens, outs, first.stop_reason,
                             self._logprob_dicts(seq.prompt_logprobs), all(o.finished() for o in outs))

    def _completion(self, index: int, seq: Sequence) -> CompletionOutput:
        text = seq.stop_text
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode(seq.completion_token_ids,
                                                                         skip_special_tokens=True)
        logprobs = cumulative = None
        if seq.logprobs is not None:  # an overlapped step's dropped token may have left one entry too many
            entries = seq.logprobs[:len(seq.completion_token_ids)]
            logprobs = self._logprob_dicts(entries)
            cumulative = sum(lps[0] for _, lps, _ in entries)
        return CompletionOutput(index, text, seq.completion_token_ids, cumulative, logprobs, seq.finish_reason,
                                seq.stop_reason)

    def _logprob_dicts(self, entries):
        """(ids, logprobs, rank of the first) entries as vLLM's {token id: Logprob} dicts: the sampled (or
        prompt) token first, then the most likely ones, ranked 1, 2, ...  None entries stay None."""
        if entries is None:
            return None
        out = []
        for entry in entries:
            if entry is None:
                out.append(None)
                continue
            ids, lps, rank = entry
            ranks = [rank] + list(range(1, len(ids)))
            d = {}
            for t, lp, r in zip(ids, lps, ranks):
                d.setdefault(t, Logprob(lp, r, self._token_text(t)))
            out.append(d)
        return out

    def _token_text(self, token_id: int) -> str | None:
        """One token as text, as vLLM shows it in logprobs."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.convert_tokens_to_string([self.tokenizer.convert_ids_to_tokens(token_id)])

    # -- step by step (what generate() does; the book drives the engine this way) ---------------------
    def add_request(self, prompt, sampling_params: SamplingParams | None = None) -> Sequence:
        """Validate one prompt and queue it; ``step()`` then advances it.  Returns its Sequence."""
        with self._exclusive("add_request()"):
            ids, _ = self._prompt_ids([prompt])
            params = self._params_list(sampling_params, 1)[0]
            self._check_fits(ids, [params])
            seq = self._make_seq(ids[0], params)
            self.scheduler.add(seq)
            return seq

    def step(self):
        """One engine step: schedule a batch, run the model, record the tokens.  Returns (batch, finished
        sequences); (None, []) when no request is left."""
        with self._exclusive("step()"):
            if not self.scheduler.has_unfinished():
                return None, []
            return self._step()

    def _step(self):
        """The plain step of the engine loop (nano-vllm's): schedule, run, postprocess."""
        batch = self.scheduler.schedule()
        if self.spec is not None:
            return self.spec.step(batch)
        tokens = self.runner.run(batch)
        return batch, self.scheduler.postprocess(batch, tokens)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_all(self) -> None:
        """Drop every queued and running request, releasing its KV blocks."""
        with self._exclusive("abort_all()"):
            self._abort_all()

    def _abort_all(self) -> None:
        if self.overlapped is not None:
            self.overlapped.reset()
        self.scheduler.abort_all()

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        """The engine loop: step until every request is done (overlapped steps where the runner allows)."""
        for seq in seqs:
            self.scheduler.add(seq)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(1 + len(s.children) for s in seqs), desc="Generating", unit="req", dynamic_ncols=True)
        prefill_tok = decode_tok = 0
        prefill_s = decode_s = 0.0
        self.step_log = []  # (is_prefill, tokens, sequences, seconds) per step of the last generate()
        step = self.overlapped.step if self.overlapped is not None else self._step
        try:
            while self.scheduler.has_unfinished():
                t = time.perf_counter()
                batch, finished = step()
                dt = time.perf_counter() - t
                if batch is not None:
                    prefill = batch.is_prefill and batch.draft_tokens is None  # (not a verify step)
                    self.step_log.append((prefill, sum(batch.num_new_tokens), len(batch.seqs), dt))
                    if prefill:
                        prefill_tok, prefill_s = prefill_tok + sum(batch.num_new_tokens), prefill_s + dt
                    else:
                        decode_tok, decode_s = decode_tok + len(batch.seqs), decode_s + dt
                if bar is not None:
                    bar.set_postfix_str(f"prefill {prefill_tok / max(prefill_s, 1e-9):,.0f} tok/s, "
                                        f"decode {decode_tok / max(decode_s, 1e-9):,.0f} tok/s", refresh=False)
                    bar.update(len(finished))
            if self.overlapped is not None:  # every sequence of the last launched step had already stopped
                self.overlapped.collect()
        finally:  # also on an error or Ctrl-C: the bar ends its line before anything else is printed
            if bar is not None:
                bar.close()

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True):
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of them.
        ``content`` is a str, or a list of ``{"type": "text", "text": str}`` parts (joined by newlines, as vLLM
        does for chat templates that take a string)."""
        return self.generate(self.chat_prompt_ids(messages, add_generation_prompt), sampling_params, use_tqdm)

    def chat_prompt_ids(self, messages, add_generation_prompt: bool = True) -> list[list[int]]:
        """The token ids the model's chat template makes of each conversation (what ``chat`` generates from)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no tokenizer with a chat template; use generate()")
        from jinja2 import TemplateError

        conversations = chat_conversations(messages)
        add_generation_prompt = check_bool("add_generation_prompt", add_generation_prompt)
        prompts = []
        for i, conv in enumerate(conversations):
            try:
                text = self.tokenizer.apply_chat_template(conv, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            except TemplateError as e:  # the template's own checks (roles that must alternate, say)
                raise ValueError(f"conversation {i}: the chat template refused it: {e}") from e
            prompts.append(self.tokenizer(text, add_special_tokens=False).input_ids)
        return prompts

    # -- odds and ends -------------------------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        with self._exclusive("reset_prefix_cache()"):
            self.block_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        """Give back the engine's memory (weights, KV cache, CUDA graphs) at once and stop its tensor-parallel
        workers, if any; queued requests are dropped and later calls refused.  Idempotent.  Leaving a
        ``with LLM(...) as llm:`` block does this; so does dropping the last reference to the engine."""
        with self._exclusive("shutdown()", closed_ok=True):
            if self._closed:
                return
            self._closed = True
            self._abort_all()
            stop = getattr(self.runner, "shutdown", None)  # tensor-parallel: the workers, then rank 0's memory
            (stop or self.runner.close)()
            if self.spec is not None and self.spec.draft is not None:
                self.spec.draft.runner.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"LLM(model={self.model_dir.name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"kv_blocks={self.block_manager.num_blocks}x{self.config.kvcache_block_size})")



_gc_lock = threading.Lock()
_gc_users = 0  # engine loops running now, in any thread
_gc_saved: tuple[int, ...] = ()


@contextlib.contextmanager
def no_full_gc():
    """Put off Python's full garbage collections while engine loops run.  A full collection walks every
    object alive (torch, transformers, the model: millions of them) and stalls the host for tens of
    milliseconds, and with it the GPU; the young generations, where the loop's own short-lived objects
    are, are still collected.  Only the oldest generation's threshold changes, for as long as any loop
    runs (the first loop in saves the thresholds, the last one out restores them).

    Not ``gc.freeze()``: to leave an application's (or a library's) frozen objects alone it would have to
    ask ``gc.get_freeze_count()``, which counts the frozen objects one by one: ~60 ms per call on the GPU
    machine, where the compile stack has frozen millions of them."""
    global _gc_users, _gc_saved
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            if _gc_saved[0]:  # 0: the application turned automatic collection off; leave it so
                gc.set_threshold(_gc_saved[0], _gc_saved[1], 1 << 30)
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                gc.set_threshold(*_gc_saved)


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes in a model's cache (every layer)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def check_text(what: str, text: str) -> None:
    """Text must be valid Unicode to be tokenized: a lone surrogate (left by decoding bytes with
    ``errors="surrogateescape"``, say) is not, and the tokenizer would fail with an internal TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: it holds a lone surrogate {text[e.start]!r} at character "
                         f"{e.start}, which cannot be tokenized") from None


def chat_conversations(messages) -> list[list[dict]]:
    """``messages`` (one conversation, or a list of them) as a list of conversations whose messages each have
    a str ``role`` and a str ``content`` (text parts joined); a clear error naming the message otherwise."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError("messages must be a list of {'role', 'content'} dicts (one conversation) or a list of "
                        f"such lists, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs one message at least")
    single = isinstance(messages[0], dict)
    conversations = []
    for i, conv in enumerate([messages] if single else messages):
        name = "" if single else f"conversation {i}, "
        if not isinstance(conv, (list, tuple)):
            raise TypeError(f"conversation {i} must be a list of {{'role', 'content'}} dicts, "
                            f"got {type(conv).__name__}")
        if not conv:
            raise ValueError(f"conversation {i} is empty: a conversation needs one message at least")
        conversations.append([_chat_message(f"{name}message {j}", m) for j, m in enumerate(conv)])
    return conversations


def _chat_message(where: str, m) -> dict:
    if not isinstance(m, dict):
        raise TypeError(f"{where} must be a {{'role', 'content'}} dict, got {type(m).__name__}")
    for key in ("role", "content"):
        if key not in m:
            raise ValueError(f"{where} has no {key!r}: every message needs a 'role' and a 'content'")
    role, content = m["role"], m["content"]
    if not isinstance(role, str):
        raise TypeError(f"{where}: role must be a str ('system', 'user', 'assistant'), got {type(role).__name__}")
    check_text(f"{where}'s role", role)
    if isinstance(content, (list, tuple)):
        content = "\n".join(_text_part(f"{where}, content part {k}", part) for k, part in enumerate(content))
    elif not isinstance(content, str):
        raise TypeError(f"{where}: content must be a str or a list of {{'type': 'text', 'text': str}} parts, "
                        f"got {type(content).__name__}")
    check_text(f"{where}'s content", content)
    return {**m, "content": content}


def _text_part(where: str, part) -> str:
    if not isinstance(part, dict):
        raise TypeError(f"{where} must be a {{'type': 'text', 'text': str}} dict, got {type(part).__name__}")
    if part.get("type") != "text":
        raise ValueError(f"{where} has type {part.get('type')!r}: only text parts ({{'type': 'text', 'text': "
                         "str}) are supported")
    if "text" not in part:
        raise ValueError(f"{where} has no 'text'")
    if not isinstance(part["text"], str):
        raise TypeError(f"{where}: text must be a str, got {type(part['text']).__name__}")
    return part["text"]

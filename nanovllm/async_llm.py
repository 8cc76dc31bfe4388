"""One engine loop, any number of callers: what a server needs.

``LLM.generate`` runs the engine loop in the caller's thread until its own prompts are done.  A server has
requests arriving at any time from many clients, each wanting its tokens as they come.  ``AsyncLLM`` runs
the loop in one background thread and takes requests from any thread or asyncio task:

    engine = AsyncLLM()                                  # or AsyncLLM(llm=LLM(...))
    async for delta in engine.generate("Hello", SamplingParams(max_tokens=8)):
        print(delta.text, end="")                        # the new text of each token, as it comes

    stream = engine.add_request("Hello", params)         # from plain threads: iterate it (blocking)
    for delta in stream: ...
    stream.output                                        # the final RequestOutput, as generate() gives

The loop (``_loop``): take the requests and aborts that arrived (``_inbox``), run one engine step (the
overlapped one where the runner allows), then hand each request's new tokens to its stream.  With nothing
to do it sleeps on a condition until a request arrives.  Each step holds the engine's lock
(``LLM._exclusive``), so a direct ``llm.generate(...)`` from another thread still works: it runs between
two of the loop's steps (and, since it steps until the engine is idle, finishes the loop's requests too).

Streaming text: each completion has an ``IncrementalDetokenizer`` (``detokenizer.py``), so a piece never
holds half a character, and the pieces add up to ``RequestOutput.text``.  Where a request has stop strings,
the last ``len(longest stop string) - 1`` characters are held back until the request ends, so no piece of a
stop string is ever sent (the final text is cut before it).  Abort (``abort``, ``stream.abort()``, or an
async consumer that goes away) ends the request at once: its blocks are released before the next step,
its finish reason is "abort".

A failed step ends every request in flight with the error (each stream raises it), releases their blocks,
and the loop goes on serving.  ``shutdown()`` (or leaving ``with AsyncLLM(...)``) stops the loop and gives the
engine's memory back; an AsyncLLM simply dropped is freed too (the loop holds it only weakly while idle).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from nanovllm.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

_END = object()  # the stream's last item
IDLE_WAIT_S = 0.5  # an idle loop looks every this often whether its AsyncLLM is still wanted


def _run_loop(ref: weakref.ref) -> None:
    """The engine thread: turns of ``AsyncLLM._iteration`` until it stops or the AsyncLLM is gone (dropped
    without ``shutdown()``: its engine is then freed like any dropped ``LLM``)."""
    while True:
        engine = ref()
        if engine is None or not engine._iteration():
            return
        del engine


@dataclass(slots=True)
class Delta:
    """What one step added to one completion of a request."""

    index: int  # which completion (0 unless n > 1)
    text: str  # the new text (may be "" while a character is incomplete, or held back before a stop string)
    token_ids: list[int]  # the new tokens
    finish_reason: str | None = None  # set on the completion's last delta: "stop", "length" or "abort"
    logprobs: list[dict] | None = None  # per new token, {token id: Logprob} (when the request asked for them)


class RequestStream:
    """The deltas of one request, in order; iterate it (``for`` in a thread, ``async for`` in the event loop
    it was made for).  ``output`` is the final ``RequestOutput`` once it has ended."""

    def __init__(self, engine: AsyncLLM, request_id: str, seqs: list[Sequence], prompt: str | None,
                 loop: asyncio.AbstractEventLoop | None):
        self.engine, self.request_id, self.seqs, self.prompt = engine, request_id, seqs, prompt
        self.output: RequestOutput | None = None
        self.error: BaseException | None = None
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self._loop = loop
        self._items: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self.engine.abort(self.request_id)

    # -- the engine thread's side ------------------------------------------------------------------------
    def _put(self, item) -> bool:
        """Hand an item to the consumer; False if its event loop is gone (the consumer with it)."""
        if self._loop is None:
            self._items.put(item)
            return True
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
            return True
        except RuntimeError:  # the event loop was closed
            return False

    # -- the consumer's side -----------------------------------------------------------------------------
    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this stream was made for an event loop: iterate it with `async for`")
        while True:
            item = self._items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self._loop is None:
            raise TypeError("this stream was made without an event loop: iterate it with `for`")
        while True:
            item = await self._items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class _Completion:
    """The streaming state of one completion (one sequence) of a request."""

    seq: Sequence
    detok: IncrementalDetokenizer | None
    sent_tokens: int = 0
    sent_text: str = ""
    done: bool = False
    last_token_time: float | None = None


@dataclass
class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) of seconds."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
        self.total += seconds
        self.count += 1


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    """What ``/metrics`` reports, kept by the engine thread."""

    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)


class AsyncLLM:
    """An ``LLM`` driven by one background loop; see the module's docstring."""

    def __init__(self, model=None, *, llm=None, **engine_args):
        from nanovllm.llm import LLM

        if llm is not None and (model is not None or engine_args):
            raise ValueError("pass either llm=LLM(...) or the model and engine arguments, not both")
        self.llm = llm if llm is not None else (LLM(model, **engine_args) if model is not None else LLM(**engine_args))
        self.metrics = Metrics()
        self._ids = itertools.count()
        self._inbox: deque = deque()  # ("add", stream) or ("abort", request_id), from any thread
        self._wake = threading.Condition()
        self._streams: dict[str, RequestStream] = {}  # live requests by id (the engine thread's)
        self._pending_ids: set[str] = set()  # ids submitted and not yet ended (any thread, under _wake)
        self._completions: dict[str, list[_Completion]] = {}
        self._stopping = False
        # the thread holds the engine only through a weak reference between iterations: an AsyncLLM that is
        # dropped without shutdown() is freed (its engine's memory with it), and its loop ends
        self._thread = threading.Thread(target=_run_loop, args=(weakref.ref(self),), name="nanovllm-engine-loop",
                                        daemon=True)
        self._thread.start()

    # -- callers (any thread) --------------------------------------------------------------------------
    def add_request(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                    loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Validate the request in the caller's thread (errors are raised here, nothing is queued), then
        queue it for the loop.  ``loop``: the event loop whose tasks will iterate the stream (``generate``
        passes its own); None for a blocking stream."""
        llm = self.llm
        ids, texts = llm._prompt_ids([prompt])
        params = llm._params_list(sampling_params, 1)[0]
        llm._check_fits(ids, [params])
        seq = llm._make_seq(ids[0], params)
        seqs = [seq, *seq.children]  # n > 1: the other completions, queued by the scheduler after the prompt
        with self._wake:
            if self._stopping:
                raise RuntimeError("this AsyncLLM has been shut down")
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
            elif request_id in self._pending_ids:
                raise ValueError(f"request_id {request_id!r} is already in use by a request in flight")
            stream = RequestStream(self, request_id, seqs, texts[0], loop)
            self._pending_ids.add(request_id)
            self._inbox.append(("add", stream))
            self._wake.notify()
        return stream

    async def generate(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None):
        """Stream one request's deltas (an async generator).  If the consumer stops early (a client that
        disconnected, a cancelled task), the request is aborted and its blocks released."""
        stream = self.add_request(prompt, sampling_params, request_id, loop=asyncio.get_running_loop())
        try:
            async for delta in stream:
                yield delta
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """End a request now (finish reason "abort"); its blocks are released before the loop's next step.
        Unknown or finished ids are ignored."""
        with self._wake:
            self._inbox.append(("abort", request_id))
            self._wake.notify()

    @property
    def running(self) -> bool:
        """Whether the loop takes requests (not stopped, its thread alive)."""
        return not self._stopping and self._thread.is_alive()

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) sequences in the scheduler now."""
        sched = self.llm.scheduler
        return len(sched.running), len(sched.waiting)

    def kv_cache_usage(self) -> float:
        bm = self.llm.block_manager
        return 1.0 - bm.num_free_blocks / bm.num_blocks

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop and keep the engine: requests in flight end with finish reason "abort" (their streams
        end cleanly), later requests are refused; ``self.llm`` stays usable (``llm.generate`` etc.).
        Idempotent."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """``stop()``, then shut the engine itself down (its memory given back).  Idempotent."""
        self.stop(timeout)
        self.llm.shutdown()

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the engine thread -----------------------------------------------------------------------------
    def _iteration(self) -> bool:
        """One turn of the loop: wait (at most ``IDLE_WAIT_S``) for work, take what arrived, step once,
        publish.  Returns False once the loop has stopped."""
        from nanovllm.llm import no_full_gc

        llm = self.llm
        with self._wake:
            if not self._inbox and not self._streams and not self._stopping:
                self._wake.wait(IDLE_WAIT_S)
            work, stopping = list(self._inbox), self._stopping
            self._inbox.clear()
            if not work and not self._streams and not stopping:
                return True  # idle: let go of the engine for a moment (see _run_loop)
        try:
            with llm._exclusive("the AsyncLLM loop"), no_full_gc():
                for kind, item in work:
                    self._add(item) if kind == "add" else self._abort(item)
                if stopping:
                    for request_id in list(self._streams):
                        self._abort(request_id)
                    if llm.overlapped is not None:
                        llm.overlapped.collect()  # the step in flight, if any: nothing left running
                elif llm.scheduler.has_unfinished():
                    self._step()
                self._publish()
        except Exception as e:  # a failed step: every request in flight ends with the error
            self._fail_all(e)
        return not stopping

    def _add(self, stream: RequestStream) -> None:
        tok = self.llm.tokenizer
        self._streams[stream.request_id] = stream
        self._completions[stream.request_id] = [
            _Completion(seq, IncrementalDetokenizer(tok, seq.prompt_token_ids) if tok is not None else None)
            for seq in stream.seqs]
        self.llm.scheduler.add(stream.seqs[0])

    def _abort(self, request_id: str) -> None:
        """(A token of it still in flight in an overlapped step is dropped when it arrives.)"""
        stream = self._streams.get(request_id)
        if stream is not None:
            self.llm.scheduler.abort(stream.seqs[0])  # (its other completions with it)

    def _step(self) -> None:
        llm = self.llm
        if llm.overlapped is not None:
            llm.overlapped.step()
            if not llm.scheduler.has_unfinished():
                llm.overlapped.collect()  # the last launched step: its sequences had all stopped already
        else:
            llm._step()

    def _publish(self) -> None:
        """Hand every request its new tokens; end the requests whose completions are all done."""
        now = time.perf_counter()
        for request_id, stream in list(self._streams.items()):
            completions = self._completions[request_id]
            ok = True
            for i, c in enumerate(completions):
                if c.done:
                    continue
                seq = c.seq
                tokens = seq.token_ids[seq.num_prompt_tokens + c.sent_tokens:]  # (only the new ones copied)
                finished = seq.is_finished
                if not tokens and not finished:
                    continue
                self._time_tokens(stream, c, len(tokens), now)
                logprobs = None
                if seq.logprobs is not None:
                    logprobs = self.llm._logprob_dicts(seq.logprobs[c.sent_tokens:c.sent_tokens + len(tokens)])
                c.sent_tokens += len(tokens)
                text = self._new_text(stream, c, i, tokens, finished)
                delta = Delta(i, text, tokens, seq.finish_reason if finished else None, logprobs)
                c.done = finished
                ok = stream._put(delta) and ok
            if all(c.done for c in completions):
                self._end(stream, completions)
            elif not ok:  # the consumer's event loop is gone
                self._abort(request_id)

    def _time_tokens(self, stream: RequestStream, c: _Completion, n: int, now: float) -> None:
        if not n:
            return
        m = self.metrics
        m.generation_tokens += n
        if stream.first_token_time is None:
            stream.first_token_time = now
            m.ttft.observe(now - stream.arrival)
        elif c.last_token_time is not None:
            gap = (now - c.last_token_time) / n
            for _ in range(n):
                m.itl.observe(gap)
        c.last_token_time = now

    def _new_text(self, stream: RequestStream, c: _Completion, index: int, tokens: list[int], finished: bool) -> str:
        if c.detok is None:
            return ""
        c.detok.add(tokens)
        if finished:  # the final text is the engine's (cut before a stop string); send what is left of it
            final = self.llm._completion(index, c.seq).text
            new = final[len(c.sent_text):] if final.startswith(c.sent_text) else ""
        else:
            stops = c.seq.params.stop
            hold = max(map(len, stops)) - 1 if stops else 0
            ready = c.detok.text[:max(0, len(c.detok.text) - hold)]  # (shorter than the hold: nothing yet)
            new = ready[len(c.sent_text):]
        c.sent_text += new
        return new

    def _end(self, stream: RequestStream, completions: list[_Completion]) -> None:
        llm, m = self.llm, self.metrics
        seqs = [c.seq for c in completions]
        stream.output = llm.output(seqs[0], stream.prompt)
        first = seqs[0]
        m.prompt_tokens += first.num_prompt_tokens
        m.cached_prompt_tokens += first.num_cached_tokens
        for seq in seqs:
            m.requests_finished[seq.finish_reason] = m.requests_finished.get(seq.finish_reason, 0) + 1
        self._retire(stream)
        stream._done = True
        stream._put(_END)

    def _retire(self, stream: RequestStream) -> None:
        del self._streams[stream.request_id]
        del self._completions[stream.request_id]
        with self._wake:
            self._pending_ids.discard(stream.request_id)

    def _fail_all(self, error: Exception) -> None:
        self.llm._abort_all()
        for stream in list(self._streams.values()):
            self._retire(stream)
            stream.error = error
            stream._done = True
            stream._put(error)

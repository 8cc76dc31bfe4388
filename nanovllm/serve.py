"""``python -m nanovllm.serve [MODEL]``: an OpenAI-compatible HTTP server (the embedded SmolLM2 when no model).

    python -m nanovllm.serve --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 8}'

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")
    client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[...], stream=True)

Endpoints: ``/v1/completions`` and ``/v1/chat/completions`` (the model's chat template), each streamed as
server-sent events with ``"stream": true`` (a last chunk with the token counts when
``"stream_options": {"include_usage": true}``, then ``data: [DONE]``); ``/v1/models``; ``/health``;
``/metrics`` (Prometheus text: running and waiting requests, KV-cache use, prefix-cache hit rate, token
counters, time-to-first-token and inter-token-latency histograms).

Every request becomes one request of an ``AsyncLLM`` (``async_llm.py``): one engine loop batches all
clients.  Bad requests (malformed JSON, an unknown model, a prompt too long, bad sampling values, ``n`` too
large) get a 400 with an OpenAI-style error body and the server goes on.  A client that disconnects
mid-stream has its request aborted, its KV blocks released at once.  Stopping the server (Ctrl-C) ends the
requests in flight with finish reason "abort" (their streams close properly), then gives the engine's
memory back.

Built on Starlette and uvicorn (``pip install 'nanovllm[serve]'``); imported only by this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import fields

from nanovllm.async_llm import AsyncLLM, Histogram
from nanovllm.sampling_params import SamplingParams

PROG = "python -m nanovllm.serve"
#: OpenAI / vLLM request fields that map one to one onto SamplingParams fields of the same name
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "n",
                   "include_stop_str_in_output")


class APIError(Exception):
    """An error the client caused (or the server's state): an HTTP status and an OpenAI-style body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self):
        from starlette.responses import JSONResponse

        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- requests -> engine requests ---------------------------------------------------------------------------------
def sampling_params(body: dict, default_max_tokens: int, chat: bool) -> SamplingParams:
    """The request's SamplingParams; a field this engine does not know is refused, not ignored."""
    known = {f.name for f in fields(SamplingParams)}
    kwargs = {}
    for name in SAMPLING_FIELDS:
        if body.get(name) is not None:
            if name not in known:
                raise APIError(f"{name!r} is not supported by this server", param=name)
            kwargs[name] = body[name]
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    kwargs["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    logprobs = body.get("top_logprobs") if chat and body.get("logprobs") else (None if chat else body.get("logprobs"))
    if chat and body.get("logprobs") and logprobs is None:
        logprobs = 0  # the chosen token's logprob only
    if logprobs is not None:
        if "logprobs" not in known:
            raise APIError("'logprobs' is not supported by this server", param="logprobs")
        kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        raise APIError(str(e), param=_param_named(str(e), kwargs)) from None


def _param_named(message: str, kwargs: dict) -> str | None:
    return next((name for name in kwargs if message.startswith(name) or f" {name}" in message), None)


def completion_prompts(body: dict) -> list:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError("'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) for p in prompt):
            return list(prompt)
    raise APIError("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                   param="prompt")


def completion_logprobs(entries: list[dict] | None, k: int) -> dict | None:
    """``/v1/completions``' logprobs object (the legacy format) from per-token {token id: Logprob} dicts, the
    chosen token first."""
    if entries is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for d in entries:
        chosen = next(iter(d.values()))
        text = chosen.decoded_token or ""
        out["tokens"].append(text)
        out["token_logprobs"].append(chosen.logprob)
        out["top_logprobs"].append({lp.decoded_token or "": lp.logprob for lp in d.values() if lp.rank <= k})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries: list[dict] | None, k: int) -> dict | None:
    """``/v1/chat/completions``' logprobs object: per token its text, logprob, bytes and the top ``k``."""
    if entries is None:
        return None

    def item(lp):
        text = lp.decoded_token or ""
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

    return {"content": [{**item(next(iter(d.values()))),
                         "top_logprobs": [item(lp) for lp in d.values() if lp.rank <= k]} for d in entries]}


class Server:
    """The routes, around one ``AsyncLLM``."""

    def __init__(self, engine: AsyncLLM, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.created = int(time.time())

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ], lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        yield
        self.engine.shutdown()  # the server is stopping: end what is in flight, give the memory back

    # -- simple routes -------------------------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        alive = self.engine.running
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "nanovllm",
            "max_model_len": self.engine.llm.config.max_model_len}]})

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(prometheus_text(self.engine), media_type="text/plain; version=0.0.4")

    # -- generation ----------------------------------------------------------------------------------------
    async def completions(self, request):
        return await self._handle(request, chat=False)

    async def chat_completions(self, request):
        return await self._handle(request, chat=True)

    async def _handle(self, request, chat: bool):
        try:
            body = await self._body(request)
            prompts = self._chat_prompts(body) if chat else completion_prompts(body)
            if body.get("echo"):
                raise APIError("'echo' is not supported by this server", param="echo")
            llm = self.engine.llm
            ids = self._prompt_ids(prompts)
            longest = max(map(len, ids))
            default_max = max(1, llm.config.max_model_len - longest) if chat else 16
            params = sampling_params(body, default_max, chat)
            n = getattr(params, "n", 1)
            if n > llm.config.max_num_seqs:
                raise APIError(f"n={n} is more than this server runs at once (max_num_seqs="
                               f"{llm.config.max_num_seqs})", param="n")
            streams = self._submit(ids, params, asyncio.get_running_loop())
        except APIError as e:
            return e.response()
        except RuntimeError as e:  # the engine has been shut down
            return APIError(str(e), status=503, kind="server_error").response()
        reply = Reply(self, chat, body, ids, streams, params)
        if body.get("stream"):
            from starlette.responses import StreamingResponse

            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        from starlette.responses import JSONResponse

        try:
            return JSONResponse(await reply.whole())
        except APIError as e:
            return e.response()

    async def _body(self, request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def _chat_prompts(self, body: dict) -> list:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError("'messages' must be a non-empty list of {'role', 'content'} objects", param="messages")
        try:
            return self.engine.llm.chat_prompt_ids(messages)
        except (TypeError, ValueError) as e:
            raise APIError(str(e), param="messages") from None

    def _prompt_ids(self, prompts: list) -> list[list[int]]:
        try:
            ids, _ = self.engine.llm._prompt_ids(prompts)
        except (TypeError, ValueError) as e:
            raise APIError(str(e), param="prompt") from None
        return ids

    def _submit(self, ids: list[list[int]], params: SamplingParams, loop) -> list:
        streams = []
        try:
            for prompt in ids:
                streams.append(self.engine.add_request(prompt, params, loop=loop))
        except (TypeError, ValueError) as e:
            for s in streams:
                s.abort()
            raise APIError(str(e), param="prompt") from None
        return streams


class Reply:
    """One API request's answer: the engine requests (one per prompt, each with ``n`` completions), as
    one JSON object or as a stream of server-sent events."""

    def __init__(self, server: Server, chat: bool, body: dict, ids: list[list[int]], streams: list,
                 params: SamplingParams):
        self.server, self.chat, self.ids, self.streams, self.n = server, chat, ids, streams, params.n
        self.top = params.logprobs or 0  # alternatives per token, where logprobs were asked for
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        options = body.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(map(len, self.ids))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def abort_all(self) -> None:
        for s in self.streams:
            if not s.finished:
                s.abort()

    async def whole(self) -> dict:
        try:
            for s in self.streams:
                async for _ in s:
                    pass
        except Exception as e:  # a failed engine step
            raise APIError(f"generation failed: {e}", status=500, kind="server_error") from None
        finally:
            self.abort_all()  # (only if this task was cancelled midway)
        choices, produced = [], 0
        for p, s in enumerate(self.streams):
            for out in s.output.outputs:
                produced += len(out.token_ids)
                index = p * self.n + out.index
                choice = {"index": index, "logprobs": self.logprobs(out.logprobs), "finish_reason": out.finish_reason,
                          "stop_reason": out.stop_reason}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": out.text}
                else:
                    choice["text"] = out.text
                choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.server.model_name,
                "choices": choices, "usage": self.usage(produced)}

    def logprobs(self, entries):
        return (chat_logprobs if self.chat else completion_logprobs)(entries, self.top)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
               "created": self.created, "model": self.server.model_name, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events(self):
        """The server-sent events: one chunk per delta (per completion), the usage chunk if asked for, then
        ``[DONE]``.  If the client goes away, the task running this is cancelled: the requests are aborted."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, stream):
            try:
                async for delta in stream:
                    await queue.put((p, delta))
            except Exception as e:  # noqa: BLE001  (a failed step: reported in the stream)
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(self.streams)]
        produced, running = 0, len(tasks)
        try:
            if self.chat:  # the role first, for every choice
                yield self.chunk([{"index": p * self.n + j, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}
                                  for p in range(len(self.streams)) for j in range(self.n)])
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    err = {"message": f"generation failed: {item}", "type": "server_error", "code": 500}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                p, delta = item
                produced += len(delta.token_ids)
                index = p * self.n + delta.index
                choice = {"index": index, "logprobs": self.logprobs(delta.logprobs),
                          "finish_reason": delta.finish_reason}
                if self.chat:
                    choice["delta"] = {"content": delta.text} if delta.text else {}
                else:
                    choice["text"] = delta.text
                yield self.chunk([choice])  # one per step, also while a character is incomplete ("")
            if self.include_usage:
                yield self.chunk([], self.usage(produced))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            self.abort_all()


# -- /metrics ----------------------------------------------------------------------------------------------------
def prometheus_text(engine: AsyncLLM) -> str:
    m = engine.metrics
    running, waiting = engine.num_requests()
    hit = m.cached_prompt_tokens / m.prompt_tokens if m.prompt_tokens else 0.0
    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP nanovllm_{name} {help_text}", f"# TYPE nanovllm_{name} {kind}"])
        for labels, value in samples:
            lines.append(f"nanovllm_{name}{labels} {value}")

    metric("num_requests_running", "gauge", "Sequences running in the engine.", [("", running)])
    metric("num_requests_waiting", "gauge", "Sequences waiting for the engine.", [("", waiting)])
    metric("kv_cache_usage_perc", "gauge", "Share of the KV-cache blocks in use (0-1).",
           [("", f"{engine.kv_cache_usage():.6f}")])
    metric("prefix_cache_hit_rate", "gauge", "Share of finished requests' prompt tokens found in the prefix "
           "cache (0-1).", [("", f"{hit:.6f}")])
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", m.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
    metric("request_success_total", "counter", "Finished requests (completions), by finish reason.",
           [(f'{{finished_reason="{r}"}}', c) for r, c in sorted(m.requests_finished.items())] or [("", 0)])
    for name, hist, what in (("time_to_first_token_seconds", m.ttft, "Time to the first token of a request."),
                             ("inter_token_latency_seconds", m.itl, "Time between two tokens of a request.")):
        metric(name, "histogram", what, histogram_samples(hist))
    return "\n".join(lines) + "\n"


def histogram_samples(h: Histogram) -> list[tuple[str, object]]:
    samples = [(f'_bucket{{le="{bound}"}}', count) for bound, count in zip(h.buckets, h.counts)]
    return samples + [('_bucket{le="+Inf"}', h.count), ("_sum", f"{h.total:.6f}"), ("_count", h.count)]


# -- the command -------------------------------------------------------------------------------------------------
def parser():
    import argparse

    from nanovllm.__main__ import Parser, positive_int
    from nanovllm.config import DEFAULT_MODEL, add_engine_args

    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"a model folder, .gguf file or hub id (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    add_engine_args(p, aliases={"tensor_parallel_size": ["--tp"], "kvcache_block_size": ["--block-size"]})
    return p


def build_server(args) -> tuple[Server, object]:
    """(the Server, the uvicorn.Server that runs it) for parsed ``args``."""
    import uvicorn

    from nanovllm.config import engine_kwargs

    engine = AsyncLLM(args.model, **engine_kwargs(args))
    server = Server(engine, args.served_model_name or str(args.model))

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C: end the requests in flight first, so their streams close
            engine.shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(server.app(), host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=10)
    return server, Uvicorn(config)


def main(argv=None) -> None:
    from nanovllm.__main__ import check_engine_args, exit_interrupted, resolve_model_or_exit

    p = parser()
    args = p.parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        p.error("the server needs Starlette and uvicorn: pip install 'nanovllm[serve]'")
    check_engine_args(p, args)
    resolve_model_or_exit(p, args.model)
    try:
        t = time.perf_counter()
        server, runner = build_server(args)
        print(f"{PROG}: {server.model_name} ready in {time.perf_counter() - t:.1f} s "
              f"({server.engine.llm!r}); http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        runner.run()
    except KeyboardInterrupt:
        exit_interrupted(PROG)


if __name__ == "__main__":
    main()

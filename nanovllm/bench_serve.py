"""The online benchmark: ``python -m nanovllm.bench --workload serve``.

A server runs (nanovllm's in this process, uvicorn in a thread on a free port; or ``transformers serve`` as a
subprocess), and an asyncio client (httpx) sends it ``--num-requests`` streaming requests with Poisson
arrivals at each ``--request-rate`` R req/s: the gaps between two sends are exponential with mean 1/R, drawn
from a seeded RNG (``arrival_times``); ``inf`` sends them all at once.  One result per rate.

Prompts (``--prompt-kind``): ``random``, fresh random token ids of ``--prompt-len`` lengths for each rate, to
``/v1/completions`` (as token ids; as their decoded text to a server that takes only text; random weights get
a word-level tokenizer, ``add_word_tokenizer``, so that text is the same ids); ``chat``, the
chat workload's questions to ``/v1/chat/completions``.  Every request is greedy, asks for its
``--output-len`` tokens and ignores EOS, so each engine produces the same number of tokens.

Per request: TTFT = the first chunk that carries output minus the send time; ITL = the gaps between its
successive output chunks (nanovllm sends one chunk per engine step, so one per token); the output tokens are
counted from the usage chunk (``stream_options.include_usage``) and checked.  Throughput = output tokens /
(the last response's end - the first send).  Before the first rate, two short warm-up requests; between
rates nanovllm's prefix cache is emptied.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from nanovllm.bench import CHAT_QUESTIONS, Result, Workload, device_name, latency_stats


def arrival_times(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """When each request is sent, in seconds after the first: a Poisson process of ``rate`` requests per
    second (exponential gaps, mean 1/rate, from ``random.Random(seed)``); all at 0 when ``rate`` is inf."""
    if math.isinf(rate):
        return [0.0] * num_requests
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def serve_workload(num_requests=8, prompt_len=(32, 32), output_len=(8, 8), rates=(4.0, math.inf),
                   prompt_kind="random", model=None, random_weights=False) -> Workload:
    """Per rate, its requests (prompt, output tokens) and their send times.  Random prompts are drawn anew
    for each rate (no rate finds another's prompts in a cache); the chat questions are the same for each."""
    rounds = []
    for i, rate in enumerate(rates):
        rng = random.Random(i)
        reqs = []
        for j in range(num_requests):
            if prompt_kind == "chat":
                prompt = CHAT_QUESTIONS[j % len(CHAT_QUESTIONS)]
            else:
                prompt = [rng.randint(0, 10000) for _ in range(rng.randint(*prompt_len))]
            reqs.append((prompt, rng.randint(*output_len)))
        rounds.append((rate, reqs, arrival_times(num_requests, rate, seed=i)))
    _, first, _ = rounds[0]
    return Workload("serve", [p for p, _ in first], [n for _, n in first], 0.0, model, random_weights,
                    rounds=rounds, prompt_kind=prompt_kind)


@dataclass
class Timing:
    """One request as the client saw it."""

    sent: float
    token_times: list[float] = field(default_factory=list)  # each chunk that carried output
    end: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0


def serve_result(engine: str, rate: float, timings: list[Timing], expected_tokens: int, device: str, note: str,
                 prompt_kind: str) -> Result:
    produced = sum(t.completion_tokens for t in timings)
    if produced != expected_tokens:
        raise RuntimeError(f"{engine} server produced {produced} tokens at {rate} req/s, expected {expected_tokens}")
    missing = sum(not t.token_times for t in timings)
    if missing:
        raise RuntimeError(f"{engine} server: {missing} request(s) streamed no output chunk")
    ttft = [(t.token_times[0] - t.sent) * 1e3 for t in timings]
    itl = [(b - a) * 1e3 for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    seconds = max(t.end for t in timings) - min(t.sent for t in timings)
    return Result(engine, "serve", len(timings), produced, seconds, device, note, request_rate=rate,
                  prompt_kind=prompt_kind, prompt_tokens=sum(t.prompt_tokens for t in timings),
                  **latency_stats(ttft, itl))


# -- the client ----------------------------------------------------------------------------------------------------
def request_body(kind: str, model: str, prompt, max_tokens: int, text_only: bool, tokenizer=None) -> tuple[str, dict]:
    """(path, JSON body) of one streaming request: greedy, EOS ignored.  ``text_only``: a server that takes
    neither token-id prompts nor ``ignore_eos`` (``transformers serve``): the ids decoded to text, and
    ``generation_config`` to keep EOS from ending the answer early (no EOS token, and ``min_new_tokens``)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if text_only:
        # its continuous batching takes a request's eos_token_id (-1: none, so EOS ends nothing) but drops
        # min_new_tokens (its per-request processors are only temperature, top-k and top-p); one-at-a-time
        # generate honours min_new_tokens
        body["generation_config"] = json.dumps({"eos_token_id": -1, "min_new_tokens": max_tokens})
    else:
        body["ignore_eos"] = True
    if kind == "chat":
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", body | {"prompt": tokenizer.decode(prompt) if text_only else prompt}


async def send(client, url: str, body: dict, at: float) -> Timing:
    """Send one request at ``at`` (a perf_counter time) and time its stream's chunks."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    timing = Timing(time.perf_counter())
    chunks, usage = [], None  # chunks: (arrival time, carries text, finish reason)
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url} answered {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            now, data = time.perf_counter(), line[6:]
            if data.strip() == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{url} streamed an error: {obj['error']}")
            usage = obj.get("usage") or usage
            for choice in obj.get("choices") or []:
                delta = choice.get("delta", {})
                if "role" in delta:  # the chat stream's first chunk: no output yet
                    continue
                text = choice.get("text") if "text" in choice else delta.get("content")
                chunks.append((now, bool(text), choice.get("finish_reason")))
    timing.end = time.perf_counter()
    if usage is None:
        raise RuntimeError(f"{url} sent no usage chunk")
    timing.completion_tokens, timing.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    # A chunk carries output if it has text or is not the last (nanovllm sends one per step, "" while a
    # character is incomplete or with no tokenizer); the last, empty one only if the tokens need it (nanovllm
    # puts the last token in it, transformers sends an empty one after its last token).
    for t, has_text, finish in chunks:
        if has_text or finish is None or len(timing.token_times) < timing.completion_tokens:
            timing.token_times.append(t)
    return timing


async def run_round(base_url: str, requests: list[tuple[str, dict]], arrivals: list[float]) -> list[Timing]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        return await asyncio.gather(*(send(client, path, body, start + at)
                                      for (path, body), at in zip(requests, arrivals)))


def drive(engine: str, base_url: str, model: str, w: Workload, device: str, note: str, text_only: bool,
          tokenizer=None, between_rates=None) -> list[Result]:
    """The warm-up, then each rate's requests; one Result per rate."""
    def bodies(reqs):
        return [request_body(w.prompt_kind, model, p, n, text_only, tokenizer) for p, n in reqs]

    _, first, _ = w.rounds[0]
    asyncio.run(run_round(base_url, bodies([(p, min(n, 4)) for p, n in first[:2]]), [0.0, 0.0]))
    results = []
    for rate, reqs, arrivals in w.rounds:
        if between_rates is not None:
            between_rates()
        timings = asyncio.run(run_round(base_url, bodies(reqs), arrivals))
        r = serve_result(engine, rate, timings, sum(n for _, n in reqs), device, note, w.prompt_kind)
        print(r.line(), flush=True)
        results.append(r)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- nanovllm's server ---------------------------------------------------------------------------------------------
def run_nanovllm(w: Workload, folder, device: str, args) -> list[Result]:
    """``nanovllm.serve``'s app around an ``AsyncLLM`` built from the engine flags, served by uvicorn in a
    thread of this process, stopped (and the engine shut down) at the end whatever happened."""
    import uvicorn

    from nanovllm.async_llm import AsyncLLM
    from nanovllm.config import engine_kwargs
    from nanovllm.serve import Server

    t = time.perf_counter()
    engine_args = {**engine_kwargs(args), "device": device, "load_format": "dummy" if w.random_weights else "auto"}
    engine = AsyncLLM(folder, **engine_args)
    name, port = "bench", free_port()
    server = uvicorn.Server(uvicorn.Config(Server(engine, name).app(), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="nanovllm-bench-server", daemon=True)
    try:
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the nanovllm server did not start")
            time.sleep(0.02)
        print(f"nanovllm: server ready in {time.perf_counter() - t:.1f} s ({engine.llm!r})", file=sys.stderr)
        note = f"nanovllm.serve, backend={engine.llm.runner.backend.name}"
        return drive("nanovllm", f"http://127.0.0.1:{port}", name, w, device_name(engine.llm.device), note,
                     text_only=False, between_rates=engine.llm.reset_prefix_cache)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()  # (the app's lifespan did it already, unless the server never started)


# -- transformers serve --------------------------------------------------------------------------------------------
def hf_serve_command(folder, port: int, device: str, cache_blocks: int | None = None) -> list[str]:
    """``transformers serve`` on ``folder`` with continuous batching (paged attention; without it, it runs one
    ``generate`` per request, one after another): float32 on a CPU; bfloat16 and CUDA graphs on a GPU.
    ``cache_blocks``: its KV cache's size in blocks (``--cb-num-blocks``); left out, it zero-fills 90% of the
    free memory for its cache at start-up, a minute and more on a CPU, where it takes the machine's RAM."""
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--device", device, "--log-level", "info", "--continuous-batching"]
    if cache_blocks is not None:
        cmd += ["--cb-num-blocks", str(cache_blocks)]
    if device.startswith("cuda"):
        return cmd + ["--dtype", "bfloat16", "--cb-use-cuda-graph"]
    return cmd + ["--dtype", "float32"]


def hf_cache_blocks(w: Workload, tokenizer) -> int | None:
    """Blocks enough for every request of the workload's largest round at once (each its prompt and output,
    rounded up to whole blocks), as the installed ``transformers serve`` counts them; None where it takes no
    ``--cb-num-blocks`` (older versions: it sizes its cache itself)."""
    import inspect

    from transformers.generation import ContinuousBatchingConfig

    try:
        from transformers.cli.serve import Serve
    except ImportError:
        return None
    if "cb_num_blocks" not in inspect.signature(Serve.__init__).parameters:
        return None
    config = ContinuousBatchingConfig()
    page = getattr(config, "page_size", None) or getattr(config, "block_size", None) or 256

    def prompt_len(prompt) -> int:
        if isinstance(prompt, str):  # a chat question: its tokens with the template around it
            return len(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                     add_generation_prompt=True))
        return len(prompt) + 8  # token ids sent as text may re-encode a little differently

    rounds = w.rounds or [(None, list(zip(w.prompts, w.max_tokens)), None)]
    need = max(sum(-(-(prompt_len(p) + n) // page) for p, n in reqs) for _, reqs, _ in rounds)
    return need + 2  # (and a little room)


def run_hf(w: Workload, folder, device: str, args) -> list[Result]:
    """``transformers serve`` as a subprocess on a free port, driven by the same client; killed at the end."""
    from pathlib import Path

    from transformers import AutoTokenizer

    if w.random_weights:
        folder = random_checkpoint(folder, device)
    elif not any(Path(folder).glob("*.safetensors")):
        raise RuntimeError(f"transformers serve loads a safetensors checkpoint; {folder} has none")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}  # a local folder: no network
    t = time.perf_counter()
    log = tempfile.TemporaryFile("w+")  # (a pipe nobody reads would fill and stop the server)
    blocks = hf_cache_blocks(w, tokenizer)
    proc = subprocess.Popen(hf_serve_command(folder, port, device, blocks), env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        model = wait_for_server(proc, log, base, timeout=600.0, model=str(folder))
        print(f"hf: transformers serve ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        import transformers

        note = (f"transformers {transformers.__version__} serve, continuous batching"
                + (", CUDA graphs" if device.startswith("cuda") else ""))
        if w.prompt_kind == "random":
            note += ", prompts as decoded text"
        return drive("hf", base, model, w, device_name(device), note, text_only=True, tokenizer=tokenizer)
    finally:
        stop(proc)
        log.close()


def random_checkpoint(folder, device: str):
    """transformers serve loads weights from a folder: random ones (the model built from the config) saved in
    ``folder/hf-random``, with the folder's config and tokenizer."""
    import shutil
    from pathlib import Path

    import torch

    from nanovllm.bench import free, load_hf_model

    out = Path(folder) / "hf-random"
    if not out.is_dir():
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = load_hf_model(folder, True, device, dtype)
        model.save_pretrained(out)
        del model
        free(device)
        for f in Path(folder).iterdir():
            if f.is_file() and f.name.startswith("tokenizer"):
                shutil.copy(f, out / f.name)
    return out


def add_word_tokenizer(folder, vocab_size: int) -> None:
    """A tokenizer for random weights (a config-only folder has none): token i is the word ``t<i>``, words are
    split at spaces.  A prompt of random ids decodes to text that encodes to the same ids (for a server that
    takes only text), and every output token streams as its own piece of text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


def wait_for_server(proc, log, base_url: str, timeout: float, every: float = 30.0, model: str | None = None) -> str:
    """Poll ``/v1/models`` until the server answers; returns the model's id.  Where ``/v1/models`` lists no model
    or fails while ``/health`` answers, ``model`` is the id: ``transformers serve`` lists the hub's cache, so on a
    machine without one it answers 500 (version 5.17) or an empty list, and serves its folder all the same.
    Every ``every`` seconds it says on stderr how long it has waited and the server's last line; a server that
    exits first, or does not answer within ``timeout`` seconds, fails with its last lines."""
    import httpx

    def last_lines(n: int) -> list[str]:
        # pread: the server writes through the same open file, so moving its offset would misplace its output
        fd = log.fileno()
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
        return [line for line in text.splitlines() if line.strip()][-n:]

    start = time.time()
    told = start
    while time.time() < start + timeout:
        if proc.poll() is not None:
            lines = last_lines(5)
            raise RuntimeError(f"transformers serve exited with status {proc.returncode}: "
                               + (" | ".join(lines) if lines else "(no output)"))
        try:
            reply = httpx.get(base_url + "/v1/models", timeout=5.0)
            models = reply.json()["data"] if reply.status_code == 200 else []
            if models:
                return models[0]["id"]
            # up, but no model listed (a hub cache without it) or the list failed: /health decides
            if model is not None and httpx.get(base_url + "/health", timeout=5.0).status_code == 200:
                return model
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.time() - told >= every:
            told = time.time()
            lines = last_lines(1)
            print(f"hf: waiting for transformers serve, {told - start:.0f} s; its last line: "
                  f"{lines[0] if lines else '(none yet)'}", file=sys.stderr, flush=True)
        time.sleep(0.5)
    lines = last_lines(5)
    raise RuntimeError(f"transformers serve did not answer within {timeout:.0f} s; its last lines: "
                       + (" | ".join(lines) if lines else "(no output)"))


def stop(proc) -> None:
    """End the server subprocess (and anything it started: it leads its own session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


ENGINES = {"nanovllm": run_nanovllm, "hf": run_hf}

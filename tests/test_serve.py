"""The OpenAI-compatible server, end to end on the CPU: a real uvicorn server on a free port, driven by the
official ``openai`` client and by raw HTTP.  Streamed and non-streamed replies equal ``LLM.generate``/``chat``
for the same seed; 64 streaming clients at once; a client that disconnects frees its blocks; bad requests
get OpenAI-style 400s and the server stays up; stopping with requests in flight ends them cleanly."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.async_llm import AsyncLLM  # noqa: E402
from nanovllm.serve import Server  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite colour is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in a background thread."""

    def __init__(self, engine: AsyncLLM, name: str = MODEL):
        self.engine, self.port = engine, free_port()
        self.server = uvicorn.Server(uvicorn.Config(Server(engine, name).app(), host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "the server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def llm():
    engine = LLM(device="cpu", dtype="float32", max_num_seqs=64, max_model_len=512)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    engine = AsyncLLM(llm=llm)
    running = Running(engine)
    yield running
    running.stop()  # the lifespan's end shuts the engine down
    assert not engine._thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def idle(llm, timeout=30.0) -> bool:
    """Every KV block free again (the loop releases an aborted request's blocks before its next step)."""
    bm = llm.block_manager
    end = time.time() + timeout
    while time.time() < end:
        if bm.num_free_blocks == bm.num_blocks and not llm.scheduler.has_unfinished():
            return True
        time.sleep(0.05)
    return False


def sse_events(response) -> list:
    """The JSON events of a server-sent-event stream, and "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0.8, seed=7)])
def test_completion_equals_generate(server, client, llm, params):
    want = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, **params), use_tqdm=False)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=12, **params)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in want]
    assert [c.finish_reason for c in got.choices] == [w.finish_reason for w in want]
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    # streamed, through the openai client: the pieces add up to the same text
    pieces = {}
    last = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=12, stream=True, **params):
        for c in chunk.choices:
            pieces[c.index] = pieces.get(c.index, "") + c.text
            if c.finish_reason:
                last[c.index] = c.finish_reason
    assert [pieces[i] for i in range(2)] == [w.text for w in want]
    assert [last[i] for i in range(2)] == [w.finish_reason for w in want]


def test_raw_http_stream_with_usage(server, llm):
    want = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want.token_ids)
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_chat_equals_llm_chat(server, client, llm):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == want.finish_reason
    text, roles = "", []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                stream=True):
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        text += delta.content or ""
    assert roles == ["assistant"] and text == want.text


def test_64_streaming_clients_at_once(server, llm):
    prompts = [f"{PROMPTS[i % 4]} (client {i})" for i in range(64)]
    want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    got, errors = {}, []

    def one(i):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 8, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
                events = sse_events(r)
            assert events[-1] == "[DONE]"
            got[i] = "".join(e["choices"][0]["text"] for e in events[:-1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[0]
    assert [got[i] for i in range(64)] == [w.text for w in want]
    assert idle(llm)


def test_a_client_that_disconnects_frees_its_blocks(server, llm):
    body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived: now hang up
        assert llm.block_manager.num_free_blocks < llm.block_manager.num_blocks
    assert idle(llm), "the disconnected client's request still holds blocks"
    assert llm.scheduler.running == [] and server.engine._streams == {}


@pytest.mark.parametrize("body, fragment, param", [
    (b"{not json", "not valid JSON", None),
    (b"[1, 2]", "JSON object", None),
    ({"model": "gpt-4", "prompt": "hi"}, "does not exist", "model"),
    ({"model": MODEL}, "'prompt' is required", "prompt"),
    ({"model": MODEL, "prompt": "word " * 600}, "max_model_len", "prompt"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature", "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "n": 1_000_000}, "n", "n"),
    ({"model": MODEL, "prompt": [1, 2, 10 ** 9]}, "vocabulary", "prompt"),
    ({"model": MODEL, "prompt": "hi", "echo": True}, "echo", "echo"),
])
def test_bad_requests_get_400(server, body, fragment, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_bad_chat_requests_and_the_openai_client_errors(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user"}]})
    assert r.status_code == 400 and "content" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="hi", top_p=2.0)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "prompt_tokens_total", "generation_tokens_total"):
        assert f"nanovllm_{name}" in values, name
    assert values["nanovllm_generation_tokens_total"] >= 4
    assert values["nanovllm_time_to_first_token_seconds_count"] >= 1
    assert values['nanovllm_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["nanovllm_time_to_first_token_seconds_count"]
    assert "# TYPE nanovllm_inter_token_latency_seconds histogram" in text


def test_stopping_with_requests_in_flight(tiny_qwen3):
    path, _ = tiny_qwen3
    engine = AsyncLLM(path, device="cpu", dtype="float32")
    run = engine.llm.runner.run
    engine.llm.runner.run = lambda *a, **kw: time.sleep(0.02) or run(*a, **kw)  # a slower model: still running
    running = Running(engine, name="tiny")
    events, started = [], threading.Event()

    def one():
        body = {"prompt": [1, 2, 3], "max_tokens": 100000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    data = line[len("data: "):]
                    events.append(data if data == "[DONE]" else json.loads(data))

    t = threading.Thread(target=one)
    t.start()
    assert started.wait(60)
    engine.shutdown()  # what Ctrl-C does first (nanovllm.serve's handle_exit)
    t.join(30)
    assert not t.is_alive()
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort"
    r = httpx.post(running.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert r.status_code == 503 and "shut down" in r.json()["error"]["message"]
    running.stop()


def test_the_command(tmp_path):
    """``python -m nanovllm.serve``: a bad flag is one line and exit 2; the server answers, and Ctrl-C
    (SIGINT) stops it cleanly: the requests in flight are ended, no traceback."""
    import os
    import signal
    import subprocess
    import sys

    from test_cli import terminal_sigint  # Ctrl-C handled as under a terminal, however the test run was started

    bad = subprocess.run([sys.executable, "-m", "nanovllm.serve", "--port", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--port" in bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanovllm.serve", "--port", str(port), "--device", "cpu",
                             "--max-num-seqs", "4", "--max-model-len", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=terminal_sigint if os.name == "posix" else None)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (0, 130), out  # 130: uvicorn passes the SIGINT on after its graceful stop
    assert "ready in" in out and "Traceback" not in out


def test_n_logprobs_and_stop_through_the_api(server, client, llm):
    params = dict(temperature=0.9, seed=5, n=2, max_tokens=8)
    want = llm.generate([PROMPTS[1]], SamplingParams(**params), use_tqdm=False)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], **params)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [o.text for o in want.outputs]
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[1], stream=True, **params):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(2)] == [o.text for o in want.outputs]

    want = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, logprobs=2), use_tqdm=False)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    chosen = [next(iter(d.values())) for d in want.outputs[0].logprobs]
    assert lp.token_logprobs == pytest.approx([c.logprob for c in chosen])
    assert lp.tokens == [c.decoded_token for c in chosen] and all(len(t) == 2 for t in lp.top_logprobs)
    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content

    text = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].text
    stop = text.split()[2]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].finish_reason == "stop" and stop not in got.choices[0].text
    assert text.startswith(got.choices[0].text)

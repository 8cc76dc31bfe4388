"""``python -m nanovllm.bench --workload serve``: Poisson send times drawn reproducibly from the seed; the
client's reading of a stream (which chunks carry output, the usage chunk's counts); the serve workload end to
end on the embedded model at two rates (every request's tokens, TTFT and ITL, the JSON rows' new fields);
bad rates are one-line errors with exit 2; transformers serve driven by the same client (slow)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import statistics

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from nanovllm import bench, bench_serve  # noqa: E402


def test_arrival_times_are_poisson_and_reproducible():
    times = bench_serve.arrival_times(2000, 4.0, seed=3)
    assert times == bench_serve.arrival_times(2000, 4.0, seed=3)  # the seed decides them
    assert times != bench_serve.arrival_times(2000, 4.0, seed=4)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / 4.0, rel=0.1)  # exponential, mean 1/rate
    assert statistics.stdev(gaps) == pytest.approx(1 / 4.0, rel=0.15)  # (an exponential's sd is its mean)
    twice = bench_serve.arrival_times(2000, 8.0, seed=3)  # the same draws, at twice the rate: half the times
    assert twice == pytest.approx([t / 2 for t in times])
    assert bench_serve.arrival_times(5, math.inf) == [0.0] * 5


def test_serve_workload_draws_fresh_prompts_per_rate():
    w = bench_serve.serve_workload(3, (5, 9), (2, 4), (2.0, math.inf))
    assert [rate for rate, _, _ in w.rounds] == [2.0, math.inf]
    (_, first, at), (_, second, at_inf) = w.rounds
    assert len(first) == len(second) == 3 and all(5 <= len(p) <= 9 and 2 <= n <= 4 for p, n in first + second)
    assert [p for p, _ in first] != [p for p, _ in second]  # no rate finds another's prompts in a cache
    assert at == bench_serve.arrival_times(3, 2.0, seed=0) and at_inf == [0.0] * 3
    assert w == bench_serve.serve_workload(3, (5, 9), (2, 4), (2.0, math.inf))
    chat = bench_serve.serve_workload(2, output_len=(5, 5), prompt_kind="chat")
    assert [p for p, _ in chat.rounds[0][1]] == bench.CHAT_QUESTIONS[:2] and chat.output_tokens == 10


def sse(*objs) -> bytes:
    return b"".join(f"data: {json.dumps(o)}\n\n".encode() for o in objs) + b"data: [DONE]\n\n"


def read(stream: bytes):
    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=stream))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await bench_serve.send(client, "/v1/completions", {}, 0.0)

    return asyncio.run(go())


def test_which_chunks_carry_output():
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    # nanovllm: one chunk per step, "" while a character is incomplete, the last token in the last chunk
    t = read(sse({"choices": [{"text": "a", "finish_reason": None}]},
                 {"choices": [{"text": "", "finish_reason": None}]},
                 {"choices": [{"text": "", "finish_reason": "length"}]}, usage))
    assert (len(t.token_times), t.completion_tokens, t.prompt_tokens) == (3, 3, 7) and t.sent <= t.token_times[0]
    # transformers serve (chat): a role chunk first, an empty chunk with the finish reason after the last token
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    t = read(sse(role, *[{"choices": [{"delta": {"content": c}}]} for c in "abc"],
                 {"choices": [{"delta": {}, "finish_reason": "length"}]}, usage))
    assert len(t.token_times) == 3 and t.end >= t.token_times[-1]
    with pytest.raises(RuntimeError, match="no usage chunk"):
        read(sse({"choices": [{"text": "a", "finish_reason": "length"}]}))


@pytest.fixture
def nothing_loads(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("something was loaded before the arguments were checked")

    for name in bench_serve.ENGINES:
        monkeypatch.setitem(bench_serve.ENGINES, name, no_loading)
    monkeypatch.setattr(bench, "model_folder", no_loading)


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "0"], "argument --request-rate: must be a positive number of requests per second or inf, "
                              "got '0'"),
    (["--request-rate", "4", "-1"], "argument --request-rate: must be a positive number"),
    (["--request-rate", "fast"], "argument --request-rate: must be a positive number of requests per second or "
                                 "inf, got 'fast'"),
    (["--request-rate", "nan"], "got 'nan'"),
    (["--request-rate"], "argument --request-rate: expected at least one argument"),
    (["--request-rate", "4", "4.0"], "--request-rate names a rate twice"),
    (["--prompt-kind", "poems"], "argument --prompt-kind: invalid choice: 'poems'"),
    (["--engine", "vllm"], "the serve workload runs nanovllm and hf, not vllm"),
])
def test_bad_serve_flags_are_one_line_and_exit_2(argv, message, capsys, nothing_loads):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--workload", "serve", "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m nanovllm.bench: error: "), err
    assert message in err


@pytest.mark.parametrize("argv", [["--request-rate", "4"], ["--prompt-kind", "chat"]])
def test_serve_flags_need_the_serve_workload(argv, capsys, nothing_loads):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--workload", "latency", *argv])
    assert exit_info.value.code == 2
    assert f"{argv[0]} is for the serve workload" in capsys.readouterr().err


def test_parsed_rates_and_defaults():
    args = bench.parser().parse_args(["--request-rate", "0.5", "16", "inf"])
    assert args.request_rate == [0.5, 16.0, math.inf]
    gpu, cpu = bench.DEFAULTS["serve"]["request_rate"]
    assert gpu == (4.0, 16.0, 64.0, math.inf) and cpu == (4.0, math.inf)
    assert bench.DEFAULTS["serve"]["num_requests"] == (200, 8)


def test_serve_workload_end_to_end(tmp_path, capsys):
    """nanovllm's server on the embedded model at 8 req/s and all at once: each rate's requests all streamed
    their tokens (EOS ignored), TTFT and ITL measured, the JSON rows carry the rate and the request
    throughput."""
    out_file = tmp_path / "serve.jsonl"
    results = bench.main(["--workload", "serve", "--device", "cpu", "--num-requests", "4", "--request-rate", "8",
                          "inf", "--prompt-len", "16", "16", "--output-len", "4", "4", "--json", str(out_file)])
    assert [(r.engine, r.workload, r.request_rate, r.requests, r.output_tokens, r.prompt_tokens)
            for r in results] == [("nanovllm", "serve", 8.0, 4, 16, 64), ("nanovllm", "serve", math.inf, 4, 16, 64)]
    last_send = bench_serve.arrival_times(4, 8.0, seed=0)[-1]
    assert results[0].seconds > last_send  # the requests were spread over the Poisson send times
    for r in results:
        assert r.prompt_kind == "random"
        assert 0 < r.ttft_ms_median <= r.ttft_ms_p99 and r.ttft_ms_mean > 0
        assert 0 < r.itl_ms_median <= r.itl_ms_p99 and r.itl_ms_mean > 0
        assert r.seconds * 1e3 > r.ttft_ms_median
    out = capsys.readouterr().out
    assert " nanovllm  serve random, 8 req/s: 4 requests, 16 output tokens in " in out
    assert " nanovllm  serve random, inf req/s: 4 requests" in out and "req/s; TTFT median" in out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [row["request_rate"] for row in rows] == [8.0, "inf"]  # (JSON has no infinity)
    for row in rows:
        assert row["workload"] == "serve" and row["prompt_kind"] == "random" and row["output_tokens"] == 16
        assert row["req_per_s"] > 0 and row["tok_per_s"] > 0 and row["itl_ms_p99"] >= row["itl_ms_median"] > 0
        assert "batch_size" not in row


def test_print_ratios_per_rate(capsys):
    def r(engine, rate, tok_s):
        return bench.Result(engine, "serve", 4, int(tok_s), 1.0, "test", ttft_ms_median=10.0, itl_ms_median=2.0,
                            request_rate=rate, prompt_kind="random")

    bench.print_ratios([r("nanovllm", 4.0, 200), r("nanovllm", math.inf, 400), r("hf", 4.0, 100),
                        r("hf", math.inf, 100)])
    assert capsys.readouterr().out.splitlines() == [
        "nanovllm / hf at 4 req/s: 2.00x the throughput, 1.00x the median TTFT, 1.00x the median ITL",
        "nanovllm / hf at inf req/s: 4.00x the throughput, 1.00x the median TTFT, 1.00x the median ITL"]


def test_hf_serve_command():
    cpu = bench_serve.hf_serve_command("/m", 1234, "cpu")
    assert cpu[-12:] == ["/m", "--host", "127.0.0.1", "--port", "1234", "--device", "cpu", "--log-level", "info",
                         "--continuous-batching", "--dtype", "float32"]
    assert bench_serve.hf_serve_command("/m", 1, "cuda")[-3:] == ["--dtype", "bfloat16", "--cb-use-cuda-graph"]
    assert "--cb-num-blocks" not in cpu
    sized = bench_serve.hf_serve_command("/m", 1234, "cpu", cache_blocks=7)
    assert sized[sized.index("--cb-num-blocks") + 1] == "7"


def test_waiting_for_a_server_reports_its_last_lines(capsys):
    """A server that never answers: progress on stderr with its last line, then an error naming its last lines;
    one that exits: its status and last lines."""
    import subprocess
    import sys
    import tempfile

    port = bench_serve.free_port()  # nothing listens there
    code = "import sys, time; print('loading weights', flush=True); print('compiling', flush=True); time.sleep(30)"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            last = r"did not answer within 3 s; its last lines: loading weights \| compiling"
            with pytest.raises(RuntimeError, match=last):
                bench_serve.wait_for_server(proc, log, f"http://127.0.0.1:{port}", timeout=3.0, every=1.0)
        finally:
            proc.kill()
            proc.wait()
    assert re.search(r"hf: waiting for transformers serve, \d+ s; its last line: compiling", capsys.readouterr().err)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-c", "print('CUDA out of memory'); raise SystemExit(3)"],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.wait()
        with pytest.raises(RuntimeError, match="exited with status 3: CUDA out of memory"):
            bench_serve.wait_for_server(proc, log, f"http://127.0.0.1:{port}", timeout=30.0)


def test_waiting_for_a_server_whose_model_list_fails():
    """A server that is up (/health answers) but fails /v1/models with a 500 (transformers serve without a hub
    cache, seen on the GPU machine): the id we launched it with; without one, it is not taken as ready."""
    import subprocess
    import sys
    import tempfile

    port = bench_serve.free_port()
    code = f"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 500)
        self.end_headers()
        self.wfile.write(b'{{"status": "ok"}}' if self.path == "/health" else b"Internal Server Error")
    def log_message(self, *a):
        print(self.requestline, flush=True)
http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
"""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            assert bench_serve.wait_for_server(proc, log, base, timeout=30.0, model="/ckpt") == "/ckpt"
            with pytest.raises(RuntimeError, match="did not answer within 2 s; its last lines: .*GET /v1/models"):
                bench_serve.wait_for_server(proc, log, base, timeout=2.0)
        finally:
            proc.kill()
            proc.wait()


def test_hf_cache_blocks_fit_the_largest_round():
    """transformers serve's cache is sized for the workload (else it zero-fills 90% of the free memory at
    start-up): every request of the largest round, each rounded up to whole pages, plus two."""
    pytest.importorskip("transformers.cli.serve")
    from transformers.generation import ContinuousBatchingConfig

    page = ContinuousBatchingConfig().page_size
    # round 1: prompts of 3 pages + 1 token and of 1 token (+8 for re-encoding, + outputs); round 2: one short one
    small = [(list(range(3 * page - 8 + 1)), 4), ([1], 4)]
    rounds = [(4.0, small, [0.0, 0.1]), (8.0, [([1, 2], 4)], [0.0])]
    w = bench.Workload("serve", [], [], 0.0, "m", True, rounds=rounds, prompt_kind="random")
    assert bench_serve.hf_cache_blocks(w, tokenizer=None) == (4 + 1) + 2


@pytest.mark.slow
def test_transformers_serve_on_the_embedded_model(monkeypatch):
    """``transformers serve`` (a subprocess, continuous batching) driven by the same client, chat prompts, EOS
    ignored through generation_config (8 answers of 16 tokens: with EOS honoured, one of them ends early); the
    subprocess is gone afterwards."""
    pytest.importorskip("fastapi")
    procs, stop = [], bench_serve.stop
    monkeypatch.setattr(bench_serve, "stop", lambda proc: (procs.append(proc), stop(proc)))
    results = bench.main(["--workload", "serve", "--device", "cpu", "--engine", "hf", "--prompt-kind", "chat",
                          "--num-requests", "8", "--request-rate", "inf", "--output-len", "16", "16"])
    (r,) = results
    assert (r.engine, r.requests, r.output_tokens, r.prompt_kind) == ("hf", 8, 128, "chat")
    assert r.ttft_ms_median > 0 and r.itl_ms_median > 0 and "transformers" in r.note
    assert len(procs) == 1 and procs[0].poll() is not None

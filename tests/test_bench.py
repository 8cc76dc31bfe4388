"""``python -m nanovllm.bench``: user errors are one line and exit 2 before anything is loaded; a failed engine
is reported, skipped by the ratio lines and makes the exit status 1; each engine is shut down and freed before
the next; Ctrl-C exits 130; the latency workload measures TTFT (the whole prefill) and ITL at batch 1."""

from __future__ import annotations

import json
import sys

import pytest
from test_cli import interrupt_when, start

from nanovllm import bench


def no_loading(*args, **kwargs):
    raise AssertionError("something was loaded before the arguments were checked")


@pytest.fixture
def nothing_loads(monkeypatch):
    for name in bench.ENGINES:
        monkeypatch.setitem(bench.ENGINES, name, no_loading)
    monkeypatch.setattr(bench, "model_folder", no_loading)
    monkeypatch.setattr("nanovllm.llm.LLM", no_loading)


@pytest.mark.parametrize("argv, message", [
    (["--num-requests", "-3"], "argument --num-requests: must be a positive integer, got -3"),
    (["--num-requests", "0"], "argument --num-requests: must be a positive integer, got 0"),
    (["--prompt-len", "9", "3"], "--prompt-len MIN MAX: MIN 9 is above MAX 3"),
    (["--output-len", "0", "3"], "argument --output-len: must be a positive integer, got 0"),
    (["--warmup-requests", "-1"], "argument --warmup-requests: must be 0 or a positive integer"),
    (["--engine", "nanovllm,sglang"], "unknown engine 'sglang'"),
    (["--engine", "hf,hf"], "names an engine twice"),
    (["--workload", "latency", "--engine", "vllm"], "the latency workload runs nanovllm and hf, not vllm"),
    (["--tp", "0"], "tensor_parallel_size must be >= 1, got 0"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "float8"], "unknown dtype='float8'"),
    (["--model", "/no/such/model"], "model '/no/such/model': no such file or folder"),
])
def test_user_errors_are_one_line_and_exit_2_before_loading(argv, message, capsys, nothing_loads):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m nanovllm.bench: error: "), err
    assert message in err


def fake_result(engine, tok_per_s):
    return lambda w, folder, device, args: bench.Result(engine, w.name, 2, 100, 100 / tok_per_s, "test")


def test_a_failed_engine_is_reported_skipped_and_exits_1(monkeypatch, capsys, tmp_path):
    freed = []

    def out_of_memory(w, folder, device, args):
        raise RuntimeError("CUDA out of memory\n(the allocator's details)")

    monkeypatch.setitem(bench.ENGINES, "nanovllm", fake_result("nanovllm", 200.0))
    monkeypatch.setitem(bench.ENGINES, "hf", out_of_memory)
    monkeypatch.setitem(bench.ENGINES, "vllm", fake_result("vllm", 100.0))
    monkeypatch.setattr(bench, "free", lambda device: freed.append(device))
    out_file = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--num-requests", "2", "--engine", "nanovllm,hf,vllm", "--json", str(out_file)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "       hf  FAILED: RuntimeError: CUDA out of memory" in lines
    ratios = [line for line in lines if " / " in line]
    assert ratios == ["nanovllm / vllm: 2.00x"]  # nothing against the failed engine
    assert "1 of 3 engine(s) failed: hf" in captured.err
    assert freed == ["cpu"] * 3  # after each engine, the failed one too
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["engine"] for r in rows] == ["nanovllm", "vllm"] and "ttft_ms_median" not in rows[0]


def test_every_engine_failed(monkeypatch, capsys):
    def broken(w, folder, device, args):
        raise ValueError("no")

    for name in bench.ENGINES:
        monkeypatch.setitem(bench.ENGINES, name, broken)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--num-requests", "2", "--engine", "nanovllm,hf"])
    assert exit_info.value.code == 1
    assert "2 of 2 engine(s) failed: nanovllm, hf" in capsys.readouterr().err


def test_nanovllm_is_shut_down_when_its_run_fails(monkeypatch, capsys):
    """(shutdown() frees the runner's memory: tests/test_memory.py)"""
    events = []

    class FakeLLM:
        def __init__(self, model, **kwargs):
            pass

        def shutdown(self):
            events.append("shutdown")

    def fails(llm, w, args):
        raise KeyboardInterrupt

    monkeypatch.setattr("nanovllm.LLM", FakeLLM)
    monkeypatch.setattr(bench, "nanovllm_throughput", fails)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--num-requests", "2", "--engine", "nanovllm"])
    assert exit_info.value.code == 130
    assert events == ["shutdown"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == "python -m nanovllm.bench: interrupted"


def test_percentiles_and_latency_result():
    assert bench.percentile([5.0, 1.0, 3.0], 50) == 3.0 and bench.percentile([5.0, 1.0, 3.0], 99) == 5.0
    assert bench.percentile(list(range(1, 201)), 99) == 198
    r = bench.latency_result("x", [(0.0, [0.010, 0.012, 0.015]), (1.0, [1.020, 1.021])], "cpu", "")
    assert r.requests == 2 and r.output_tokens == 5
    assert r.ttft_ms_median == pytest.approx(15.0) and r.ttft_ms_p99 == pytest.approx(20.0)
    assert sorted([r.itl_ms_median, r.itl_ms_p99]) == [pytest.approx(2.0), pytest.approx(3.0)]
    assert r.seconds == pytest.approx(0.015 + 0.021)
    one_token = bench.latency_result("x", [(0.0, [0.01])], "cpu", "")
    assert one_token.itl_ms_median is None and "ITL n/a" in one_token.line()


def test_latency_workload_on_the_embedded_model(monkeypatch, capsys, tmp_path):
    """Both engines on a CPU, two measured requests after one warm-up; every request's whole prompt is
    prefilled inside its TTFT (the prefix cache is emptied between requests)."""
    from nanovllm.engine.model_runner import ModelRunner

    prefills, run = [], ModelRunner.run

    def recording_run(self, batch, *args, **kwargs):
        if batch.is_prefill:
            prefills.append(sum(batch.num_new_tokens))
        return run(self, batch, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "run", recording_run)
    out_file = tmp_path / "latency.jsonl"
    results = bench.main(["--workload", "latency", "--engine", "nanovllm,hf", "--device", "cpu",
                          "--num-requests", "2", "--warmup-requests", "1", "--prompt-len", "24", "24",
                          "--output-len", "4", "4", "--json", str(out_file)])
    assert prefills == [24, 24, 24]  # the warm-up and both measured requests: nothing came from the cache
    assert [r.engine for r in results] == ["nanovllm", "hf"]
    for r in results:
        assert (r.workload, r.requests, r.output_tokens) == ("latency", 2, 8)
        assert 0 < r.ttft_ms_median <= r.ttft_ms_p99 and r.ttft_ms_mean > 0
        assert 0 < r.itl_ms_median <= r.itl_ms_p99 and r.itl_ms_mean > 0
        assert r.seconds * 1e3 >= 2 * r.ttft_ms_mean  # both requests' TTFTs are inside the measured time
    out = capsys.readouterr().out
    assert "nanovllm / hf: " in out and "the median TTFT" in out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [row["engine"] for row in rows] == ["nanovllm", "hf"]
    assert all(row["ttft_ms_p99"] >= row["ttft_ms_median"] > 0 for row in rows)


def test_latency_defaults_are_the_embedded_model_on_a_cpu():
    w = bench.latency_workload(*[bench.DEFAULTS["latency"][k][1]
                                 for k in ("num_requests", "prompt_len", "output_len", "warmup_requests")])
    assert len(w.prompts) == 4 and len(w.warmup) == 1 and w.output_tokens == 32
    assert bench.model_folder(w, None).name.startswith("SmolLM2-135M-Instruct")
    gpu = bench.latency_workload(random_weights=True)
    assert len(gpu.prompts) == 32 and all(len(p) == 256 for p in gpu.prompts) and gpu.output_tokens == 32 * 128


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_exits_130_with_one_line():
    proc = start(["-m", "nanovllm.bench", "--workload", "latency", "--device", "cpu", "--num-requests", "10000",
                  "--output-len", "8", "8"])
    out, err = interrupt_when(proc, "stderr", "nanovllm: engine ready")
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "python -m nanovllm.bench: interrupted"

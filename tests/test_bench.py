"""``python -m nanovllm.bench``: user errors are one line and exit 2 before anything is loaded; a failed engine
is reported, skipped by the ratio lines and makes the exit status 1; each engine is shut down and freed before
the next; Ctrl-C exits 130; the latency workload measures TTFT (the whole prefill) and ITL per batch size, and
nanovllm's whole generate() call at batch 1."""

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
    (["--workload", "latency", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--workload", "latency", "--batch-size", "1", "-4"], "argument --batch-size: must be a positive integer"),
    (["--workload", "latency", "--batch-size", "2.5"], "argument --batch-size: invalid int value: '2.5'"),
    (["--workload", "latency", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--workload", "latency", "--batch-size"], "argument --batch-size: expected at least one argument"),
    (["--workload", "latency", "--batch-size", "4", "4"], "--batch-size names a size twice: 4 4"),
    (["--workload", "latency", "--batch-size", "16", "--max-num-seqs", "8"],
     "--batch-size 16 is above --max-num-seqs 8"),
    (["--workload", "chat", "--batch-size", "4"], "--batch-size is for the latency workload"),
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


def test_batch_sizes_parse():
    assert bench.parser().parse_args(["--batch-size", "1", "16"]).batch_size == [1, 16]
    assert bench.parser().parse_args(["--batch-size", "4"]).batch_size == [4]
    assert bench.parser().parse_args([]).batch_size is None  # the workload's default: 1 16 on a GPU, 1 on a CPU
    assert bench.DEFAULTS["latency"]["batch_size"] == ((1, 16), (1,))


def test_latency_groups():
    """At batch B the measured requests are --num-requests rounded up to whole groups of B; the first requests
    are the same whatever the batch sizes, and each group's prompts differ (nothing to share in the cache)."""
    w = bench.latency_workload(5, (6, 6), (3, 3), 2, batch_sizes=(1, 4))
    warmup, measured = w.groups[4]
    assert [len(g) for g in measured] == [4, 4] and [len(g) for g in warmup] == [4, 4]
    assert [len(g) for g in w.groups[1][1]] == [1] * 5 and len(w.groups[1][0]) == 2
    assert [r for g in measured for r in g] == list(zip(w.prompts, w.max_tokens))
    alone = bench.latency_workload(5, (6, 6), (3, 3), 0)
    assert alone.prompts == w.prompts[:5] and alone.groups[1][0] == []
    assert all(len({tuple(p) for p, _ in g}) == len(g) for g in measured + warmup)


def test_ratios_compare_matching_batch_sizes(capsys):
    def r(engine, b, ttft):
        return bench.Result(engine, "latency", 2, 8, 1.0, "test", ttft_ms_median=ttft, itl_ms_median=1.0,
                            batch_size=b)

    bench.print_ratios([r("nanovllm", 1, 10.0), r("nanovllm", 16, 40.0), r("hf", 1, 20.0)])
    bench.print_ratios([r("nanovllm", 16, 40.0), r("hf", 1, 20.0)])  # nothing to compare
    assert capsys.readouterr().out.splitlines() == [
        "nanovllm / hf at batch 1: 0.50x the median TTFT, 1.00x the median ITL"]


def test_latency_workload_on_the_embedded_model(monkeypatch, capsys, tmp_path):
    """Both engines on a CPU at batch 1 and 4, one warm-up group each; every request's whole prompt is
    prefilled inside its TTFT (the prefix cache is emptied between groups); a group's requests share their
    start, and each has its own tokens (4 tokens: 3 gaps); at batch 1 nanovllm also times generate()."""
    from nanovllm.engine.model_runner import ModelRunner

    prefills, run = [], ModelRunner.run

    def recording_run(self, batch, *args, **kwargs):
        if batch.is_prefill:
            prefills.append((len(batch.seqs), sum(batch.num_new_tokens)))
        return run(self, batch, *args, **kwargs)

    timings, latency_result = {}, bench.latency_result

    def recording_result(engine, timing, device, note, batch_size=1):
        timings[engine, batch_size] = timing
        return latency_result(engine, timing, device, note, batch_size)

    monkeypatch.setattr(ModelRunner, "run", recording_run)
    monkeypatch.setattr(bench, "latency_result", recording_result)
    out_file = tmp_path / "latency.jsonl"
    results = bench.main(["--workload", "latency", "--engine", "nanovllm,hf", "--device", "cpu",
                          "--num-requests", "2", "--warmup-requests", "1", "--prompt-len", "24", "24",
                          "--output-len", "4", "4", "--batch-size", "1", "4", "--json", str(out_file)])
    # batch 1: the warm-up and both measured requests, then as many generate() calls; batch 4: two groups
    assert prefills == [(1, 24)] * 6 + [(4, 96)] * 2
    assert [(r.engine, r.batch_size, r.requests, r.output_tokens) for r in results] == [
        ("nanovllm", 1, 2, 8), ("nanovllm", 4, 4, 16), ("hf", 1, 2, 8), ("hf", 4, 4, 16)]
    for r in results:
        assert r.workload == "latency"
        assert 0 < r.ttft_ms_median <= r.ttft_ms_p99 and r.ttft_ms_mean > 0
        assert 0 < r.itl_ms_median <= r.itl_ms_p99 and r.itl_ms_mean > 0
        assert r.seconds * 1e3 >= r.ttft_ms_mean * r.requests / r.batch_size  # the TTFTs are inside the time
    for (_, b), timing in timings.items():
        assert len(timing) == (2 if b == 1 else 4) and all(len(times) == 4 for _, times in timing)
        assert len({start for start, _ in timing}) == (2 if b == 1 else 1)  # one start per group
        assert all(start < times[0] and times == sorted(times) for start, times in timing)
        if b == 4:  # one prefill step for the group: the same first token time, then one token a step
            assert len({times[0] for _, times in timing}) == 1
            assert sum(len(times) - 1 for _, times in timing) == 12  # ITL gaps
    nano1 = results[0]
    assert 0 < nano1.generate_ttft_ms_median <= nano1.generate_ttft_ms_p99
    assert all(r.generate_ttft_ms_median is None for r in results[1:])
    out = capsys.readouterr().out
    assert "nanovllm  latency, batch 1: 2 requests" in out and "generate() TTFT median" in out
    assert "       hf  latency, batch 4: 4 requests" in out
    assert "nanovllm / hf at batch 1: " in out and "nanovllm / hf at batch 4: " in out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(row["engine"], row["batch_size"]) for row in rows] == [("nanovllm", 1), ("nanovllm", 4), ("hf", 1),
                                                                    ("hf", 4)]
    assert all(row["ttft_ms_p99"] >= row["ttft_ms_median"] > 0 for row in rows)
    assert rows[0]["generate_ttft_ms_p99"] >= rows[0]["generate_ttft_ms_median"] > 0
    assert "generate_ttft_ms_median" not in rows[1]


def test_hf_latency_pads_prompts_of_different_lengths(monkeypatch):
    """A group of prompts of different lengths is one left-padded generate(); every request still counts its
    own tokens."""
    w = bench.latency_workload(3, (8, 20), (3, 3), 0, batch_sizes=(3,))
    assert len({len(p) for p in w.prompts}) > 1
    results = bench.run_hf_latency(w, bench.model_folder(w, None), "cpu", __import__("torch").float32)
    (r,) = results
    assert (r.batch_size, r.requests, r.output_tokens) == (3, 3, 9) and "left-padded" in r.note


def test_latency_defaults_are_the_embedded_model_on_a_cpu():
    w = bench.latency_workload(*[bench.DEFAULTS["latency"][k][1]
                                 for k in ("num_requests", "prompt_len", "output_len", "warmup_requests")])
    assert len(w.prompts) == 4 and len(w.warmup) == 1 and w.output_tokens == 32 and list(w.groups) == [1]
    assert bench.model_folder(w, None).name.startswith("SmolLM2-135M-Instruct")
    gpu = bench.latency_workload(random_weights=True, batch_sizes=bench.DEFAULTS["latency"]["batch_size"][0])
    assert len(gpu.prompts) == 32 and all(len(p) == 1000 for p in gpu.prompts) and gpu.output_tokens == 32 * 128
    assert [len(g) for g in gpu.groups[16][1]] == [16, 16] and len(gpu.groups[16][0]) == 3


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_exits_130_with_one_line():
    proc = start(["-m", "nanovllm.bench", "--workload", "latency", "--device", "cpu", "--num-requests", "10000",
                  "--output-len", "8", "8"])
    out, err = interrupt_when(proc, "stderr", "nanovllm: engine ready")
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "python -m nanovllm.bench: interrupted"

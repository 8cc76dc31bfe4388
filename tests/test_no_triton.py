"""nanovllm where Triton is not installed (macOS and Windows have no Triton wheels; a Linux install may lack
it): importing the package, a CPU engine and ``generate`` need no Triton, and the book's chapters that show
Triton kernels still run, printing a note where a kernel would launch.  Each check runs in a fresh
interpreter in which ``import triton`` fails, as it does where Triton is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
NO_TRITON = "import sys\nsys.modules['triton'] = None  # from here on `import triton` raises ImportError\n"


def run_without_triton(code: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false",  # this checkout's package:
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", NO_TRITON + code], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


# executes a notebook's code cells in order, as a kernel would (no IPython magics in our chapters)
RUN_NOTEBOOK = """
import json
cells = [c for c in json.load(open({path!r}))["cells"] if c["cell_type"] == "code"]
ns = {{"__name__": "__main__"}}
for i, cell in enumerate(cells):
    exec(compile("".join(cell["source"]), f"{{{path!r}}} cell {{i}}", "exec"), ns)
"""


def test_engine_imports_and_generates_without_triton():
    out = run_without_triton("""
import json
import nanovllm
from nanovllm import LLM, SamplingParams
from nanovllm.triton_utils import HAS_TRITON

llm = LLM(device="cpu", max_num_seqs=2, max_model_len=128, num_kvcache_blocks=16)  # the embedded SmolLM2
greedy = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
sampled = llm.generate(["Once upon a time,"] * 2, SamplingParams(temperature=0.8, max_tokens=4, seed=1),
                       use_tqdm=False)
try:
    LLM(device="cpu", attention_backend="triton", max_num_seqs=2, max_model_len=128, num_kvcache_blocks=16)
    asked_for_triton = "no error"
except ImportError as exc:
    asked_for_triton = str(exc)
print(json.dumps(dict(has_triton=HAS_TRITON, backend=llm.runner.backend.name, greedy=greedy[0].token_ids,
                      sampled=[o.token_ids for o in sampled], asked_for_triton=asked_for_triton)))
""")
    result = json.loads(out.splitlines()[-1])
    assert result["has_triton"] is False and result["backend"] == "torch"
    assert result["greedy"] == [7042, 30, 198]  # " Paris.\n": chapter 00's greedy tokens on a CPU
    first, second = result["sampled"]
    assert first == second and len(first) == 4  # seeded sampling works (and repeats) without the fused kernel
    assert "needs the `triton` package" in result["asked_for_triton"]  # asked for by name: a clear error


def test_chapter_08_runs_without_triton_and_its_kernels_explain_why_they_cannot_launch():
    path = CHAPTERS / "08_triton_kernels.ipynb"
    out = run_without_triton(RUN_NOTEBOOK.format(path=str(path)) + """
from nanovllm.triton_utils import NO_TRITON_NOTE

for launch in (lambda: ns["store_kv"](ns["k"], ns["v"], *ns["ours"], ns["slots"]),
               lambda: ns["paged_decode"](ns["q"], ns["k_cache"], ns["v_cache"], ns["block_tables"],
                                          ns["context_lens"], ns["scale"])):
    try:
        launch()
    except ImportError as exc:
        assert NO_TRITON_NOTE in str(exc), exc
    else:
        raise AssertionError("a kernel launched without Triton")
print("kernels refused to launch")
""", cwd=CHAPTERS)
    from nanovllm.triton_utils import NO_TRITON_NOTE

    assert "without Triton (kernels shown, not run)" in out
    assert out.count(NO_TRITON_NOTE) >= 8  # the import cell, and every cell that would launch a kernel
    assert "merged splits equal attention over all the keys" in out  # the plain-PyTorch checks still run
    assert out.rstrip().endswith("kernels refused to launch")


@pytest.mark.slow
def test_chapter_06_runs_without_triton():
    path = CHAPTERS / "06_sampling.ipynb"
    out = run_without_triton(RUN_NOTEBOOK.format(path=str(path)), cwd=CHAPTERS)
    from nanovllm.triton_utils import NO_TRITON_NOTE

    assert "seeded: the same tokens alone, in a batch of three, and alone again" in out
    assert out.count(NO_TRITON_NOTE) == 4  # the kernel cells: defined, then a note where they would run
    assert "Exercise 3: not attempted" in out  # the lab's check runs without Triton too

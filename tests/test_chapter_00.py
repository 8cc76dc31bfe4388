"""Chapter 00 (quickstart): the HF baseline it times against nanovllm computes the same greedy tokens; the package
map names every module of the package; and the chapters name only files and modules that exist."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
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

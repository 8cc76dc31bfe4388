"""nanovllm.viz: the pure render functions (snapshot -> SVG/HTML), the recorder, and the thin widget."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys

import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.viz import PALETTE, block_table_svg, describe, seq_color, snapshot, snapshot_html
from nanovllm.viz.block_table import CACHED_FILL, FREE_FILL

BLOCK_RECT = re.compile(r'<rect class="block ([^"]*)" data-block="(\d+)"[^>]*fill="([^"]+)"[^>]*stroke-width="(\d+)"')


def hand_built():
    """12 blocks of 4 slots: A (10 tokens) and B (11 tokens) share their first 8 tokens (2 blocks); C ran and
    finished, leaving one free but cached block; the rest is free and empty."""
    bm = BlockManager(12, 4, enable_prefix_caching=True)
    a = Sequence(0, list(range(10)))
    b = Sequence(1, list(range(8)) + [99, 98, 97])
    for s in (a, b):
        bm.allocate(s)
        s.num_computed_tokens = len(s)
        bm.register_computed(s)
    c = Sequence(2, [5] * 6)
    bm.allocate(c)
    c.num_computed_tokens = 6
    bm.register_computed(c)
    bm.deallocate(c)
    return bm, [a, b]


def blocks_of(svg: str) -> dict[int, tuple[str, str, int]]:
    return {int(bid): (kind, fill, int(sw)) for kind, bid, fill, sw in BLOCK_RECT.findall(svg)}


def test_snapshot_of_a_hand_built_block_manager():
    bm, seqs = hand_built()
    snap = snapshot(bm, seqs, step=3)
    assert snap["step"] == 3 and snap["block_size"] == 4
    assert [s["block_table"] for s in snap["seqs"]] == [[0, 1, 2], [0, 1, 3]]
    blocks = snap["blocks"]
    assert len(blocks) == 12
    assert blocks[0] == {"id": 0, "ref_count": 2, "owners": [0, 1], "cached": True, "free": False, "filled": 4}
    assert blocks[2]["owners"] == [0] and blocks[2]["filled"] == 2 and not blocks[2]["cached"]  # A's partial block
    assert blocks[3]["owners"] == [1] and blocks[3]["filled"] == 3
    assert blocks[4] == {"id": 4, "ref_count": 0, "owners": [], "cached": True, "free": True, "filled": 0}  # C's
    assert all(b["free"] and not b["cached"] and not b["owners"] for b in blocks[5:])
    assert snap["stats"]["hit_tokens"] == 8 and snap["stats"]["num_free_blocks"] == 8
    assert pickle.loads(pickle.dumps(snap)) == snap


def test_ref_counts_match_owners():
    bm, seqs = hand_built()
    for b in snapshot(bm, seqs)["blocks"]:
        assert b["ref_count"] == len(b["owners"])


def test_one_rect_per_block():
    bm, seqs = hand_built()
    svg = block_table_svg(snapshot(bm, seqs))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert sorted(blocks_of(svg)) == list(range(12))
    assert svg.count('<rect class="block ') == 12


def test_colours_shared_and_free_blocks():
    bm, seqs = hand_built()
    svg = block_table_svg(snapshot(bm, seqs))
    blocks = blocks_of(svg)
    # shared: marked as such, thick outline, striped in both owners' colours, with its ref count
    for bid in (0, 1):
        kind, fill, sw = blocks[bid]
        assert "shared" in kind.split() and sw == 3
    assert svg.count('<svg class="stripes"') == 2
    assert "x2</text>" in svg
    stripes = svg.split('<svg class="stripes"')[1].split("</svg>")[0]
    assert PALETTE[0] in stripes and PALETTE[1] in stripes
    # owned by one sequence: that sequence's colour, by its index in the list given
    assert blocks[2][:2] == ("used", seq_color(0)) and blocks[3][:2] == ("used", seq_color(1))
    # free: grey; free but still cached: a darker grey
    assert blocks[4][:2] == ("free cached", CACHED_FILL)
    assert all(blocks[i][:2] == ("free", FREE_FILL) for i in range(5, 12))
    assert FREE_FILL != CACHED_FILL


def test_deterministic_and_free_of_ids():
    bm1, seqs1 = hand_built()
    bm2, seqs2 = hand_built()
    s1, s2 = snapshot(bm1, seqs1, step=1), snapshot(bm2, seqs2, step=1)
    assert s1 == s2
    assert block_table_svg(s1) == block_table_svg(s2) == block_table_svg(pickle.loads(pickle.dumps(s1)))
    html = snapshot_html(s1)
    assert html == snapshot_html(s2)
    assert not re.search(r'\bid="', html)  # no element ids (they would collide between pictures)


def test_palette_is_by_index_and_cycles():
    assert seq_color(0) == PALETTE[0] and seq_color(len(PALETTE)) == PALETTE[0]
    assert len(set(PALETTE)) == len(PALETTE)
    assert FREE_FILL not in PALETTE and CACHED_FILL not in PALETTE


def test_block_tables_listed_under_the_grid():
    bm, seqs = hand_built()
    svg = block_table_svg(snapshot(bm, seqs))
    assert svg.count('<rect class="entry"') == 6  # 3 + 3 block-table entries
    assert "block tables" in svg
    assert "block tables" not in block_table_svg(snapshot(bm, seqs), show_tables=False)


def test_describe():
    bm, seqs = hand_built()
    text = describe(snapshot(bm, seqs, step=2))
    assert text == "step 2; 4/12 blocks used, 2 shared, 1 free but cached"


def test_empty_cache_snapshot_without_sequences():
    bm = BlockManager(5, 16)
    snap = snapshot(bm)
    assert snap["seqs"] == [] and all(b["free"] for b in snap["blocks"])
    assert blocks_of(block_table_svg(snap)) == {i: ("free", FREE_FILL, 1) for i in range(5)}


def test_imports_without_ipywidgets():
    code = ("import sys; sys.modules['ipywidgets'] = None\n"
            "import nanovllm.viz as v\n"
            "assert 'torch' not in sys.modules\n"
            "try:\n    v.BlockTableViewer([{}])\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# -- with an engine ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tiny_qwen3):
    from nanovllm import LLM

    path, _ = tiny_qwen3
    return LLM(path, num_kvcache_blocks=10, kvcache_block_size=4, max_num_batched_tokens=16, enforce_eager=True)


def test_record_run(tiny_llm):
    from nanovllm import SamplingParams
    from nanovllm.viz import record_run

    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [1, 2, 3, 4, 5, 6, 10, 11], [12, 13, 14, 15, 16]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    snaps, outs = record_run(tiny_llm, prompts, params, with_outputs=True)
    assert snaps[0]["step"] == 0 and snaps[0]["batch"] is None
    assert [s["step"] for s in snaps] == list(range(len(snaps)))
    assert all(len(o.token_ids) == 8 for o in outs)
    for snap in snaps:
        assert [q["index"] for q in snap["seqs"]] == [0, 1, 2, 3]
        assert sum(not b["free"] for b in snap["blocks"]) == len(snap["blocks"]) - snap["stats"]["num_free_blocks"]
        for b in snap["blocks"]:
            assert b["ref_count"] == len(b["owners"]) and b["free"] == (b["ref_count"] == 0)
    assert all(b["free"] for b in snaps[-1]["blocks"])
    assert snaps[1]["batch"]["is_prefill"]
    finished = [i for s in snaps for i in s["stats"]["finished"]]
    assert sorted(finished) == [0, 1, 2, 3]
    assert not tiny_llm.has_unfinished_requests()
    # the tiny cache forces a preemption: the preempted sequence is listed, without blocks, as such
    preempted = [(snap, q) for snap in snaps for q in snap["seqs"]
                 if q["status"] == "waiting" and q["num_preemptions"]]
    assert preempted and snaps[-1]["stats"]["num_preemptions"] > 0
    snap, q = preempted[0]
    assert q["block_table"] == [] and "preempted" in block_table_svg(snap)
    assert block_table_svg(snaps[-1]).count(">finished (") == 4
    # the same prompts again: their prefixes are now cached, and the snapshot at step 0 shows it
    again = record_run(tiny_llm, prompts, params)
    assert any(b["cached"] and b["free"] for b in again[0]["blocks"])
    assert again[-1]["stats"]["hit_tokens"] > snaps[-1]["stats"]["hit_tokens"]


def test_viewer_slider_drives_the_picture(tiny_llm):
    pytest.importorskip("ipywidgets")
    from nanovllm import SamplingParams
    from nanovllm.viz import BlockTableViewer, record_run

    snaps = record_run(tiny_llm, [[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=5))
    viewer = BlockTableViewer(snaps, step=2)
    assert viewer.slider.max == len(snaps) - 1 and viewer.slider.value == 2
    assert viewer.html.value == snapshot_html(snaps[2])
    viewer.show(len(snaps) - 1)
    assert viewer.html.value == snapshot_html(snaps[-1])
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/html"] == snapshot_html(snaps[-1])  # the static snapshot, for pages without widgets

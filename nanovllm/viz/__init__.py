"""Pictures of the engine's state for the book: pure render functions (state -> SVG/HTML string) and thin
ipywidgets wrappers around them.

    from nanovllm.viz import record_run, BlockTableViewer
    snaps = record_run(llm, prompts, params)   # one snapshot of the KV cache per engine step
    BlockTableViewer(snaps)                    # a slider over the steps (needs ipywidgets)

Importing this package needs neither ipywidgets nor a model: ``BlockTableViewer`` imports ipywidgets when
one is built.
"""

from nanovllm.viz.block_table import PALETTE, block_table_svg, describe, seq_color, snapshot, snapshot_html
from nanovllm.viz.widgets import BlockTableViewer, record_run

__all__ = ["PALETTE", "block_table_svg", "describe", "seq_color", "snapshot", "snapshot_html",
           "record_run", "BlockTableViewer"]

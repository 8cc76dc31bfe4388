"""Pictures of the paged KV cache: a snapshot of the block manager at one engine step, drawn as SVG.

Two pure functions do the work, so tests can call them and widgets only wire sliders to them:

* :func:`snapshot` reads a ``BlockManager`` (or an ``LLM``) and its sequences into a plain dict of ints,
  strings and lists: picklable, comparable, free of object addresses.
* :func:`block_table_svg` draws one snapshot: the physical cache as a grid of blocks (coloured by the
  sequence that owns them, striped and outlined when several share one, grey when free, darker grey and
  marked ``#`` when free but still holding a cached prefix), and under it each sequence's block table.

The same snapshot always gives the same string: no random ids, no timestamps.
"""

from __future__ import annotations

from html import escape

from nanovllm.utils import cdiv

#: Colours of sequences 0, 1, 2, ... (Tableau 10 without its grey, which means "free" here).
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7",
           "#9c755f", "#17becf")
FREE_FILL = "#eeeeee"  # free, nothing cached: its contents will never be read again
CACHED_FILL = "#bdbdbd"  # free, but its K/V is still findable by hash: a later request may revive it
STROKE = "#555555"
SHARED_STROKE = "#111111"


def seq_color(index: int) -> str:
    """The colour of the ``index``-th sequence of a snapshot (its position in the list given)."""
    return PALETTE[index % len(PALETTE)]


def snapshot(source, seqs=None, *, step: int | None = None, batch=None, finished=()) -> dict:
    """The KV cache at one moment, as plain data.

    ``source``: an ``LLM`` or a ``BlockManager``.  ``seqs``: the sequences to show, in a fixed order (a
    sequence's colour is its index here, so pass the same list at every step); with an ``LLM`` and no
    ``seqs``, the scheduler's running then waiting sequences.  ``batch``: the ``ScheduledBatch`` that the
    step just ran, if any; ``finished``: the sequences that step finished.

    Returns ``{"step", "block_size", "blocks": [...], "seqs": [...], "batch", "stats"}`` where each block is
    ``{"id", "ref_count", "owners" (sequence indices), "cached" (has a prefix hash), "free", "filled"
    (slots holding computed tokens, for its first owner)}`` and each sequence is ``{"index", "seq_id",
    "status", "num_tokens", "num_prompt_tokens", "num_computed_tokens", "num_cached_tokens",
    "num_preemptions", "block_table"}``.
    """
    bm = getattr(source, "block_manager", source)
    scheduler = getattr(source, "scheduler", None)
    if seqs is None:
        seqs = list(scheduler.running) + list(scheduler.waiting) if scheduler is not None else []
    block_size = bm.block_size
    owners: dict[int, list[int]] = {}
    filled: dict[int, int] = {}
    seq_rows = []
    for index, seq in enumerate(seqs):
        for pos, bid in enumerate(seq.block_table):
            owners.setdefault(bid, []).append(index)
            filled.setdefault(bid, max(0, min(block_size, seq.num_computed_tokens - pos * block_size)))
        seq_rows.append({
            "index": index, "seq_id": seq.seq_id, "status": seq.status.name.lower(),
            "num_tokens": len(seq), "num_prompt_tokens": seq.num_prompt_tokens,
            "num_computed_tokens": seq.num_computed_tokens, "num_cached_tokens": seq.num_cached_tokens,
            "num_preemptions": getattr(seq, "num_preemptions", 0), "block_table": list(seq.block_table),
        })
    free = set(bm.free)
    blocks = []
    for block in bm.blocks:
        bid = block.block_id
        cached = block.hash is not None and bm.hash_to_block.get(block.hash) == bid
        blocks.append({"id": bid, "ref_count": block.ref_count, "owners": owners.get(bid, []),
                       "cached": cached, "free": bid in free, "filled": filled.get(bid, 0)})
    index_of = {id(s): i for i, s in enumerate(seqs)}
    batch_row = None
    if batch is not None:
        batch_row = {"is_prefill": batch.is_prefill,
                     "seqs": [index_of.get(id(s), -1) for s in batch.seqs],
                     "num_new_tokens": list(batch.num_new_tokens)}
    stats = {"hit_tokens": bm.hit_tokens, "queried_tokens": bm.queried_tokens,
             "num_free_blocks": bm.num_free_blocks,
             "num_preemptions": getattr(scheduler, "num_preemptions", 0),
             "finished": [index_of.get(id(s), -1) for s in finished]}
    return {"step": step, "block_size": block_size, "blocks": blocks, "seqs": seq_rows, "batch": batch_row,
            "stats": stats}


def _stripes(x: float, y: float, size: float, colors: list[str], width: float = 7.0) -> str:
    """Diagonal stripes over a size x size cell, cycling through ``colors`` (a shared block's owners).

    A nested ``<svg>`` clips its content to its own box, so the stripes need no clip-path id."""
    lines = []
    n = int(2 * size / width) + 2
    for k in range(n):
        c = k * width - size  # the line x' - y' = c, drawn across the cell
        lines.append(f'<line x1="{c:.1f}" y1="0" x2="{c + size:.1f}" y2="{size:.1f}" '
                     f'stroke="{colors[k % len(colors)]}" stroke-width="{width * 0.72:.1f}"/>')
    return (f'<svg class="stripes" x="{x}" y="{y}" width="{size}" height="{size}" overflow="hidden">'
            + "".join(lines) + "</svg>")


def block_table_svg(snap: dict, *, columns: int = 16, cell: int = 40, show_tables: bool = True,
                    max_rows: int = 24, title: str | None = None) -> str:
    """Draw one snapshot as an SVG string: the cache's blocks, then each sequence's block table (or its state:
    waiting, preempted, finished).

    Each block is one ``<rect class="block ...">``: filled with its owner's colour; striped in all its
    owners' colours, outlined thick and labelled ``xN`` when N sequences share it; light grey when free,
    darker grey with a ``#`` when free but still cached.  A dark bar along the bottom of a used block shows
    how many of its slots hold computed tokens.
    """
    blocks = snap["blocks"]
    block_size = snap["block_size"]
    gap, pad = 4, 8
    ncol = max(1, min(columns, len(blocks)))
    nrow = cdiv(len(blocks), ncol)
    grid_w = ncol * (cell + gap) - gap
    top = pad + (18 if title else 0)
    live = snap["seqs"][:max_rows] if show_tables else []
    more = len(snap["seqs"]) - len(live) if show_tables else 0
    row_h = 18
    tables_top = top + nrow * (cell + gap) + 22
    table_cell = 24
    widest = max((len(s["block_table"]) for s in live), default=0)
    width = max(grid_w, 150 + widest * (table_cell + 2), _legend_width()) + 2 * pad
    height = tables_top + ((len(live) + (more > 0)) * row_h + 16 if live else 0) + 34 + pad
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="10">',
           f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{pad}" y="{pad + 11}" font-size="12" font-weight="bold">{escape(title)}</text>')
    for i, b in enumerate(blocks):
        x, y = pad + (i % ncol) * (cell + gap), top + (i // ncol) * (cell + gap)
        owners = b["owners"]
        if b["free"]:
            kind, fill = ("free cached", CACHED_FILL) if b["cached"] else ("free", FREE_FILL)
        elif owners:
            kind, fill = ("shared" if len(owners) > 1 else "used"), seq_color(owners[0])
        else:  # in use by a sequence outside this snapshot
            kind, fill = "used other", "#8c8c8c"
        shared = len(owners) > 1 or b["ref_count"] > 1
        if shared and "shared" not in kind:
            kind += " shared"
        stroke, sw = (SHARED_STROKE, 3) if shared else (STROKE, 1)
        dash = ' stroke-dasharray="3,2"' if b["free"] else ""
        tip = (f'block {b["id"]}: ref_count={b["ref_count"]}, owners={owners}, cached={b["cached"]}, '
               f'free={b["free"]}, filled={b["filled"]}/{block_size}')
        out.append(f'<rect class="block {kind}" data-block="{b["id"]}" x="{x}" y="{y}" width="{cell}" '
                   f'height="{cell}" fill="{fill}" stroke="{stroke}" stroke-width="{sw}"{dash}>'
                   f'<title>{escape(tip)}</title></rect>')
        if len(owners) > 1:
            out.append(_stripes(x, y, cell, [seq_color(o) for o in owners]))
            out.append(f'<rect class="outline" x="{x}" y="{y}" width="{cell}" height="{cell}" fill="none" '
                       f'stroke="{SHARED_STROKE}" stroke-width="3"/>')
        dark = not b["free"]
        color = "white" if dark else "#333333"
        out.append(f'<text x="{x + 3}" y="{y + 11}" fill="{color}">{b["id"]}</text>')
        if b["cached"]:
            out.append(f'<text x="{x + cell - 9}" y="{y + 11}" fill="{color}" font-weight="bold">#</text>')
        if shared:
            out.append(f'<text x="{x + cell / 2:.0f}" y="{y + cell / 2 + 6:.0f}" text-anchor="middle" font-size="13" '
                       f'font-weight="bold" fill="white" stroke="black" stroke-width="0.6">'
                       f'x{b["ref_count"]}</text>')
        if dark and b["filled"]:
            w = (cell - 6) * b["filled"] / block_size
            out.append(f'<line class="fill" x1="{x + 3}" y1="{y + cell - 4}" x2="{x + 3 + w:.1f}" '
                       f'y2="{y + cell - 4}" stroke="black" stroke-width="3"/>')
    y = tables_top
    if live:
        out.append(f'<text x="{pad}" y="{y - 6}" font-weight="bold">block tables</text>')
        for s in live:
            color = seq_color(s["index"])
            out.append(f'<circle cx="{pad + 6}" cy="{y + 7}" r="6" fill="{color}"/>')
            label = f'seq {s["seq_id"]}'
            if s["block_table"]:  # computed / total tokens
                label += f' {s["num_computed_tokens"]:>4}/{s["num_tokens"]:<4}'
            out.append(f'<text x="{pad + 16}" y="{y + 11}">{escape(label)}</text>')
            if not s["block_table"]:
                state = f'{s["status"]} ({s["num_tokens"]} tokens)'
                if s["status"] == "waiting" and (s["num_preemptions"] or s["num_tokens"] > s["num_prompt_tokens"]):
                    state = f'waiting: preempted, no blocks; will recompute its {s["num_tokens"]} tokens'
                out.append(f'<text x="{pad + 150}" y="{y + 11}" fill="#777777">{escape(state)}</text>')
            for j, bid in enumerate(s["block_table"]):
                tx = pad + 150 + j * (table_cell + 2)
                out.append(f'<rect class="entry" x="{tx}" y="{y}" width="{table_cell}" height="{row_h - 3}" '
                           f'fill="{color}" stroke="{STROKE}" stroke-width="0.5"/>')
                out.append(f'<text x="{tx + table_cell / 2:.0f}" y="{y + 11}" text-anchor="middle" '
                           f'fill="white">{bid}</text>')
            y += row_h
        if more:
            out.append(f'<text x="{pad + 16}" y="{y + 11}" fill="#777777">... and {more} more sequences</text>')
            y += row_h
        y += 16
    out.append(_legend(pad, y + 4))
    out.append("</svg>")
    return "".join(out)


_LEGEND = (("used (colour = sequence)", PALETTE[0], STROKE, 1, ""),
           ("shared (xN = ref count)", PALETTE[1], SHARED_STROKE, 3, ""),
           ("free", FREE_FILL, STROKE, 1, ' stroke-dasharray="3,2"'),
           ("free, cached (#)", CACHED_FILL, STROKE, 1, ' stroke-dasharray="3,2"'),
           ("bar: slots computed", None, None, 0, ""))


def _legend_width() -> int:
    return sum(30 + 6 * len(item[0]) for item in _LEGEND)


def _legend(x: int, y: int) -> str:
    parts, cx = [], x
    for label, fill, stroke, sw, dash in _LEGEND:
        if fill is None:
            parts.append(f'<line x1="{cx}" y1="{y + 8}" x2="{cx + 12}" y2="{y + 8}" stroke="black" '
                         'stroke-width="3"/>')
        else:
            parts.append(f'<rect class="legend" x="{cx}" y="{y}" width="12" height="12" fill="{fill}" '
                         f'stroke="{stroke}" stroke-width="{sw}"{dash}/>')
        parts.append(f'<text x="{cx + 16}" y="{y + 10}">{escape(label)}</text>')
        cx += 30 + 6 * len(label)
    return "".join(parts)


def describe(snap: dict) -> str:
    """One line of text about a snapshot's step: the batch it ran and the cache's state."""
    parts = [f'step {snap["step"]}' if snap["step"] is not None else "state"]
    batch = snap["batch"]
    if batch:
        kind = "prefill" if batch["is_prefill"] else "decode"
        ids = [snap["seqs"][i]["seq_id"] if i >= 0 else "?" for i in batch["seqs"]]
        parts.append(f"{kind} of seqs {ids} ({sum(batch['num_new_tokens'])} tokens)")
    blocks = snap["blocks"]
    used = sum(1 for b in blocks if not b["free"])
    cached_free = sum(1 for b in blocks if b["free"] and b["cached"])
    shared = sum(1 for b in blocks if b["ref_count"] > 1)
    parts.append(f"{used}/{len(blocks)} blocks used, {shared} shared, {cached_free} free but cached")
    st = snap["stats"]
    if st["finished"]:
        parts.append(f'finished seqs {[snap["seqs"][i]["seq_id"] for i in st["finished"] if i >= 0]}')
    if st["num_preemptions"]:
        parts.append(f'{st["num_preemptions"]} preemptions so far')
    return "; ".join(parts)


def snapshot_html(snap: dict, **kwargs) -> str:
    """A snapshot as an HTML fragment: a one-line caption over its SVG."""
    return (f'<div class="nanovllm-blocks"><div style="font-family:monospace;margin:4px 0">'
            f'{escape(describe(snap))}</div>{block_table_svg(snap, **kwargs)}</div>')

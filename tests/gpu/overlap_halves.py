"""An experiment: can a decode step hide its GEMMs behind attention by splitting the batch in two halves?

Why: over the FP8 cache, decode attention reads DRAM at 2.0-2.5 TB/s and keeps the SMs' issue slots about a third
busy (``figures/data/fp8_words_h100.txt`` section 12), while a layer's GEMMs (o, gate-up + SiLU, down, the next
qkv) are bound by the tensor cores and launches: with their weights already in L2 they take as long as cold
(``tests/gpu/l2_prefetch.py``: 33.2 against 33.3 us a layer at batch 218). The two use different units. Split the
batch into halves A and B (sequences are independent), and run A's attention while B's GEMMs run, then B's
attention beside A's GEMMs, as NanoFlow does within a device.

What it times, per step of the seed benchmark (28 layers replayed from one CUDA graph, microseconds a layer):

* ``layer``: the whole batch, attention then the GEMMs (what the engine does today);
* ``halves, one stream``: A's attention and GEMMs, then B's (what splitting alone costs);
* ``halves, two streams``: A on one stream and B on another, each its own chain of layers, left to the GPU;
* ``halves, anti-phase``: the same with events so that the attentions take turns (B's attention of a layer starts
  when A's ends; A's next one when B's ends), so each attention runs beside the other half's GEMMs;
* ``halves, by role``: the attentions on one stream and the GEMMs on another, in the same order; with the
  attention stream at high priority, or the GEMM stream.

    PYTHONPATH=. python3 tests/gpu/overlap_halves.py [--steps 200,600,900]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from decode_sweep import BS, HKV, D, batch_at_step, graph_inputs  # noqa: E402
from gemm_check import LAYERS, graph_us  # noqa: E402
from l2_prefetch import layer_weights  # noqa: E402

from nanovllm.attention import triton_kernels as tk  # noqa: E402
from nanovllm.bench import seed_workload  # noqa: E402
from nanovllm.layers.triton_gemm import skinny_gemm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="200,600,900")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    w = seed_workload()
    _, views = layer_weights()
    for step in [int(s) for s in args.steps.split(",")]:
        time_step(w, step, views)
        torch.cuda.empty_cache()


def time_step(w, step: int, views) -> None:
    ctx = batch_at_step(w, step)
    nb, tables, lens, q = graph_inputs(ctx)
    k = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda").to(torch.float8_e4m3fn)
    v = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda").to(torch.float8_e4m3fn)
    ones = torch.ones(HKV, device="cuda")
    eng = dict(f16_dot=True, fp8_words=tk.TritonBackend.fp8_words, fp8_words_k=tk.TritonBackend.fp8_words_k)

    def part(sub):
        _, t, ln, qq = graph_inputs(sub)  # its own graph bucket, its blocks within the whole batch's cache
        return dict(tables=t, lens=ln, q=qq, out=torch.empty_like(qq))

    whole = dict(tables=tables, lens=lens, q=q, out=torch.empty_like(q))
    halves = [part(ctx[0::2]), part(ctx[1::2])]  # longest first, alternately: the halves read alike

    def attention(p, layer):
        tk.paged_decode_attention(p["q"], k, v, p["tables"][layer], p["lens"], D ** -0.5, out=p["out"],
                                  k_scale=ones, v_scale=ones, **eng)

    def gemms(p, layer):
        wts = views[layer]
        h = F.linear(p["out"].flatten(1), wts["o"])
        d = F.linear(skinny_gemm(h, wts["gate_up"], act="silu_mul"), wts["down"])
        F.linear(d, wts["qkv"])

    def serial(parts):
        def fn():
            for layer in range(LAYERS):
                for p in parts:
                    attention(p, layer)
                    gemms(p, layer)
        return fn

    def two_streams(anti_phase: bool, prio=(0, 0)):
        sa, sb = torch.cuda.Stream(priority=prio[0]), torch.cuda.Stream(priority=prio[1])

        def fn():
            main_s = torch.cuda.current_stream()
            sa.wait_stream(main_s)
            sb.wait_stream(main_s)
            a, b = halves
            for layer in range(LAYERS):
                with torch.cuda.stream(sa):
                    attention(a, layer)
                    done_a = torch.cuda.Event()
                    done_a.record(sa)
                    gemms(a, layer)
                with torch.cuda.stream(sb):
                    if anti_phase:
                        sb.wait_event(done_a)
                    attention(b, layer)
                    done_b = torch.cuda.Event()
                    done_b.record(sb)
                    gemms(b, layer)
                if anti_phase:
                    sa.wait_event(done_b)
            main_s.wait_stream(sa)
            main_s.wait_stream(sb)
        return fn

    def by_role(prio=(0, 0)):
        """Attentions on one stream, GEMMs on another: A's attention, B's attention, A's next one (once A's GEMMs
        are done) ...; A's GEMMs once its attention is done, then B's. Each attention thus runs beside the other
        half's GEMMs."""
        s_att, s_gem = torch.cuda.Stream(priority=prio[0]), torch.cuda.Stream(priority=prio[1])

        def fn():
            main_s = torch.cuda.current_stream()
            s_att.wait_stream(main_s)
            s_gem.wait_stream(main_s)
            gemms_done = [None, None]
            for layer in range(LAYERS):
                for i, p in enumerate(halves):
                    with torch.cuda.stream(s_att):
                        if gemms_done[i] is not None:
                            s_att.wait_event(gemms_done[i])
                        attention(p, layer)
                        att_done = torch.cuda.Event()
                        att_done.record(s_att)
                    with torch.cuda.stream(s_gem):
                        s_gem.wait_event(att_done)
                        gemms(p, layer)
                        gemms_done[i] = torch.cuda.Event()
                        gemms_done[i].record(s_gem)
            main_s.wait_stream(s_att)
            main_s.wait_stream(s_gem)
        return fn

    lo, hi = torch.cuda.Stream.priority_range()  # (least, greatest): greatest is the more urgent (lower number)
    res = {
        "layer": graph_us(serial([whole])),
        "attention alone": graph_us(lambda: [attention(whole, i) for i in range(LAYERS)]),
        "gemms alone": graph_us(lambda: [gemms(whole, i) for i in range(LAYERS)]),
        "halves, one stream": graph_us(serial(halves)),
        "halves, two streams": graph_us(two_streams(False)),
        "halves, anti-phase": graph_us(two_streams(True)),
        "halves, by role": graph_us(by_role()),
        "halves, by role, attention first": graph_us(by_role((hi, lo))),
        "halves, by role, GEMMs first": graph_us(by_role((lo, hi))),
        "layer, timed again last": graph_us(serial([whole])),
    }
    print(f"step {step} batch {len(ctx)} (halves {len(halves[0]['lens'])}/{len(halves[1]['lens'])} rows): "
          "us a layer")
    for name, us in res.items():
        print(f"  {us:7.1f}  {name}", flush=True)


if __name__ == "__main__":
    main()

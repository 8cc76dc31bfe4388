"""Compile every Triton kernel of the package for real GPUs, on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which executes the Python of a kernel and checks
little of what the compiler checks: a variable given another type inside a runtime ``if``, say, runs in the
interpreter and fails to compile on a GPU (chapter 12 found one such on an H200).  This script compiles
the kernels the way a GPU would (Triton's front end, its passes, LLVM, and ``ptxas`` to a cubin, all of
which run on a CPU) for a list of NVIDIA architectures, without launching anything:

* a stand-in driver tells Triton the "current GPU" is the architecture asked for (``--arch 90``: sm_90),
* every kernel launch becomes a *warm-up* (compile, no launch), through the package's own wrappers
  (``store_kvcache``, ``qkv_rope_store``, ``paged_decode_attention``, ``paged_prefill_attention``,
  ``skinny_gemm``, ``gumbel_sample``), so the launch settings they pick are the ones compiled,
* the shared memory a compiled kernel needs is checked against the architecture's limit, raising
  Triton's ``OutOfResources`` as a real launch would (``launch_fitting_stages`` then retries with fewer
  stages, as on the GPU); the package's launch heuristics see that architecture's limit and SM count.

Each configuration prints one line ``ok`` or ``FAIL``; then the kernels defined in the package that were
never compiled (none, or the check is incomplete).  Exit status 1 on any failure.  Run with
``TRITON_INTERPRET`` unset (the script refuses otherwise): ``python tests/triton_compile_check.py --arch 86``.
The outputs of the "launches" are garbage (nothing ran); only compilation is checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

# compute capability (as Triton writes it) -> (shared memory per block in bytes, opt-in; SMs; an example card)
ARCHS = {
    80: (166912, 108, "A100"),
    86: (101376, 40, "RTX 3070 Laptop"),
    89: (101376, 24, "RTX 4060 Laptop"),
    90: (232448, 132, "H100 / H200"),
}
# (name, query heads, KV heads, head dim): the embedded SmolLM2-135M and Qwen3-0.6B
SHAPES = [("smollm2", 9, 3, 64), ("qwen3", 16, 8, 128)]


def install_compile_only(arch: int):
    """Make Triton compile for ``arch`` and never launch; returns the list that collects (kernel, compiled)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    import nanovllm.triton_pdl as tp
    import nanovllm.triton_utils as tu

    shared_limit, sms, _ = ARCHS[arch]

    class CompileOnlyDriver(DriverBase):
        """What ``JITFunction.run`` asks of a driver before it compiles: the target, a device and a stream."""

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("compile only: no launcher is built")

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("compile only: nothing runs")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.metadata.shared > shared_limit:  # what loading it on that GPU would refuse
            raise OutOfResources(kernel.metadata.shared, shared_limit, "shared memory")
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    driver.set_active(CompileOnlyDriver())
    tu._num_sms = lambda device_type, index: sms
    tu._max_shared_memory = lambda device_type, index: shared_limit
    tp._pdl_capable = lambda device_type, index: arch >= 90  # programmatic dependent launch: sm_90+
    tp.PDL = True  # (compiled as a GPU with it switched on would)
    return compiled


def configurations(arch: int):
    """(label, thunk) pairs: each calls one wrapper as the engine does, on CPU tensors."""
    import torch

    from nanovllm.attention import triton_kernels as tk
    from nanovllm.layers.linear import SplitK
    from nanovllm.layers.triton_gemm import skinny_gemm, splitk_gemm, sum_add_rms_norm
    from nanovllm.layers.triton_sampler import gumbel_sample

    fp8_ok = arch >= 89  # Triton's e4m3 conversions need Ada (8.9) or newer, as TritonBackend.fp8_kv_usable says
    for name, heads, kv_heads, head_dim in SHAPES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            caches = [dtype] + ([torch.float8_e4m3fn] if fp8_ok and dtype != torch.float32 else [])
            for cache_dtype in caches:
                for block_size in (16, 256):
                    label = f"{name} {str(dtype)[6:]} cache={str(cache_dtype)[6:]} block={block_size}"
                    yield from attention_configs(tk, label, heads, kv_heads, head_dim, dtype, cache_dtype,
                                                 block_size)
    if arch >= 90:  # the flat decode's tiles by TMA (blocks of 128) and its other options
        for name, heads, kv_heads, head_dim in SHAPES:
            q, ones = torch.zeros(64, heads, head_dim, dtype=torch.bfloat16), torch.ones(kv_heads)
            for bs, opts in ((128, dict(tma=True)), (128, dict(tma=True, bt_ahead=True, num_stages=3)),
                             (16, dict(q_carried=True, bt_ahead=True, num_stages=3))):
                cache = torch.zeros(64, bs, kv_heads, head_dim, dtype=torch.float8_e4m3fn)
                tables, lens = torch.zeros(64, 8, dtype=torch.int32), torch.full((64,), 8 * bs, dtype=torch.int32)
                yield (f"flat_decode_attention {name} block={bs} {opts}",
                       lambda q=q, c=cache, t=tables, n=lens, s=ones, o=opts: tk.flat_decode_attention(
                           q, c, c, t, n, 0.1, s, s, **o))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m in (1, 8, 64, 256):
            for act in (None, "silu_mul"):
                x, w = torch.zeros(m, 1024, dtype=dtype), torch.zeros(2048, 1024, dtype=dtype)
                yield (f"skinny_gemm {str(dtype)[6:]} M={m} act={act}",
                       lambda x=x, w=w, act=act: skinny_gemm(x, w, act))
        for m in (1, 48, 224):  # o and down of Qwen3-0.6B, each row count's splits and tiles
            for k in (2048, 3072):
                x, w = torch.zeros(m, k, dtype=dtype), torch.zeros(1024, k, dtype=dtype)
                yield (f"splitk_gemm {str(dtype)[6:]} M={m} K={k}", lambda x=x, w=w: splitk_gemm(x, w))
        for splits, hidden in ((2, 1024), (4, 576)):
            y = SplitK(torch.zeros(splits, 8, hidden), dtype)
            res, weight = torch.zeros(8, hidden, dtype=dtype), torch.ones(hidden, dtype=dtype)
            yield (f"sum_add_rms_norm {str(dtype)[6:]} splits={splits} hidden={hidden}",
                   lambda y=y, r=res, w=weight: sum_add_rms_norm(y, r, w, 1e-6))
        for rows in (1, 1024):
            logits = torch.zeros(rows, 49152, dtype=dtype)
            temps, seeds = torch.ones(rows), torch.zeros(rows, dtype=torch.int64)
            yield (f"gumbel_sample {str(dtype)[6:]} rows={rows}",
                   lambda a=logits, t=temps, s=seeds: gumbel_sample(a, t, s))


def attention_configs(tk, label, heads, kv_heads, head_dim, dtype, cache_dtype, block_size):
    import torch

    fp8 = cache_dtype == torch.float8_e4m3fn
    num_blocks, tokens = 64, 40
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    scales = (torch.ones(kv_heads), torch.ones(kv_heads)) if fp8 else (None, None)
    slots = torch.arange(tokens)
    k = torch.zeros(tokens, kv_heads, head_dim, dtype=dtype)

    yield f"store_kvcache {label}", lambda: tk.store_kvcache(k, k, k_cache, v_cache, slots, *scales)
    cos_sin = torch.zeros(1024, head_dim)
    for norm in (False, True):
        weights = (torch.ones(head_dim, dtype=dtype),) * 2 if norm else (None, None)

        def rope(weights=weights):
            qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
            tk.qkv_rope_store(qkv, torch.arange(tokens), cos_sin, heads, kv_heads, head_dim, *weights, 1e-6,
                              k_cache, v_cache, slots, *scales)
        yield f"qkv_rope_store norm={norm} {label}", rope
    width = 8
    for batch in (1, 64, 1024):  # split KV / one split / one split with the big tiles
        q = torch.zeros(batch, heads, head_dim, dtype=dtype)
        tables = torch.zeros(batch, width, dtype=torch.int32)
        lens = torch.full((batch,), width * block_size, dtype=torch.int32)
        yield (f"paged_decode_attention batch={batch} {label}",
               lambda q=q, t=tables, n=lens: tk.paged_decode_attention(q, k_cache, v_cache, t, n, 0.1,
                                                                      k_scale=scales[0], v_scale=scales[1]))
        if fp8:  # float16 products (the backend's for bfloat16 queries), reading bytes or words
            for words, k_words in ((None, False), ("convert", False), ("asm", False), ("asm", True)):
                yield (f"paged_decode_attention f16_dot words={words}{'+K' if k_words else ''} batch={batch} {label}",
                       lambda q=q, t=tables, n=lens, words=words, k_words=k_words: tk.paged_decode_attention(
                           q, k_cache, v_cache, t, n, 0.1, k_scale=scales[0], v_scale=scales[1], f16_dot=True,
                           fp8_words=words, fp8_words_k=k_words))
            if dtype != torch.float32:  # the flat decode (TritonBackend.fp8_flat), its default launch
                yield (f"flat_decode_attention batch={batch} {label}",
                       lambda q=q, t=tables, n=lens: tk.flat_decode_attention(q, k_cache, v_cache, t, n, 0.1,
                                                                             *scales))
    q = torch.zeros(tokens, heads, head_dim, dtype=dtype)
    cu = torch.tensor([0, 10, tokens], dtype=torch.int32)
    tables = torch.zeros(2, width, dtype=torch.int32)
    lens = torch.tensor([10, 30 + block_size], dtype=torch.int32)
    yield (f"paged_prefill_attention {label}",
           lambda: tk.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, 0.1, 30,
                                              k_scale=scales[0], v_scale=scales[1]))


def package_kernels() -> set[str]:
    """Names of the kernels (``@triton.jit`` functions the host launches, not the helpers they call) defined
    in the package's modules."""
    import importlib

    from triton.runtime.jit import JITFunction

    names = set()
    for module in ("nanovllm.attention.triton_kernels", "nanovllm.layers.triton_gemm",
                   "nanovllm.layers.triton_sampler"):
        for attr, value in vars(importlib.import_module(module)).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel"):
                names.add(value.fn.__name__)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90,
                        help="compute capability to compile for (80, 86, 89, 90)")
    parser.add_argument("-k", default="", help="only the configurations whose label contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    compiled = install_compile_only(args.arch)
    shared, sms, example = ARCHS[args.arch]
    print(f"compiling for sm_{args.arch} ({example}: {shared // 1024} KiB shared memory per block, {sms} SMs)",
          flush=True)
    failures, t0 = 0, time.perf_counter()
    for label, thunk in configurations(args.arch):
        if args.k not in label:
            continue
        before, t = len(compiled), time.perf_counter()
        try:
            thunk()
            new = compiled[before:]
            detail = ", ".join(f"{n} {k.metadata.shared // 1024} KiB" for n, k in new) or "cached"
            print(f"ok   {label}: {detail} ({time.perf_counter() - t:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every configuration, then fail
            failures += 1
            first = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
            print(f"FAIL {label}: {type(e).__name__}: {' | '.join(first[:12])}", flush=True)
    done = {name for name, _ in compiled}
    # the kernels only an FP8 cache runs compile where it may be (sm_89 and newer)
    fp8_only = {"_flat_decode_kernel", "_flat_combine_kernel"} if args.arch < 89 else set()
    missing = sorted(package_kernels() - done - fp8_only) if not args.k else []
    # from sm_90 on every kernel is launched with PDL and so must wait for the kernel before it; below, none may
    pdl = args.arch >= 90
    wrong = sorted({name for name, k in compiled if ("griddepcontrol.wait" in k.asm["ptx"]) != pdl})
    print(f"{len(done)} kernels compiled ({len(compiled)} compilations) in {time.perf_counter() - t0:.0f} s; "
          f"{failures} configuration(s) failed; never compiled: {', '.join(missing) or 'none'}; "
          f"{'without' if pdl else 'with'} the PDL wait: {', '.join(wrong) or 'none'}")
    return 1 if failures or missing or wrong else 0


if __name__ == "__main__":
    sys.exit(main())

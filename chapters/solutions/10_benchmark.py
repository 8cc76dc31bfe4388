# Solutions to chapter 10's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (output_lens, decode_floor_bytes, log, ...).

# %% exercise 1
# 256 requests each generate max(output_lens) tokens; the useful ones are their own output lengths.
useful_fraction = sum(output_lens) / (len(output_lens) * max(output_lens))


# %% exercise 2
# K and V at one byte per value, the weights still at two: the same sums as 10.2, with the smaller K and V.
kv8, w16 = decode_floor_bytes(prompt_lens, output_lens, kv_bytes_per_token(qwen3, 1), weight_bytes(qwen3, 2))
fp8_kv_ceiling = sum(output_lens) / ((kv8 + w16) / h100_bandwidth)


# %% exercise 3
def tail_share(log, num_requests):
    decode = [(seqs, seconds) for is_prefill, _, seqs, seconds in log if not is_prefill]
    tail = sum(seconds for seqs, seconds in decode if 2 * seqs < num_requests)
    return tail / sum(seconds for _, seconds in decode)


# %% exercise 4
import math
import statistics


def latency_stats(timings):
    def p99(values):  # nearest rank: the ceil(0.99 n)-th smallest, a value that was measured
        ordered = sorted(values)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    ttft = [(times[0] - start) * 1e3 for start, times in timings]
    itl = [(b - a) * 1e3 for _, times in timings for a, b in zip(times, times[1:])]
    return {"ttft_ms_median": statistics.median(ttft), "ttft_ms_p99": p99(ttft),
            "itl_ms_median": statistics.median(itl), "itl_ms_p99": p99(itl)}

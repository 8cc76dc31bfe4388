# Solutions to chapter 12's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (ch10, qwen3, prompt_lens, output_lens, scale_from_amax).

# %% exercise 1
def llama8b_fp8_bytes_per_token():
    return 2 * 32 * 8 * 128 * 1  # K and V, layers, KV heads, dimensions, one byte: 64 KiB


# %% exercise 2
def e5m2_largest():
    # exponent field 30 (31 is infinities and NaNs): 2**(30 - 15); mantissa 11: 1.75.  128 times e4m3's 448,
    # for one mantissa bit less: neighbours up to a quarter apart instead of an eighth
    return 1.75 * 2.0 ** 15


# %% exercise 3
def scale_and_stored():
    scale = scale_from_amax(3.0)  # 3 * 4 / 448 = 0.0268 -> 2**-5
    return scale, 3.0 / scale  # 96: between 448 / 8 and 448 / 4, as the headroom says


# %% exercise 4
def floor_with_fp8_weights():
    kv, w = ch10.decode_floor_bytes(prompt_lens, output_lens, ch10.kv_bytes_per_token(qwen3, 1),
                                    ch10.weight_bytes(qwen3, 1))
    return sum(output_lens) / ((kv + w) / 3.0e12)  # the weights were only 1.2 TB of the 8.2 read

# Solutions to chapter 03's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (slot_mapping, PagedAllocator, simulate, snaps, ...).

# %% exercise 1
def slot_of_token_37():
    # token 37 is in the table's block 37 // 16 = 2, i.e. block 9, at offset 37 % 16 = 5: slot 9 * 16 + 5
    return slot_mapping([5, 2, 9], 37, 38, 16)[0]


# %% exercise 2
def blocks_and_waste():
    answer = []
    for block_size in (16, 8):
        n = len(PagedAllocator(num_blocks=100, block_size=block_size).allocate("x", 100))
        answer.append((n, n * block_size - 100))
    return tuple(answer)


# %% exercise 3
def preemptions_by_cache_size():
    return {n: simulate(prompt_lens, max_tokens, num_blocks=n)[1] for n in (8, 16)}


# %% exercise 4
def preempted_seq_ids():
    # between two snapshots, a preemption shows as a sequence that lost its blocks and went back to waiting
    found = []
    for before, after in zip(snaps, snaps[1:]):
        found += [q["seq_id"] for q, r in zip(before["seqs"], after["seqs"])
                  if q["block_table"] and not r["block_table"] and r["status"] == "waiting"]
    return found


# %% exercise 5
def batch_slot_mapping(block_tables, query_lens, context_lens, block_size):
    # sequence i computes its last query_lens[i] positions: context_lens[i] - query_lens[i] ... context_lens[i] - 1
    device = block_tables.device
    q = torch.as_tensor(query_lens, device=device)
    rows = torch.repeat_interleave(torch.arange(len(query_lens), device=device), q)  # each token's sequence
    ends = torch.as_tensor(context_lens, device=device)
    first = torch.cumsum(q, 0) - q  # where each sequence's tokens start in the step
    pos = torch.arange(int(q.sum()), device=device) - first[rows] + (ends - q)[rows]
    return block_tables[rows, pos // block_size].long() * block_size + pos % block_size

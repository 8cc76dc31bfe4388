# Solutions to chapter 05's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (MyScheduler, dry_run, results, prompt_lens, ...).

# %% exercise 1
class StaticScheduler(MyScheduler):
    # static batching: while any running request is past its prompt (decoding), nobody is admitted;
    # a group that is still prefilling (a chunked prompt) may still be joined, and when the last of a group
    # finishes, the next prefill admits up to max_num_seqs new requests at once

    def schedule_prefill(self):
        if any(s.num_uncomputed_tokens <= 1 for s in self.running):  # a group is decoding: admit nobody
            return ScheduledBatch([], [], is_prefill=True)
        return MyScheduler.schedule_prefill(self)


# %% exercise 2
# the prompt takes ceil(300 / 64) = 5 steps; the last one samples the first token
steps_to_first_token = len(dry_run(MyScheduler, [(300, 1)], max_num_batched_tokens=64, num_blocks=64)[0])


# %% exercise 3
def recomputed_tokens(steps):
    # without the prefix cache, each preemption would recompute the request's whole sequence
    return sum(n for s in steps if s["kind"] == "prefill" for _, n in s["work"]) - sum(prompt_lens)

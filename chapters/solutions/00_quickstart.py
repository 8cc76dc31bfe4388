# Solutions to chapter 00's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (llm, messages, poem, ...).

# %% exercise 1
def template_overhead():
    q = "What is the capital of France?"
    templated = llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True)
    # the templated text already holds its special tokens: do not let the tokenizer add more
    return len(llm.tokenizer(templated, add_special_tokens=False).input_ids) - len(llm.tokenizer(q).input_ids)


# %% exercise 2
def three_haikus():
    # one call, three requests: each request's seed decides its own sample
    outs = llm.chat([poem] * 3, [SamplingParams(temperature=0.8, max_tokens=24, seed=s) for s in range(3)],
                    use_tqdm=False)
    return [o.token_ids for o in outs]


# %% exercise 3
def finish_reasons():
    question = [{"role": "user", "content": "What is the capital of France?"}]
    outs = [llm.chat(question, SamplingParams(temperature=0, max_tokens=n), use_tqdm=False)[0] for n in (4, 64)]
    # the end-of-turn token that stops the second one is generated, so it is counted (it is not in the text)
    return tuple((o.finish_reason, len(o.token_ids)) for o in outs)


# %% exercise 4
def generate_until(llm, prompts, stop, max_tokens):
    from nanovllm import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    results = []
    for out in llm.generate(prompts, greedy, use_tqdm=False):
        found = [i for i in (out.text.find(s) for s in stop) if i >= 0]
        # the earliest stop string wins, and the text ends just before it
        results.append((out.text[:min(found)], "stop") if found else (out.text, out.finish_reason))
    return results

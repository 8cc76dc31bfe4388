# Solutions to chapter 11's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (StopFilter, MyDetokenizer, ...).

# %% exercise 1
# The longest stop string, "\n\nUser:", has 7 characters: the last 6 of the text might be its start and are held
# back. The text has 20 characters, so the first 14 may have been sent. (StopFilter(...).add(text) agrees.)
sent_so_far = "Sure. Here it "


# %% exercise 2
def blocks_held(P, n, g, B):
    shared = P // B  # the prompt's full blocks, held once for all n completions (ref count n)
    own = -(-(P + g - 1) // B) - shared  # each completion: the prompt's partial block and its own tokens
    return shared + n * own


# %% exercise 3
def prefill_steps(L, T, D, mixed):
    # with mixed batches every step first gives each of the D decodes its token: T - D tokens are left for the
    # prompt; without them a prefill step is the prompt's alone, T tokens
    per_step = T - D if mixed else T
    return -(-L // per_step)


# %% exercise 4
class FlushingDetokenizer(MyDetokenizer):
    def flush(self):
        # the same window as add(), but what it adds is sent even when it ends in an incomplete character
        sent = self.decode(self.tokens[self.prefix:self.read])
        rest = self.decode(self.tokens[self.prefix:])
        new = rest[len(sent):] if len(rest) > len(sent) else ""
        self.prefix = self.read = len(self.tokens)
        self.text += new
        return new

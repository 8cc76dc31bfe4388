"""Incremental detokenization: the text of a growing list of tokens, one piece per new token.

Decoding each new token alone goes wrong in two ways: a character of several UTF-8 bytes may be split over
tokens (an emoji is often three or four byte tokens), and many tokenizers decide spacing from the tokens
around (SentencePiece's leading "▁", byte-level BPE's merges).  So, as vLLM does, two offsets into the
tokens are kept: ``prefix`` (where the decoded window starts: a few tokens of context) and ``read`` (the
end of what has already been turned into text).  With each new token the window
``tokens[prefix:]`` is decoded and compared with ``tokens[prefix:read]``: what the longer one adds is the
new text, unless it ends in the replacement character U+FFFD, the sign of an incomplete character, in
which case nothing is emitted until the next token completes it.

The pieces add up to what decoding the whole completion at once gives (``tests/test_detokenizer.py``
checks it on the embedded tokenizer, multi-byte characters included), so a streamed reply equals the
non-streamed one.
"""

from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """``add(token_ids)`` returns the new text those tokens complete ("" while a character is incomplete);
    ``text`` is everything emitted so far; ``flush()`` returns what is left at the end (an incomplete
    character as the tokenizer decodes it)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.tokens = context
        self.prefix = 0
        self.read = len(context)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids) -> str:
        """Take the next generated tokens; return the text they add."""
        self.tokens.extend(token_ids)
        prefix_text = self._decode(self.tokens[self.prefix:self.read])
        window = self._decode(self.tokens[self.prefix:])
        if len(window) <= len(prefix_text) or window.endswith(REPLACEMENT):
            return ""  # nothing new yet (a special token skipped, or a character still incomplete)
        new = window[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.tokens)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end of the request: whatever the last tokens decode to, even an incomplete character."""
        prefix_text = self._decode(self.tokens[self.prefix:self.read])
        window = self._decode(self.tokens[self.prefix:])
        new = window[len(prefix_text):] if len(window) > len(prefix_text) else ""
        self.prefix = self.read = len(self.tokens)
        self.text += new
        return new

"""Choosing each request's next token, and turning its tokens into text that stops at a stop string."""
from __future__ import annotations

import torch

from .requests import SamplingParams


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a row's last logits [vocab]: argmax at temperature 0, else nucleus sampling
    (softmax(logits / T), keep the smallest set of tokens whose mass reaches top_p, draw with the row's generator)."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        dropped = before >= params.top_p
        dropped[0] = False  # the most likely token always stays (top_p 0 keeps it alone)
        sorted_probs[dropped] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generator_for(params: SamplingParams) -> torch.Generator | None:
    """A request's own random stream (seeded when asked), so its samples do not depend on its batch neighbours."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


class TextStream:
    """A request's output text, released piece by piece: text that might still become a stop string, or that ends
    in an incomplete character, is held back until the next tokens decide it.

    Decoding is incremental (as vLLM and TGI do it): each token decodes a short window of the latest tokens, the
    tokens before it only as context for spacing, so a step costs the same at the 1,000th token as at the first."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # all text decided so far
        self.sent = 0  # characters of `text` released
        self.context = self.decoded = 0  # ids[context:decoded] give the window its spacing; ids[:decoded] are in text

    def add(self, token_id: int) -> tuple[str, bool]:
        """Take one token; return (newly released text, whether a stop string ended the output)."""
        self.ids.append(token_id)
        start = len(self.text)
        self.text += self._new_text()
        hits = [i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held(self.text)), False

    def _new_text(self, final: bool = False) -> str:
        """The text the tokens after `decoded` add, or "" while they end inside a character split across tokens
        (unless `final`: bytes that never became a character come out as U+FFFD, as a whole decode gives them)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, after = decode(self.ids[self.context:self.decoded]), decode(self.ids[self.context:])
        if (after.endswith("\ufffd") and not final) or len(after) <= len(before):
            return ""
        self.context, self.decoded = self.decoded, len(self.ids)
        return after[len(before):]

    def finish(self) -> str:
        """The rest of the text (the output ended without a stop string)."""
        self.text += self._new_text(final=True)
        return self._release(len(self.text))

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        piece, self.sent = self.text[self.sent:upto], upto
        return piece

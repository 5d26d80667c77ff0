"""Proxy-tuning (Liu et al., 2024, "Tuning Language Models by Proxy", arXiv:2401.08565): steer a base model's decoding
by what tuning changed in a small model over the same vocabulary,

    logits_t = base_t + α · (tuned_t − untuned_t)      at every generated position t

`ProxyTuning` is a transformers `LogitsProcessor` for the base model's `generate`: at each step it runs the small
tuned and untuned models on the sequence so far (each with its own KV cache, fed only the new tokens) and adds α
times the difference of their last-position logits to the base's scores. transformers runs a processor passed to
`generate` after its own penalties and before its sampling warpers (temperature, top-k, top-p), so sampling draws from
the steered distribution. The small pair is two models (`tuned=`, `untuned=`) or one model with a peftkit adapter on
and off (`tuned=model, adapter=name`): then one forward pass per step, its rows routed half to the adapter, half to
the bare model. `proxy_generate` calls `generate` with it.

Only the sizes of the vocabularies can be checked here (the logits' last dimension): the token ids must also mean the
same tokens (one tokenizer), as the method assumes.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from .. import api
from ..core.registry import get_registry


class VocabularyError(ValueError):
    """The base and the small models score different vocabularies."""


class ProxyTuning(LogitsProcessor):
    """Adds α (tuned − untuned) last-position logits to the base's scores at each generation step (module docstring).

    `attention_mask`: the prompts' mask when they are padded (as passed to `generate`); generated tokens are always
    attended. One instance serves one `generate` call at a time; a call whose ids do not extend the last ones starts
    afresh."""

    def __init__(self, tuned: nn.Module, untuned: nn.Module | None = None, *, adapter: str | None = None,
                 alpha: float = 1.0, attention_mask: torch.Tensor | None = None):
        if (untuned is None) == (adapter is None):
            raise ValueError("give the small untuned model (untuned=...) or the adapter that tunes `tuned` "
                             "(adapter=...: the model with it on and off), not both or neither")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha}")
        if adapter is not None:
            get_registry(tuned).require(adapter)
        self.tuned, self.untuned, self.adapter, self.alpha = tuned, untuned, adapter, alpha
        self.prompt_mask = attention_mask
        self._seen: torch.Tensor | None = None  # the ids the caches hold
        self._caches: list[Any] = []
        self._mask: torch.Tensor | None = None  # the attention mask over the ids seen

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        difference = self.difference(input_ids)
        if difference.shape[-1] != scores.shape[-1]:
            raise VocabularyError(f"the base model scores {scores.shape[-1]} tokens, the small models "
                                  f"{difference.shape[-1]}: proxy-tuning needs one shared vocabulary")
        return scores + self.alpha * difference.to(scores.device, scores.dtype)

    def difference(self, input_ids: torch.Tensor) -> torch.Tensor:
        """tuned − untuned logits at the last position of each row of `input_ids` [B, V] (float32)."""
        new = self._advance(input_ids)
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        if self.adapter is not None:
            rows = input_ids.shape[0]
            with _enabled(self.tuned), api.routed(self.tuned, [self.adapter] * rows + [None] * rows):
                logits = self._run(0, self.tuned, new.repeat(2, 1), self._mask.repeat(2, 1), positions.repeat(2, 1))
            tuned, untuned = logits[:rows], logits[rows:]
        else:
            tuned = self._run(0, self.tuned, new, self._mask, positions)
            untuned = self._run(1, self.untuned, new, self._mask, positions)
        if tuned.shape[-1] != untuned.shape[-1]:
            raise VocabularyError(f"the tuned model scores {tuned.shape[-1]} tokens, the untuned one "
                                  f"{untuned.shape[-1]}: proxy-tuning needs one shared vocabulary")
        return tuned - untuned

    def _advance(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ids not yet in the caches; a sequence that does not extend the last one starts the caches afresh."""
        seen = self._seen
        if (seen is not None and seen.shape[0] == input_ids.shape[0] and input_ids.shape[1] > seen.shape[1]
                and torch.equal(input_ids[:, :seen.shape[1]], seen)):
            grown = input_ids.shape[1] - seen.shape[1]
            self._mask = torch.cat([self._mask, self._mask.new_ones(input_ids.shape[0], grown)], dim=1)
            self._seen = input_ids
            return input_ids[:, seen.shape[1]:]
        if self.prompt_mask is not None and self.prompt_mask.shape != input_ids.shape:
            raise ValueError(f"the attention_mask given has shape {tuple(self.prompt_mask.shape)}, but generation "
                             f"starts from ids of shape {tuple(input_ids.shape)}: pass the mask of these prompts")
        self._mask = (self.prompt_mask.to(input_ids.device) if self.prompt_mask is not None
                      else torch.ones_like(input_ids))
        self._seen, self._caches = input_ids, [None, None]
        return input_ids

    def _run(self, slot: int, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
        """The last-position logits of `model` on the new `ids`, continuing its cache in `slot`."""
        device = next(model.parameters()).device
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    past_key_values=self._caches[slot], use_cache=True)
        self._caches[slot] = out.past_key_values
        return out.logits[:, -1].float()


@contextmanager
def _enabled(model: nn.Module) -> Iterator[None]:
    """Adapters on for the pair's pass, even while the base generates inside `peftkit.disabled` (the bundled decoder
    as its own bare base): the rows routed to None still run the bare model."""
    registry = get_registry(model)
    previous, registry.disabled = registry.disabled, False
    try:
        yield
    finally:
        registry.disabled = previous


def proxy_generate(base: nn.Module, tuned: nn.Module, untuned: nn.Module | None = None, *, adapter: str | None = None,
                   alpha: float = 1.0, **generate_kwargs: Any) -> Any:
    """`base.generate(**generate_kwargs)` steered by proxy-tuning (`ProxyTuning` with the prompts' attention mask),
    after any logits processors passed."""
    proxy = ProxyTuning(tuned, untuned, adapter=adapter, alpha=alpha,
                        attention_mask=generate_kwargs.get("attention_mask"))
    processors = LogitsProcessorList([*(generate_kwargs.pop("logits_processor", None) or []), proxy])
    return base.generate(**generate_kwargs, logits_processor=processors)

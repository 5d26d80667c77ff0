"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., 2022, FedPara, arXiv:2108.06098; LyCORIS; HF PEFT's LOHA).

    h = W0 x + s · ((W1a W1b) ⊙ (W2a W2b)) x,   W1a, W2a ∈ R^{out×r},  W1b, W2b ∈ R^{r×in},  s = α/r

The Hadamard product of two rank-r matrices has rank up to r², from 2r(out + in) parameters. PEFT's init:
W1a, W1b, W2a Kaiming-uniform, W2b = 0, so ΔW = 0 at start. On Linear / Conv1D hosts the forward pass does not
build ΔW when r²(in + out) < in·out: (W1a W1b) ⊙ (W2a W2b) = U V with U = W1a ⊙_row-wise-Kronecker W2a (out × r²)
and V the same of W1b, W2b by columns (r² × in), so ΔW x = U (V x); otherwise (and on Conv2d) ΔW is built per
forward, as PEFT does. Conv2d: the factors cover (out, in·kh·kw) as PEFT's, or with `use_effective_conv2d`
(kernel > 1x1) PEFT's CP form, ΔW_i = einsum(T_i[r, r, kh, kw], W_ia[r, out], W_ib[r, in]) (tensors hada_t1, hada_t2).
ΔW = s·(...) merges. Tensors and fields as PEFT's LoHaConfig (`hada_w1_a`, ...); shared parts: `lycoris.py`.
Hosts: Linear, GPT-2 Conv1D (peftkit format only: PEFT has no such LoHa layer), Conv2d.
"""
from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import register_method
from .lycoris import LycorisConfig, LycorisDelta


@register_method
class LoHa(LycorisConfig):
    """LoHa config: rank r of each of the two factor pairs, s = alpha/r, PEFT's dropouts and conv form."""

    method: ClassVar[str] = "loha"
    peft_type: ClassVar[str] = "LOHA"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.(hada_(?:w[12]_[ab]|t[12]))")

    def build(self, host: nn.Module) -> "LoHaDelta":
        return LoHaDelta(host, self)


class LoHaDelta(LycorisDelta):
    """Two low-rank pairs on one host: increment(x) = s · ((W1a W1b) ⊙ (W2a W2b)) x."""

    def __init__(self, host: nn.Module, config: LoHa):
        super().__init__(host, config, rank_dropout_scale=True)  # PEFT's LoHa always rescales kept rows
        r, out_f, in_f = config.r, self.out_features, self.in_features
        cols = in_f if self.effective_conv else in_f * math.prod(self.kernel)
        if r > min(out_f, cols):
            raise ValueError(f"LoHa rank r={r} exceeds min(out, in) = min({out_f}, {cols}) of this "
                             f"{self.kind} host; use r <= {min(out_f, cols)}")
        for i in (1, 2):
            if self.effective_conv:  # PEFT's CP layout: a core per pair, both factors [r, features]
                self.register_parameter(f"hada_t{i}", nn.Parameter(torch.empty(r, r, *self.kernel, **self._factory)))
                a = torch.empty(r, out_f, **self._factory)
            else:
                a = torch.empty(out_f, r, **self._factory)
            self.register_parameter(f"hada_w{i}_a", nn.Parameter(a))
            self.register_parameter(f"hada_w{i}_b", nn.Parameter(torch.empty(r, cols, **self._factory)))
        with torch.no_grad():  # PEFT's init: everything Kaiming-uniform but W2b = 0
            for name, p in self.named_parameters():
                nn.init.zeros_(p) if name == "hada_w2_b" else nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self._factored = self.kind != "conv2d" and r * r * (in_f + out_f) < in_f * out_f

    def _pair(self, i: int) -> torch.Tensor:
        a, b = getattr(self, f"hada_w{i}_a"), getattr(self, f"hada_w{i}_b")
        if self.effective_conv:
            return torch.einsum("ijkl,jr,ip->prkl", getattr(self, f"hada_t{i}"), b, a)  # [out, in, kh, kw]
        return a @ b  # [out, in(·kh·kw)]

    def factor_weight(self) -> torch.Tensor:
        return self._pair(1) * self._pair(2)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if not self._factored:
            return super()._product(x)
        r = self.hada_w1_b.shape[0]
        u = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(-1, r * r)  # [out, r²]
        v = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, -1)  # [r², in]
        return F.linear(F.linear(x, v), u)

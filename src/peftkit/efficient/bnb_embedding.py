"""Quantized embedding tables as peftkit hosts, and the LM head tied to one: `efficient.quantize`'s `embeddings`
option (imported only when a model is quantized).

    bf16   E ≈ bf16(E)                                   2 bytes a weight
    int8   E[t] ≈ codes[t] · absmax_t / 127               1 byte a weight, one absmax per token (row)
    nf4    E ≈ code[q] · absmax_b, blocks of B along each row (double-quantized absmax as for Linear layers)

A lookup dequantizes only the rows it reads. A tied LM head (logits = h Eᵀ) reads the same stored table through
`efficient.frozen_matmul`: in chunks of rows, in the forward and again in the backward, so the float table is never
whole in memory nor kept for the backward.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.slot import deltas_of
from .bnb_linear import bnb, int8_rows, quant_state_tensors
from .frozen_matmul import frozen_linear
from .quantize import QuantizationError, QuantizeConfig, QuantizedModule

HEAD_CHUNK_ROWS = 4096  # rows of the table dequantized at once by a tied head: 9 MiB of float32 at width 576
NESTED_BLOCK = 256  # double quantization: one absmax of the absmaxes per 256 blocks (bitsandbytes')
_TAKEN = itertools.count()  # orders the states taken of every table


@dataclass(frozen=True, eq=False)
class TableState:
    """A table's stored tensors and last store's error at one moment, and when it was taken (`stored_state`)."""

    buffers: dict[str, torch.Tensor]
    error: QuantizationError | None
    taken: int


class QuantizedEmbedding(QuantizedModule, nn.Embedding):
    """A frozen embedding table stored compressed in buffers. `weight` is the dequantized float32 table, computed
    at each access (to read: a prompt initialised from vocabulary rows, a device or dtype); it cannot be assigned,
    since writing into it would change nothing stored: change the table through `store_weight`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # nn.Embedding's own __init__ would allocate a float table
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.output_dtype = dtype  # what lookups return: the dtype of the table it replaced, as the model expects
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.__dict__["tied_heads"] = []  # the TiedHeads reading this table (referenced, not submodules)
        self._undone: list[TableState] = []  # states of merges unmerged out of turn, while others are still in

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, config: QuantizeConfig) -> "QuantizedEmbedding":
        host = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, embedding.weight.dtype)
        host.configure(config)
        host._quantize(embedding.weight.detach())
        host.train(embedding.training)
        return host

    @classmethod
    def from_saved(cls, embedding: nn.Embedding, tensors: dict[str, torch.Tensor]) -> "QuantizedEmbedding":
        """A host in place of `embedding` holding the saved buffers as they are (nothing quantized)."""
        host = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, embedding.weight.dtype)
        host._keep(tensors)
        shape = (embedding.num_embeddings, embedding.embedding_dim)
        if host.dequantized_weight().shape != shape:
            raise ValueError(f"saved table has shape {tuple(host.dequantized_weight().shape)}, the model's is {shape}")
        host.train(embedding.training)
        return host

    def configure(self, config: QuantizeConfig) -> None:
        """Take what the format needs from the config (nf4: block size, double quantization)."""

    def _keep(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantized_weight()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(f"{type(self).__name__}.weight is the dequantized table, read-only: the table is "
                                 "stored compressed; change it with store_weight(table)")
        super().__setattr__(name, value)

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The dequantized rows `index` (token ids of any shape, or a slice), float32, bit for bit those of
        `dequantized_weight()`."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        return self.rows(slice(None))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).to(self.output_dtype)

    def stored_state(self) -> TableState:
        return TableState(dict(self._buffers), self.store_error, next(_TAKEN))

    def restore_state(self, state: TableState) -> None:
        """Put back the table stored before the merge that `state` came from, when it holds exactly the merges
        still in. The embedding and a head tied to it merge into this one table, and core unmerges them in model
        order, not in the reverse of their merges: a merge undone out of turn (a later one still in, or an earlier
        one already out) leaves the table as unmerging computed it (W − ΔW, quantized) until the last merge is
        undone, when the table from before all of them comes back exactly. Which merges are in is core's record
        (each merged delta's `host_state_before_merge`), so a merge that failed leaves nothing behind here."""
        others = [kept for kept in self._merged_states() if kept is not state]
        if not others:
            self._put(min([state, *self._undone], key=lambda kept: kept.taken))
            self._undone = []
        elif all(kept.taken < state.taken for kept in others) and all(u.taken > state.taken for u in self._undone):
            self._put(state)
        else:
            self._undone.append(state)

    def _merged_states(self) -> list[TableState]:
        """The states kept by the merges folded into this table now: into it or into a head tied to it."""
        return [delta.host_state_before_merge for host in (self, *self.tied_heads)
                for delta in deltas_of(host).values() if delta.merged and delta.host_state_before_merge is not None]

    def _put(self, state: TableState) -> None:
        self._keep(state.buffers)
        self.store_error = state.error

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.FORMAT}"


class BF16Embedding(QuantizedEmbedding):
    """The table in bfloat16, upcast to float32 when read."""

    FORMAT = "bf16"

    def _quantize(self, weight: torch.Tensor) -> None:
        self._keep({"table": weight.to(torch.bfloat16)})

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self.table[index].to(torch.float32)


class Int8Embedding(QuantizedEmbedding):
    """int8 codes with one absmax per row (token), bitsandbytes' vectorwise quantization, as `Linear8bitHost`."""

    FORMAT = "int8"

    def _quantize(self, weight: torch.Tensor) -> None:
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        self._keep({"codes": codes, "scales": scales})

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        return int8_rows(self.codes[index], self.scales[index])


class NF4Embedding(QuantizedEmbedding):
    """NF4 in blocks along each row (the width must be a multiple of the block size, so that a row is whole
    blocks and a lookup reads only its rows' codes and scales); the absmaxes double-quantized as configured."""

    FORMAT = "nf4"
    block_size: int = 64
    double_quant: bool = True

    def configure(self, config: QuantizeConfig) -> None:
        if self.embedding_dim % config.block_size:
            raise ValueError(f"embeddings 'nf4': width {self.embedding_dim} is not a multiple of block_size "
                             f"{config.block_size}; choose a block size dividing it, or embeddings 'int8'")
        self.block_size, self.double_quant = config.block_size, config.double_quant

    def _quantize(self, weight: torch.Tensor) -> None:
        packed, state = bnb.functional.quantize_4bit(weight.to(torch.float32).contiguous(), blocksize=self.block_size,
                                                     compress_statistics=self.double_quant, quant_type="nf4")
        self._keep({"packed": packed.view(self.num_embeddings, -1), **quant_state_tensors(state)})

    def _keep(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._keep(tensors)
        self.block_size = self.embedding_dim * self.num_embeddings // tensors["absmax"].numel()
        self.double_quant = "nested_absmax" in tensors

    def _absmax(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The block absmaxes of rows `index` as float32, (…, blocks per row). Double-quantized, only these rows'
        are dequantized: code2[q_b] · c_⌊b/256⌋ + offset for each of their blocks b, bitsandbytes' formula."""
        per_row = self.embedding_dim // self.block_size
        absmax = self.absmax.view(self.num_embeddings, per_row)[index]
        if not self.double_quant:
            return absmax
        rows = torch.arange(self.num_embeddings, device=absmax.device)[index] if isinstance(index, slice) else index
        blocks = rows[..., None] * per_row + torch.arange(per_row, device=absmax.device)
        return self.nested_code[absmax.long()] * self.nested_absmax[blocks // NESTED_BLOCK] + self.offset

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        packed, absmax = self.packed[index], self._absmax(index)
        shape = (*packed.shape[:-1], self.embedding_dim)
        state = bnb.functional.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((packed.numel() * 2 //
                                          self.embedding_dim, self.embedding_dim)), code=self.code,
                                          blocksize=self.block_size, quant_type="nf4", dtype=torch.float32)
        return bnb.functional.dequantize_4bit(packed.reshape(-1, 1), state).view(shape)


EMBEDDING_TYPES: dict[str, type[QuantizedEmbedding]] = {t.FORMAT: t for t in (BF16Embedding, Int8Embedding,
                                                                               NF4Embedding)}


def quantized_embedding(embedding: nn.Embedding, config: QuantizeConfig) -> QuantizedEmbedding:
    """A frozen copy of `embedding` stored as `config.embeddings` says."""
    return EMBEDDING_TYPES[config.embeddings].from_embedding(embedding, config)


class TiedHead(nn.Linear):
    """An output layer whose weight is tied to a quantized embedding table: logits = h Eᵀ (+ b) from the same stored
    table, never a second copy. A `core.hosts.QuantizedHost` (deltas read and merge into the shared table, as a
    merge into a tied float head changes the input embeddings too) and a `RestorableHost`; `weight` reads as the
    dequantized table. The embedding is referenced, not registered as a submodule, so it is saved and counted
    once, under its own name."""

    def __init__(self, embedding: QuantizedEmbedding, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.__dict__["embedding"] = embedding
        embedding.tied_heads.append(self)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.embedding.dequantized_weight()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError("TiedHead.weight is the tied embedding table, dequantized: read-only")
        super().__setattr__(name, value)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return frozen_linear(hidden, self.embedding.rows, self.out_features, self.bias, HEAD_CHUNK_ROWS)

    def dequantized_weight(self) -> torch.Tensor:
        return self.embedding.dequantized_weight()

    def store_weight(self, weight: torch.Tensor) -> None:
        self.embedding.store_weight(weight)

    @property
    def store_error(self) -> QuantizationError | None:
        """The table's: the head has no stored weight of its own."""
        return self.embedding.store_error

    @store_error.setter
    def store_error(self, error: QuantizationError | None) -> None:
        self.embedding.store_error = error

    def stored_state(self) -> TableState:
        return self.embedding.stored_state()

    def restore_state(self, state: TableState) -> None:
        self.embedding.restore_state(state)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to a {self.embedding.FORMAT} table"

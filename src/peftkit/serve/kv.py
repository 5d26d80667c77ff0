"""The serving engine's key/value cache: one preallocated buffer per layer, one row per running request.

Keys and values of layer l live in `keys[l]`, `values[l]`: [rows, kv heads, capacity, head size]. Row i belongs to
the i-th running request and holds its tokens at positions 0..length-1 (virtual prefix tokens first). A forward
pass over rows a..b writes each row's new tokens at its own positions (an indexed write of the new tokens only) and
attends to the buffer's first `max length` positions through a view, under a mask that hides each row's unused
positions, so no step copies the cache. Buffers grow by doubling (rows or positions) when a request needs more,
and a finished request's row is refilled by moving the last row into it: whole-cache copies happen only then.
"""
from __future__ import annotations

import torch
from transformers import Cache


def _grown(size: int, needed: int, limit: int) -> int:
    """`size` doubled until it holds `needed`, at most `limit`."""
    while size < needed:
        size *= 2
    return min(size, limit)


class SlotKVCache:
    """Per-layer [rows, heads, capacity, head size] buffers for the running requests (see the module docstring)."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_rows: int, max_length: int, dtype: torch.dtype,
                 device: torch.device, rows: int = 4, capacity: int = 128):
        self.max_rows, self.max_length, self.dtype, self.device = max_rows, max_length, dtype, device
        self.first_shape = (min(rows, max_rows), heads, min(capacity, max_length), head_dim)
        self.keys = [torch.zeros(self.first_shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(self.first_shape, dtype=dtype, device=device) for _ in range(layers)]

    def release(self) -> None:
        """Back to the first size (no request running), so a burst's memory does not stay held."""
        if self.keys[0].shape != self.first_shape:
            self.keys = [torch.zeros(self.first_shape, dtype=self.dtype, device=self.device) for _ in self.keys]
            self.values = [torch.zeros(self.first_shape, dtype=self.dtype, device=self.device) for _ in self.values]

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` positions (grown by doubling: a copy, but rarely)."""
        if length > self.max_length or rows > self.max_rows:
            raise ValueError(f"{rows} rows of {length} positions exceed the cache's limits "
                             f"({self.max_rows} rows, {self.max_length} positions)")
        new_rows, new_capacity = _grown(self.rows, rows, self.max_rows), _grown(self.capacity, length, self.max_length)
        if (new_rows, new_capacity) == (self.rows, self.capacity):
            return
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                grown = old.new_zeros(new_rows, old.shape[1], new_capacity, old.shape[3])
                grown[:old.shape[0], :, :old.shape[2]] = old
                buffers[layer] = grown

    def move_row(self, source: int, target: int, length: int) -> None:
        """Row `source`'s first `length` positions into row `target` (a finished request's row is reused)."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, :length] = buffer[source, :, :length]

    def write_prefix(self, row: int, prefix: torch.Tensor) -> None:
        """A prefix adapter's keys and values, [P, layers, 2, heads, head size], at the row's positions 0..P-1."""
        prefix = prefix.to(device=self.device, dtype=self.dtype)
        for layer in range(len(self.keys)):
            self.keys[layer][row, :, :prefix.shape[0]] = prefix[:, layer, 0].transpose(0, 1)
            self.values[layer][row, :, :prefix.shape[0]] = prefix[:, layer, 1].transpose(0, 1)

    def step(self, first_row: int, positions: torch.Tensor, new_tokens: int) -> "StepCache":
        """The cache for one forward over rows first_row.. (one per entry of `positions`, each row's first new
        token's position), each adding `new_tokens` tokens."""
        return StepCache(self, first_row, positions, new_tokens)


class StepCache(Cache):
    """What the model sees as its cache for one forward pass: writes new keys and values at each row's positions
    and returns views of the rows' buffers up to the longest row (the mask hides what a row has not written)."""

    def __init__(self, cache: SlotKVCache, first_row: int, positions: torch.Tensor, new_tokens: int):
        super().__init__(layers=[])
        self.cache, self.positions = cache, positions
        self.rows = slice(first_row, first_row + len(positions))
        self.length = int(positions.max()) + new_tokens
        index = positions[:, None] + torch.arange(new_tokens, device=positions.device)  # [rows, new tokens]
        self.row_index = torch.arange(first_row, first_row + len(positions), device=positions.device)[:, None]
        self.position_index = index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        # advanced indices around a slice put their dims first: [rows, new tokens, heads, head size]
        keys[self.row_index, :, self.position_index] = key_states.transpose(1, 2).to(keys.dtype)
        values[self.row_index, :, self.position_index] = value_states.transpose(1, 2).to(values.dtype)
        return keys[self.rows, :, :self.length], values[self.rows, :, :self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def mask(self) -> torch.Tensor:
        """[rows, 1, new tokens, length] boolean: query j of row i sees positions <= its own."""
        keys = torch.arange(self.length, device=self.positions.device)
        return (keys <= self.position_index[:, :, None])[:, None]

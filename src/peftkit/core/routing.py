"""Per-row adapter routing: the one mechanism behind mixed batches, concurrent training and serving.

A batch names, for every row, the adapter it uses (or None for the bare base). The plan
sorts rows by adapter once per forward pass; every host layer then runs one small
computation per adapter group on a contiguous segment and adds the result back with
`index_add_` (mLoRA's BatchLoRA layout), instead of a Python loop per row.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Segment = tuple[str, int, int]  # (adapter name, start, end) in sorted row order


def tensor_version(t: torch.Tensor) -> int:
    """In-place modification counter; inference-mode tensors keep none (and are read-only outside it)."""
    return -1 if t.is_inference() else t._version


class RoutingPlan:
    """Row grouping for one batch, shared by every host layer of a model."""

    def __init__(self, row_adapters: Sequence[str | None]):
        self.row_adapters = list(row_adapters)
        self.batch_size = len(self.row_adapters)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(self.row_adapters):
            if name is not None:
                groups.setdefault(name, []).append(row)
        self.groups = groups
        self.names = tuple(groups)
        self._layouts: dict[tuple[str, ...], tuple[torch.Tensor | None, list[Segment]]] = {}
        self._gathered: tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor] | None = None
        self._row_index: dict[tuple[str, ...], torch.Tensor] = {}
        self._routed_rows: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._expanded: dict[int, RoutingPlan] = {}

    def layout(self, present: tuple[str, ...]) -> tuple[torch.Tensor | None, list[Segment]]:
        """Row permutation and segments for the adapters present on one layer.

        When every adapter's rows are one contiguous run (a batch sorted by adapter), the permutation
        is None and the segments are those runs in the batch itself, so the layer uses slices and
        skips the gather and scatter. Cached: computed once per distinct set.
        """
        cached = self._layouts.get(present)
        if cached is not None:
            return cached
        runs = [self.groups[name] for name in present]
        if all(rows[-1] - rows[0] == len(rows) - 1 for rows in runs):  # rows are ascending, so this means contiguous
            layout: tuple[torch.Tensor | None, list[Segment]] = (
                None, [(name, rows[0], rows[-1] + 1) for name, rows in zip(present, runs)])
        else:
            order: list[int] = []
            segments: list[Segment] = []
            for name, rows in zip(present, runs):
                segments.append((name, len(order), len(order) + len(rows)))
                order.extend(rows)
            layout = (torch.tensor(order, dtype=torch.long), segments)
        self._layouts[present] = layout
        return layout

    def row_index(self, present: tuple[str, ...]) -> torch.Tensor:
        """For every row, its adapter's position in `present` (len(present): no adapter here). Cached."""
        cached = self._row_index.get(present)
        if cached is None:
            position = {name: i for i, name in enumerate(present)}
            cached = torch.tensor([position.get(name, len(present)) for name in self.row_adapters], dtype=torch.long)
            self._row_index[present] = cached
        return cached

    def routed_rows(self, present: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows whose adapter is in `present` (ascending), and for each its adapter's position there. Cached."""
        cached = self._routed_rows.get(present)
        if cached is None:
            index = self.row_index(present)
            rows = (index < len(present)).nonzero().flatten()
            cached = self._routed_rows[present] = (rows, index[rows])
        return cached

    def gather(self, x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        """`x` with rows in plan order. Sibling layers fed the same tensor (q, k, v) share one gather."""
        if perm is None:
            return x
        last = self._gathered
        if last is not None and last[0] is x and last[1] == tensor_version(x) and last[2] is perm:
            return last[3]
        gathered = x.index_select(0, perm.to(x.device))
        self._gathered = (x, tensor_version(x), perm, gathered)
        return gathered

    def for_rows(self, rows: int, where: str) -> "RoutingPlan":
        """The plan for a batch of `rows` rows: this one, or for k·batch rows each name repeated k times in place
        (row j uses row j // k's adapter), as `generate` expands a batch for k beams or k returned sequences."""
        if rows == self.batch_size:
            return self
        if rows and self.batch_size and rows % self.batch_size == 0:
            expanded = self._expanded.get(rows)
            if expanded is None:
                k = rows // self.batch_size
                expanded = self._expanded[rows] = RoutingPlan([name for name in self.row_adapters for _ in range(k)])
            return expanded
        raise ValueError(f"per-row routing names {self.batch_size} rows but {where} got {rows} rows along dim 0; "
                         "routing needs the batch dimension first, with one name per row (or per row's k beams)")

    def release(self) -> None:
        """Drop cached tensors so a finished batch's activations are not kept alive."""
        self._gathered = None
        for plan in self._expanded.values():
            plan.release()

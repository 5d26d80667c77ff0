"""BitDelta: Your Fine-Tune May Only Be Worth One Bit (Liu et al., 2024, arXiv:2402.10193).

    h = W_base x + α · S x,   S = sign(W_ft − W_base) ∈ {−1,+1}^{out×in},   α₀ = mean |W_ft − W_base|

A full fine-tune's weight delta on each Linear becomes one bit per entry (the sign, packed eight to a byte)
and one scale per matrix. α₀ is the L2-optimal scale of a sign matrix (argmin_α ‖ΔW − α S‖ = mean |ΔW|);
`distill_scales` then fits the α's alone so that the compressed model's outputs match the fine-tune's
(min_α E‖f(x; α) − f_ft(x)‖², the paper's logit distillation). ΔW = α S merges into W_base.

`compress` builds the adapter from the two models. What else the fine-tune changed travels exactly, in float32:
a sign-compressed Linear's bias change Δb; the changed entries of every other changed module (LayerNorms,
embedding rows, Linear layers left out of the targets) as selective deltas on them (`exact`); and task heads
(`heads`) as whole copies of the fine-tuned module, since a freshly drawn head is not a delta of anything.
A changed parameter none of these can hold (a module type without a selective delta, a buffer) is refused.

Hosts: Linear and GPT-2's Conv1D (signs); `exact` modules: Linear, Conv1D, Conv2d, Embedding, LayerNorm, RMSNorm.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr
from torch import nn

from ...api import attach
from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta, ModuleCopy
from ...core.hosts import LINEAR_TYPES, host_shape, to_host_layout
from ...core.registry import REGISTRY_ATTR, adapter_deltas, get_registry
from ...core.routing import tensor_version
from ...core.slot import is_delta_parameter
from ...core.targets import TargetError, match_targets, module_names
from ..selective.mask import Mask
from ..selective.sparse import SPARSE_HOST_TYPES, SparseDelta
from .lora import BiasChange

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # bit 7 holds the first entry of a byte


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out, ⌈in/8⌉] uint8: bit set where delta ≥ 0 (S = +1; an unchanged entry gets +1, α·S ≈ 0 only
    on average, as in the paper), eight entries per byte, the last byte zero-padded."""
    positive = F.pad(delta >= 0, (0, -delta.shape[-1] % 8)).view(delta.shape[0], -1, 8)
    return (positive.to(torch.uint8) * _BIT_WEIGHTS.to(delta.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, ⌈in/8⌉] uint8 -> S [out, in] of ±1 in `dtype` (the inverse of `pack_signs`)."""
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.view(packed.shape[0], -1)[:, :in_features].to(dtype).mul_(2).sub_(1)


@register_method
class BitDelta(AdapterConfig):
    """BitDelta config: the Linear layers whose delta is signs and a scale, and the modules whose changes are exact."""

    method: ClassVar[str] = "bitdelta"
    not_trained_by_run: ClassVar[str | None] = (
        "it compresses a finished fine-tune: make it with peftkit.bitdelta.compress(base, finetuned), then fit its "
        "scales with distill_scales")
    exact: list[str] = Field([], description="modules whose changed entries travel exactly in float32 (LayerNorms, "
                                             "embedding rows, untargeted Linear layers): names or dotted suffixes")
    _exact_hosts: frozenset[str] = PrivateAttr(frozenset())  # set by choose_hosts

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def choose_hosts(self, model: nn.Module) -> list[str]:
        """The sign-compressed targets, then the `exact` modules (each host is one or the other)."""
        signs = super().choose_hosts(model)
        exact = match_targets(model, self.exact, None, SPARSE_HOST_TYPES) if self.exact else []
        both = sorted(set(signs) & set(exact))
        if both:
            raise TargetError(f"modules both sign-compressed (targets) and exact: {both[:5]}")
        self._exact_hosts = frozenset(exact)
        return signs + exact

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        for name, host in hosts.items():
            # exact changes start unselected: `compress` installs the changed entries, a file its saved ones
            yield SparseDelta(host, ("weight", "bias")) if name in self._exact_hosts else self.build(host)

    def build(self, host: nn.Module) -> "BitDeltaDelta":
        return BitDeltaDelta(host)


class BitDeltaDelta(Delta):
    """One Linear's compressed delta: increment(x) = α · S x + Δb, S stored packed (`sign_bits`), α trainable."""

    def __init__(self, host: nn.Module):
        super().__init__()
        shape = host_shape(host)
        self.in_features = shape.in_features
        device = host.weight.device
        self.register_buffer("sign_bits", torch.zeros(shape.out_features, math.ceil(shape.in_features / 8),
                                                       dtype=torch.uint8, device=device))
        self.scale = nn.Parameter(torch.zeros((), dtype=torch.float32, device=device))  # α = 0: a no-op until compressed
        self.bias_change = BiasChange(host) if isinstance(getattr(host, "bias", None), nn.Parameter) else None
        self._unpacked: tuple[tuple, torch.Tensor] | None = None  # (what it was unpacked from, S): never saved

    @torch.no_grad()
    def compress(self, weight_change: torch.Tensor, bias_change: torch.Tensor | None) -> None:
        """S = sign(ΔW), α = mean |ΔW| for ΔW in (out, in) layout; Δb kept exactly."""
        self.sign_bits.copy_(pack_signs(weight_change))
        self.scale.copy_(weight_change.float().abs().mean())
        if self.bias_change is not None:
            self.bias_change.bias.values.copy_(bias_change)

    def signs(self, dtype: torch.dtype) -> torch.Tensor:
        """S [out, in] in `dtype`, unpacked once per dtype and packed tensor (a load or a move unpacks again; so does
        autograd after inference mode, whose tensors it cannot save)."""
        bits = self.sign_bits
        key = (bits.data_ptr(), tensor_version(bits), bits.device, dtype)
        if (self._unpacked is None or self._unpacked[0] != key
                or (self._unpacked[1].is_inference() and not torch.is_inference_mode_enabled())):
            self._unpacked = key, unpack_signs(bits, self.in_features, dtype)
        return self._unpacked[1]

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale * F.linear(x, self.signs(x.dtype))  # α as a 0-dim tensor keeps x's dtype
        return out if self.bias_change is None else self.bias_change.transform(x, out)  # + Δb

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.signs(torch.float32)  # [out, in]

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        bits = saved.get("sign_bits")
        if bits is not None and bits.dtype != torch.uint8:  # a float file tensor would be cast, not unpacked
            raise ValueError(f"sign_bits must be packed uint8, got {bits.dtype}")

    def merge_into(self, host: nn.Module) -> None:
        super().merge_into(host)
        self._fold_bias(host, merge=True)

    def unmerge_from(self, host: nn.Module) -> None:
        super().unmerge_from(host)
        self._fold_bias(host, merge=False)

    def _fold_bias(self, host: nn.Module, merge: bool) -> None:
        """Δb into the host's bias (merge) or back out of it."""
        if self.bias_change is not None:
            (self.bias_change.merge_into if merge else self.bias_change.unmerge_from)(host)


def _own_parameters(model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """The model's own parameters by name; a model with merged adapters would give merged weights: refused."""
    registry = model.__dict__.get(REGISTRY_ATTR)
    if registry is not None and registry.merged:
        raise ValueError(f"the {what} model has adapters {sorted(registry.merged)} merged into its weights: unmerge "
                         "them (or unload the fine-tune into a plain model) before compressing")
    return {n: p.detach() for n, p in model.named_parameters() if not is_delta_parameter(n)}


def _changed_buffers(base: nn.Module, tuned: nn.Module) -> list[str]:
    tuned_buffers = dict(tuned.named_buffers())
    return [n for n, b in base.named_buffers() if not is_delta_parameter(n) and n in tuned_buffers
            and b.is_floating_point() and not torch.equal(b, tuned_buffers[n])]


def _check_same_architecture(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(base.keys() - tuned.keys()), sorted(tuned.keys() - base.keys())
    shapes = [n for n in base.keys() & tuned.keys() if base[n].shape != tuned[n].shape]
    if missing or extra or shapes:
        raise ValueError(f"the fine-tuned model is not the base's architecture: parameters missing {missing[:3]}, "
                         f"extra {extra[:3]}, of other shapes {sorted(shapes)[:3]}")


def _exact_modules(model: nn.Module, changed: Iterable[str], covered: set[str]) -> list[str]:
    """The modules owning changed parameters that neither signs nor heads hold: each must take a selective delta."""
    owners = {}
    for param in changed:
        owner, _, leaf = param.rpartition(".")
        if owner not in covered and not any(owner.startswith(f"{c}.") for c in covered):
            owners.setdefault(owner, []).append(leaf)
    wrong = [f"{o}.{leaf} ({type(model.get_submodule(o)).__name__})" for o, leaves in owners.items() for leaf in leaves
             if not isinstance(model.get_submodule(o), SPARSE_HOST_TYPES) or leaf not in ("weight", "bias")]
    if wrong:
        raise ValueError(f"the fine-tune changed parameters BitDelta cannot carry exactly: {wrong[:5]}; make their "
                         "modules heads (whole copies) or leave them unchanged in the fine-tune")
    order = module_names(model)
    return sorted(owners, key=order.index)


def _changed_entries(change: torch.Tensor) -> Mask:
    """The entries a fine-tune changed: whole rows of a matrix (embedding rows), elements of a vector."""
    moved = change != 0
    if change.dim() >= 2:
        return Mask.slices(0, moved.flatten(1).any(1).nonzero().flatten())
    return Mask.elements(moved.nonzero().flatten())


@torch.no_grad()
def compress(base_model: nn.Module, finetuned_model: nn.Module, targets: str | list[str] = "all-linear",
             name: str = "default", exclude: str | list[str] | None = None, heads: Sequence[str] = ()) -> nn.Module:
    """Attach BitDelta adapter `name` to `base_model` that turns it into `finetuned_model` (same architecture):
    signs and α₀ = mean |ΔW| on the targeted Linear layers whose weight changed (minus `exclude` and `heads`), Δb
    exact, every other changed module's changed entries exact (`BitDelta.exact`), and `heads` as copies of the
    fine-tuned modules.
    Returns `base_model`; `distill_scales` then fits the α's."""
    base, tuned = _own_parameters(base_model, "base"), _own_parameters(finetuned_model, "fine-tuned")
    _check_same_architecture(base, tuned)
    buffers = _changed_buffers(base_model, finetuned_model)
    if buffers:
        raise ValueError(f"the fine-tune changed buffers {buffers[:5]} (running statistics?); BitDelta carries "
                         "parameters only")
    head_names = match_targets(base_model, list(heads)) if heads else []
    changed = [n for n in base if not torch.equal(base[n], tuned[n])]
    moved = set(changed)  # a Linear whose weight the fine-tune left alone gets no signs (S·α would add noise)
    signs = [n for n in match_targets(base_model, targets, exclude, LINEAR_TYPES)
             if n not in head_names and f"{n}.weight" in moved]
    if not signs:
        raise ValueError(f"the fine-tune changed no weight of the targeted Linear layers ({targets!r}): nothing to "
                         "compress to signs")
    exact = _exact_modules(base_model, changed, set(signs) | set(head_names))
    config = BitDelta(targets=signs, exact=exact, modules_to_save=head_names)
    attach(base_model, config, name=name)
    for host_name, host, delta in adapter_deltas(base_model, name):
        prefix = f"{host_name}." if host_name else ""
        change = {leaf: tuned[f"{prefix}{leaf}"] - base[f"{prefix}{leaf}"]
                  for leaf in ("weight", "bias") if f"{prefix}{leaf}" in base}
        if isinstance(delta, BitDeltaDelta):
            delta.compress(to_host_layout(host, change["weight"]), change.get("bias"))
        elif isinstance(delta, SparseDelta):
            delta.install({leaf: _changed_entries(value) for leaf, value in change.items() if leaf in delta.param_names})
            for leaf, diff in delta.diffs():
                diff.values.copy_(diff.pick(change[leaf]))
        else:  # a head: the fine-tuned module itself
            tuned_head = finetuned_model.get_submodule(host_name).state_dict()
            delta.module.load_state_dict({k: v for k, v in tuned_head.items() if not is_delta_parameter(k)})
    return base_model


def _logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's output for a batch (a dict of inputs or one tensor): `.logits` of a transformers output."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    out = getattr(out, "logits", out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"distillation matches output tensors or `.logits`; the model returned {type(out).__name__}")
    return out


def distill_scales(model: nn.Module, name: str, teacher: nn.Module, batches: Sequence[Any], steps: int = 50,
                   lr: float = 1e-4) -> list[float]:
    """Fit adapter `name`'s scales α (nothing else) so that `model`'s outputs match `teacher`'s on `batches`:
    min_α mean ‖f(x; α) − f_teacher(x)‖² with Adam, `steps` steps cycling through the batches, dropout off.
    Returns each step's loss. The adapter must be active and unmerged."""
    registry = get_registry(model)
    if registry.require(name).method != BitDelta.method:
        raise ValueError(f"adapter {name!r} is {registry.configs[name].method}, not bitdelta")
    if name not in registry.active or name in registry.merged:
        raise ValueError(f"adapter {name!r} must be active and unmerged to distil its scales "
                         f"(active {registry.active}, merged {sorted(registry.merged)})")
    if not batches or steps < 1:
        raise ValueError(f"distillation needs batches and steps >= 1 (got {len(batches)} batches, {steps} steps)")
    scales = [delta.scale for _, _, delta in adapter_deltas(model, name) if isinstance(delta, BitDeltaDelta)]
    modes = [(module, module.training) for module in (model, teacher)]
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    teacher.eval()
    model.requires_grad_(False)
    for scale in scales:
        scale.requires_grad_(True)
    try:
        with torch.no_grad():
            targets = [_logits(teacher, batch) for batch in batches]
        optimizer = torch.optim.Adam(scales, lr=lr)
        losses = []
        for step in range(steps):
            loss = F.mse_loss(_logits(model, batches[step % len(batches)]), targets[step % len(batches)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
    finally:
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        for module, training in modes:
            module.train(training)

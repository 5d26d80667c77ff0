"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): zeroth-order SGD with the
seed trick, as an optimizer any method (and `method: full`) trains with.

One step, for a seed s drawn for it and z ~ N(0, I) regenerated from s whenever it is needed:

    θ ← θ + εz;  L+ = L(θ)          (forward under no_grad)
    θ ← θ − 2εz; L− = L(θ)
    g = (L+ − L−) / (2ε)            (the projected gradient: the SPSA estimate of ∇L · z)
    θ ← θ + εz                      (back to θ: the paper's reset)
    θ ← θ − lr · (g · z + λ · θ)    (the update; reset and update are done in one regeneration of z)

No backward runs, no gradient is stored and no perturbation is kept: z is drawn again, parameter by parameter (a large
one in chunks), from the seed each time, so a step holds the parameters, one chunk of noise and the forward's own
activations: what inference holds. `peftkit train` takes it as `optimizer: {name: mezo, lr: ..., eps: 1e-3}`;
`MultiJobTrainer` as a job's optimizer factory (`optimizer=lambda groups: MeZO(groups, lr=..., eps=...)`). The
engine (`train.engine`) runs the two forwards of every MeZO run in its shared passes, with the same random draws for
both (dropout masks), so their difference is the perturbation's alone. A step's seed is a hash of the optimizer's
seed and its step count, which its state dict holds: a resumed run draws the same noise.

Restoring θ after the two perturbations is exact up to float rounding only: θ + εz rounds, and the rounding cannot be
undone without keeping θ (a copy the size of what trains, which MeZO exists to avoid); the paper's code does the same.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

EPS = 1e-3  # the paper's perturbation scale
CHUNK = 2**18  # values of noise drawn at once (1 MiB in fp32): the step's only memory beyond a forward's


class MeZOError(ValueError):
    """A run MeZO cannot train: a method or an option that needs gradients, or parameters it cannot move in place."""


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD (see the module docstring): `lr` and `weight_decay` per parameter group, one `eps` for all
    (the scale of the perturbation the projected gradient divides by), `seed` for the steps' noise.

    The engine drives a step: `perturb(1)`, the forwards, `perturb(-2)`, the forwards, then `step(g)` (or, to give
    up the step, `perturb(1)`)."""

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float, eps: float = EPS,
                 weight_decay: float = 0.0, seed: int = 0):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"MeZO needs lr >= 0, eps > 0 and weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        strided = [list(p.shape) for group in self.param_groups for p in group["params"] if not p.is_contiguous()]
        if strided:
            raise MeZOError(f"MeZO moves parameters in place through flat views; parameters of shapes {strided[:3]} "
                            "are not contiguous")
        self.eps, self.seed, self.steps = eps, seed, 0

    def step_seed(self) -> int:
        """The seed of this step's z: a hash of (seed, steps taken), the same in every process of a run."""
        digest = hashlib.blake2b(f"{self.seed}/{self.steps}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # a non-negative int64

    def _noise(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """(a flat chunk of a parameter, its z, the parameter's group), in parameter order, drawn from this step's
        seed by one generator per device."""
        seed, generators = self.step_seed(), {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(param.device).manual_seed(seed)
                for chunk in param.detach().view(-1).split(CHUNK):
                    noise = torch.randn(chunk.shape, generator=generators[param.device], device=chunk.device,
                                        dtype=chunk.dtype)
                    yield chunk, noise, group

    @torch.no_grad()
    def perturb(self, scale: float) -> None:
        """θ ← θ + scale · ε · z."""
        for chunk, noise, _ in self._noise():
            chunk.add_(noise, alpha=scale * self.eps)

    @torch.no_grad()
    def step(self, projected_grad: float) -> None:  # type: ignore[override]
        """The update, from θ − εz: θ ← (θ − εz + εz) · (1 − lr·λ) − lr · g · z, z regenerated once; then the next
        step's seed. (Named `step` as torch's schedulers expect.)"""
        for chunk, noise, group in self._noise():
            decay = 1 - group["lr"] * group["weight_decay"]
            chunk.mul_(decay).add_(noise, alpha=self.eps * decay - group["lr"] * projected_grad)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.steps = state.pop("steps")
        super().load_state_dict(state)


def check_zeroth_order(method: BaseModel, max_grad_norm: float | None) -> None:
    """Refuse what MeZO cannot train: a method (or a hybrid's part) whose training reads gradients
    (`AdapterConfig.needs_gradients`), and gradient clipping (there is no gradient to clip)."""
    for config in _nested(method):
        reason = getattr(config, "needs_gradients", None)
        if reason:
            raise MeZOError(f"method {config.method} cannot train with MeZO, which computes no gradients: {reason}")
    if max_grad_norm is not None:
        raise MeZOError("max_grad_norm clips gradients, and MeZO computes none: leave it unset")


def _nested(value: Any) -> Iterator[BaseModel]:
    """Every config in `value`: itself and those in its fields, at any depth (a hybrid's parts, a group's parts)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _nested(item)
    elif isinstance(value, BaseModel):
        yield value
        for name in type(value).model_fields:
            yield from _nested(getattr(value, name))

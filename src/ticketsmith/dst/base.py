"""What every dynamic sparse trainer shares: layer budgets, the update schedule, dense-gradient
capture, holding pruned weights at zero, momentum of grown weights, checkpoints and statistics.

Lifecycle (the torch.ao.pruning / RigL-scheduler convention)::

    s = SRigL(model, optimizer, sparsity=0.9, total_steps=N)   # masks + sparse init, in place
    for x, y in data:
        optimizer.zero_grad(); loss(model(x), y).backward(); optimizer.step()
        s.step()                                                # may update the masks
    s.masks                                                     # the learned Masks

Schedule: steps are counted by `step()` calls. A mask update runs after step t when
t % delta_t == 0 and t < T_end = floor(t_end * total_steps); it drops the fraction
f(t) = alpha / 2 * (1 + cos(pi * t / T_end)) of a layer's active weights. The dense gradient
(before masking) is summed over the `grad_accumulation` backward passes that precede each update
(and averaged over processes when torch.distributed is initialised).

Grown weights (active now, inactive before the update) start at exactly zero and every optimizer
buffer of their shape (SGD momentum, Adam moments) is zeroed there; dropped weights and their
buffers are zeroed by the mask hold (`ticketsmith.masks.MaskHold`), which also re-zeroes pruned
weights after every `optimizer.step()`. Gradients of pruned weights are masked by a tensor hook
that first records the dense gradient when an update is near.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ArtifactError, UsageError
from ..masks import Masks, prunable_names
from .erk import DISTRIBUTIONS, layer_budgets

RELU_GAIN = math.sqrt(2.0)  # the zoo's He-normal init (ticketsmith.models.init_weights)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _keys(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Unique int64 sort keys for non-negative scores along the last dimension: the score's
    float32 bit pattern (monotone for non-negative floats), then the earlier position first;
    non-candidates get -1, below every candidate. Unique keys make any selection (kthvalue,
    topk) exact and deterministic, ties included, without a full stable sort."""
    bits = scores.detach().float().contiguous().view(torch.int32).to(torch.int64)
    pos = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    keys = (bits << 32) + ((1 << 32) - 1 - pos)
    return torch.where(candidates, keys, torch.tensor(-1, dtype=torch.int64, device=keys.device))


def top_mask(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring candidate entries (fewer if there are fewer candidates).
    Scores are non-negative; ties go to the earlier position, so the result is deterministic."""
    count = max(0, min(int(count), int(candidates.sum())))
    if count == 0:
        return torch.zeros_like(candidates)
    keys = _keys(scores.flatten(), candidates.flatten())
    threshold = torch.kthvalue(keys, keys.numel() - count + 1).values  # the count-th largest
    return (keys >= threshold).view_as(candidates)


def top_per_row(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor | int
                ) -> torch.Tensor:
    """Per row i of a 2-D score matrix, the `counts[i]` highest-scoring candidates (fewer if the
    row has fewer candidates). Scores are non-negative; ties go to the earlier column."""
    rows, cols = scores.shape
    if not isinstance(counts, torch.Tensor):
        counts = torch.full((rows,), int(counts), device=scores.device)
    counts = counts.to(scores.device).clamp(0, cols)
    kmax = int(counts.max()) if rows else 0
    out = torch.zeros_like(candidates)
    if kmax == 0:
        return out
    order = _keys(scores, candidates).topk(kmax, dim=1, sorted=True).indices
    take = torch.arange(kmax, device=scores.device)[None, :] < counts[:, None]
    return out.scatter_(1, order, take) & candidates


class DynamicSparsifier:
    """Base of `RigL`, `SET` and `SRigL`: a sparsifier you call `step()` on after every
    `optimizer.step()`. Subclasses define the initial mask and one layer's mask update."""

    method: ClassVar[str] = ""
    needs_dense_grad: ClassVar[bool] = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float,
                 total_steps: int, *, delta_t: int = 100, t_end: float = 0.75, alpha: float = 0.3,
                 distribution: str = "erk", dense_layers: Sequence[str] = (),
                 grad_accumulation: int = 1, include_head: bool = False,
                 include_first: bool = True, sparse_init: bool = True, seed: int = 0):
        self.model, self.optimizer = model, optimizer
        if isinstance(dense_layers, str):
            dense_layers = [dense_layers]
        self.settings: dict[str, Any] = dict(
            sparsity=sparsity, total_steps=total_steps, delta_t=delta_t, t_end=t_end, alpha=alpha,
            distribution=distribution, dense_layers=list(dense_layers),
            grad_accumulation=grad_accumulation, include_head=include_head,
            include_first=include_first, sparse_init=sparse_init, seed=seed)
        self.settings.update(self._extra_settings())
        # ---- validate everything before touching the model ----
        self._validate_settings()
        self.names = prunable_names(model, include_head, include_first)
        self.output_layer = prunable_names(model, include_head=True)[-1]
        self._params = dict(model.named_parameters())
        dense = self._resolve_dense(dense_layers)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for n in self.names:
            if id(self._params[n]) not in in_opt:
                raise UsageError(f"layer {n!r} is not among the optimizer's parameters; build the "
                                 "sparsifier with the optimizer that trains the model")
        shapes = {n: tuple(self._params[n].shape) for n in self.names}
        self.budgets: dict[str, int] = layer_budgets(shapes, sparsity, distribution, dense)
        self.sparse_names = [n for n in self.names
                             if self.budgets[n] < self._params[n].numel()]
        if not self.sparse_names:
            raise UsageError(f"nothing to sparsify: every prunable layer of "
                             f"{type(model).__name__} would be dense at sparsity {sparsity}")
        for n in self.sparse_names:
            self._check_budget(n, self.budgets[n], self._rows_cols(n))
        self.T_end = int(math.floor(t_end * total_steps))
        self._gen = torch.Generator().manual_seed(int(seed))
        masks = {n: self._initial_mask(n, self.budgets[n], self._rows_cols(n)) for n in self.sparse_names}
        weights = {n: self._initial_weights(n, masks[n]) for n in self.sparse_names}
        # ---- apply ----
        with torch.no_grad():
            for n in self.sparse_names:
                self._params[n].copy_(weights[n].reshape(self._params[n].shape))
        self._step = 0
        self._updates = 0
        self._last: dict[str, dict[str, int]] = {}
        self._dense_grad: dict[str, torch.Tensor] = {}
        self._set_masks({n: m.reshape(self._params[n].shape) for n, m in masks.items()}, init=True)
        self._grad_handles = [self._params[n].register_hook(lambda g, n=n: self._grad_hook(n, g))
                              for n in self.sparse_names]

    # -- subclass seams ------------------------------------------------------------------------
    def _extra_settings(self) -> dict[str, Any]:
        return {}

    def _validate_extra(self) -> None:
        pass

    def _check_budget(self, name: str, budget: int, shape: tuple[int, int]) -> None:
        if budget < 1:
            raise UsageError(f"layer {name!r} would keep no weight at sparsity "
                             f"{self.settings['sparsity']}; lower the sparsity or keep it dense")

    def _initial_mask(self, name: str, budget: int, shape: tuple[int, int]) -> torch.Tensor:
        """The layer's starting mask as a c_out x n bool matrix (CPU, drawn from self._gen)."""
        raise NotImplementedError

    def _update_layer(self, name: str, w: torch.Tensor, g: torch.Tensor | None,
                      m: torch.Tensor, fraction: float) -> torch.Tensor:
        """The layer's new c_out x n mask from weights `w`, dense gradient `g`, mask `m`."""
        raise NotImplementedError

    def _check_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Raise if loaded masks violate the method's invariants (budget, fan-in)."""
        for n, m in masks.items():
            if int(m.sum()) != self.budgets[n]:
                raise ArtifactError(f"sparsifier checkpoint: layer {n!r} keeps {int(m.sum())} "
                                    f"weights, its budget is {self.budgets[n]}")

    # -- validation ----------------------------------------------------------------------------
    def _validate_settings(self) -> None:
        s = self.settings
        if not (_is_number(s["sparsity"]) and 0 < s["sparsity"] < 1):
            raise UsageError(f"sparsity must be in (0, 1), got {s['sparsity']!r}")
        if not (_is_int(s["delta_t"]) and s["delta_t"] >= 1):
            raise UsageError(f"delta_t (steps between mask updates) must be an integer >= 1, "
                             f"got {s['delta_t']!r}")
        if not _is_int(s["total_steps"]) or s["total_steps"] < s["delta_t"]:
            raise UsageError(f"total_steps ({s['total_steps']!r}) must be an integer at least "
                             f"delta_t ({s['delta_t']}): no mask update would ever happen")
        if not (_is_number(s["t_end"]) and 0 < s["t_end"] <= 1):
            raise UsageError(f"t_end (fraction of training with mask updates) must be in (0, 1], "
                             f"got {s['t_end']!r}")
        if math.floor(s["t_end"] * s["total_steps"]) <= s["delta_t"]:
            raise UsageError(f"no mask update would happen: the first is due at step delta_t = "
                             f"{s['delta_t']}, updates stop at t_end * total_steps = "
                             f"{math.floor(s['t_end'] * s['total_steps'])}; lower delta_t")
        if not (_is_number(s["alpha"]) and 0 <= s["alpha"] <= 1):
            raise UsageError(f"alpha (initial drop fraction) must be in [0, 1], got {s['alpha']!r}")
        if s["distribution"] not in DISTRIBUTIONS:
            raise UsageError(f"unknown layer distribution {s['distribution']!r}; choose one of: "
                             f"{', '.join(DISTRIBUTIONS)}")
        if not (_is_int(s["grad_accumulation"]) and 1 <= s["grad_accumulation"] <= s["delta_t"]):
            raise UsageError(f"grad_accumulation must be an integer in [1, delta_t = "
                             f"{s['delta_t']}], got {s['grad_accumulation']!r}")
        if not _is_int(s["seed"]):
            raise UsageError(f"seed must be an integer, got {s['seed']!r}")
        for flag in ("include_head", "include_first", "sparse_init"):
            if not isinstance(s[flag], bool):
                raise UsageError(f"{flag} must be True or False, got {s[flag]!r}")
        self._validate_extra()

    def _resolve_dense(self, dense_layers: Sequence[str]) -> list[str]:
        out = []
        for d in dense_layers:
            name = d if d in self.names else f"{d}.weight"
            if name not in self.names:
                raise UsageError(f"dense layer {d!r} is not one of the prunable layers: "
                                 f"{', '.join(self.names)}")
            out.append(name)
        return out

    def _rows_cols(self, name: str) -> tuple[int, int]:
        p = self._params[name]
        return p.shape[0], p.numel() // p.shape[0]

    # -- init ----------------------------------------------------------------------------------
    def _initial_weights(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """Masked weights, re-drawn He-normal with each neuron's *sparse* fan-in when
        `sparse_init` (std = sqrt(2 / fan_in)); otherwise the model's own weights, masked."""
        p = self._params[name]
        if not self.settings["sparse_init"]:
            return p.detach().reshape(mask.shape) * mask.to(p.device, p.dtype)
        fan_in = mask.sum(1, keepdim=True).clamp(min=1).to(torch.float64)
        w = torch.randn(mask.shape, generator=self._gen, dtype=torch.float64)
        w = (w * (RELU_GAIN / fan_in.sqrt()) * mask).to(p.dtype)
        return w.to(p.device)

    # -- masks ---------------------------------------------------------------------------------
    def _set_masks(self, masks: dict[str, torch.Tensor], init: bool = False) -> None:
        """Install new masks (param-shaped bool tensors): hold pruned weights at zero."""
        self._masks = {n: m.detach().to("cpu", torch.bool) for n, m in masks.items()}
        self._f = {n: m.to(self._params[n].device, self._params[n].dtype)
                   for n, m in self._masks.items()}
        sparse = Masks(self._masks)
        if init:
            self._hold = sparse.hold(self.model, self.optimizer, mask_grads=False)
        else:
            self._hold.update(sparse)
        self._cached: Masks | None = None

    @property
    def masks(self) -> Masks:
        """The current masks over every selected prunable layer (dense ones all True)."""
        if self._cached is None:
            self._cached = Masks({n: self._masks[n] if n in self._masks else
                                  torch.ones(self._params[n].shape, dtype=torch.bool)
                                  for n in self.names})
        return self._cached

    # -- schedule --------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far (calls to `step()`)."""
        return self._step

    def drop_fraction(self, t: int) -> float:
        """f(t) = alpha / 2 * (1 + cos(pi * t / T_end)): the fraction dropped at step t."""
        return self.settings["alpha"] / 2 * (1 + math.cos(math.pi * t / self.T_end))

    def is_update_step(self, t: int) -> bool:
        """Whether the masks are updated after optimizer step t (1-based)."""
        return t > 0 and t % self.settings["delta_t"] == 0 and t < self.T_end

    def _capturing(self) -> bool:
        # The backward pass now running belongs to optimizer step t = self._step + 1.
        if not self.needs_dense_grad:
            return False
        t, dt = self._step + 1, self.settings["delta_t"]
        u = -(-t // dt) * dt  # the first update step at or after t
        return self.is_update_step(u) and u - t < self.settings["grad_accumulation"]

    def _grad_hook(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if self._capturing():
            d = self._dense_grad.get(name)
            self._dense_grad[name] = g.detach().clone() if d is None else d + g.detach()
        return g * self._f[name]

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> None:
        """Call after every optimizer.step(): counts the step and updates the masks when due."""
        self._step += 1
        if self.is_update_step(self._step):
            self._update(self.drop_fraction(self._step))
            self._dense_grad = {}

    @torch.no_grad()
    def _update(self, fraction: float) -> None:
        grads = self._reduced_grads()
        new_masks, grown_masks = {}, {}
        self._last = {}
        for n in self.sparse_names:
            p = self._params[n]
            rows, cols = self._rows_cols(n)
            m = self._masks[n].to(p.device).reshape(rows, cols)
            g = grads.get(n)
            new = self._update_layer(n, p.detach().reshape(rows, cols),
                                     None if g is None else g.reshape(rows, cols), m, fraction)
            grown = new & ~m
            self._last[n] = {"grown": int(grown.sum()), "dropped": int((m & ~new).sum())}
            new_masks[n] = new.reshape(p.shape)
            grown_masks[n] = grown.reshape(p.shape)
        for n, grown in grown_masks.items():
            p = self._params[n]
            p.masked_fill_(grown, 0.0)  # grown weights start at exactly zero ...
            for buf in self.optimizer.state.get(p, {}).values():  # ... with no momentum
                if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                    buf.masked_fill_(grown, 0)
        self._set_masks(new_masks)  # zeroes dropped weights and their optimizer buffers
        self._updates += 1

    def _reduced_grads(self) -> dict[str, torch.Tensor]:
        grads = self._dense_grad
        dist = torch.distributed
        if (self.needs_dense_grad and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            for n in self.sparse_names:  # every rank must take the same decisions
                g = grads.get(n)
                if g is None:
                    g = grads[n] = torch.zeros_like(self._params[n])
                dist.all_reduce(g)
                g /= dist.get_world_size()
        return grads

    def _random_scores(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform random scores from the sparsifier's own generator (same on every device)."""
        return torch.rand(shape, generator=self._gen).to(device)

    # -- statistics --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """JSON-able mask statistics: the step, the drop fraction now, the global sparsity, and
        per layer: neurons, active (non-ablated) neurons, fan-in of the active neurons
        (`fan_in`: the constant k for SRigL, the mean otherwise; min and max), nonzeros,
        budget, density, and what the last update grew and dropped."""
        layers = {}
        for n in self.names:
            m = self.masks[n]
            rows = m.reshape(m.shape[0], -1)
            per_row = rows.sum(1)
            active = per_row > 0
            fan = per_row[active]
            nnz = int(per_row.sum())
            layers[n] = {
                "neurons": int(rows.shape[0]), "active_neurons": int(active.sum()),
                "fan_in": self._fan_in_stat(fan), "fan_in_min": int(fan.min()) if len(fan) else 0,
                "fan_in_max": int(fan.max()) if len(fan) else 0, "dense_fan_in": int(rows.shape[1]),
                "nonzeros": nnz, "budget": int(self.budgets[n]), "density": nnz / m.numel(),
                "dense": n not in self._masks, **self._last.get(n, {})}
        return {"method": self.method, "step": self._step, "updates": self._updates,
                "drop_fraction": self.drop_fraction(self._step) if self._step < self.T_end else 0.0,
                "sparsity": self.masks.sparsity(), "layers": layers}

    def _fan_in_stat(self, fan: torch.Tensor) -> float | int:
        return float(fan.float().mean()) if len(fan) else 0.0

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able meta): masks, the random generator, any dense gradient being
        accumulated, the step counter and settings; enough to continue bit-exactly."""
        tensors = {f"mask/{n}": m.clone() for n, m in self._masks.items()}
        tensors["rng"] = self._gen.get_state()
        tensors.update({f"dense_grad/{n}": g.detach().clone() for n, g in self._dense_grad.items()})
        meta = {"kind": "ticketsmith.dst", "method": self.method, "step": self._step,
                "updates": self._updates, "layers": list(self.sparse_names),
                "budgets": dict(self.budgets), "settings": dict(self.settings),
                "last_update": self._last}
        return tensors, meta

    def load_state_dict(self, state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        """Restore a `state_dict()` taken from a sparsifier built with the same settings on the
        same model; the model's and optimizer's own state are restored by their owners."""
        tensors, meta = state
        if meta.get("kind") != "ticketsmith.dst":
            raise ArtifactError("not a ticketsmith dynamic sparse training state")
        if meta.get("method") != self.method:
            raise UsageError(f"the checkpoint was made by {meta.get('method')!r}, this is "
                             f"{self.method!r}")
        diff = [f"{k}: {v!r} there, {self.settings.get(k)!r} here"
                for k, v in meta.get("settings", {}).items() if self.settings.get(k) != v]
        if diff:
            raise UsageError("the checkpoint was made with other sparsifier settings: "
                             + "; ".join(diff))
        if meta.get("layers") != self.sparse_names or meta.get("budgets") != self.budgets:
            raise ArtifactError("the checkpoint's sparse layers or budgets do not match the model")
        masks = {}
        for n in self.sparse_names:
            m = tensors.get(f"mask/{n}")
            if m is None or tuple(m.shape) != tuple(self._params[n].shape):
                raise ArtifactError(f"sparsifier checkpoint: mask of layer {n!r} missing or misshaped")
            masks[n] = m.to(torch.bool)
        self._check_masks({n: m.reshape(self._rows_cols(n)) for n, m in masks.items()})
        self._gen.set_state(tensors["rng"].to(torch.uint8))
        self._step, self._updates = int(meta["step"]), int(meta["updates"])
        self._last = {k: dict(v) for k, v in meta.get("last_update", {}).items()}
        grads = {k[len("dense_grad/"):]: v for k, v in tensors.items() if k.startswith("dense_grad/")}
        for n, g in grads.items():
            if n not in self._masks or tuple(g.shape) != tuple(self._params[n].shape):
                raise ArtifactError(f"sparsifier checkpoint: dense gradient of {n!r} does not fit")
        self._dense_grad = {n: g.to(self._params[n].device, self._params[n].dtype)
                            for n, g in grads.items()}
        self._set_masks(masks)

    def remove(self) -> None:
        """Detach every hook from the model and the optimizer; the weights stay as they are."""
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        self._hold.remove()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sparsity={self.settings['sparsity']}, step={self._step}, "
                f"updates={self._updates}, layers={len(self.sparse_names)} sparse / "
                f"{len(self.names)})")

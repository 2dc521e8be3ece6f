"""Tickets found inside your own training loop: IMP with rewinding, one round per loop pass.

    search = ts.TicketSearch(model, optimizer, structure="refill", rounds=5, rewind="5%",
                             steps_per_round=epochs * batches_per_epoch, example_inputs=x,
                             out="search/")
    for rnd in search:                  # the model is rewound and masked for this round
        my_train(search.model, search.optimizer)        # your loop; the masks are held
        rnd.finish(val_acc=my_eval(search.model))        # records the round, prunes for the next
    ticket = search.best()              # masks, weights and record of the best sparse round

Round 0 trains the dense model; the rewind point is captured during it. Each later round r
prunes `prune_fraction` of the weights round r-1 kept, by global magnitude of round r-1's
trained weights, structures that mask (refill: whole channels; regroup: dense blocks; each
round prunes the previous round's *structured* mask: group-aware IMP, the paper's Alg. 4,
`ticketsmith run --structure-every-round`), rewinds *all* model state (weights, BatchNorm
statistics) to the rewind point, clears the optimizer's state (momentum, Adam moments) and
resets its hyper-parameters (learning rate, ...) to those it had when the search was created,
and hands the loop the masked model. While a round trains, pruned weights stay exactly zero
(`Masks.hold`: gradients masked, weights and optimizer buffers re-masked after every
`optimizer.step()`). This is the round engine of `ticketsmith run` (`runs.imp_step`,
`runs.structure_masks`, `runs.masks_once`): the same seed and settings give the same masks.

The rewind point: round r >= 1 restarts from the model state after `rewind` optimizer steps of
round 0. The search counts `optimizer.step()` calls itself (a hook on the optimizer) and saves
the state after the N-th: `rewind=0` or `"init"` is the initialization (the original lottery
ticket), `rewind=500` the state after 500 steps, `rewind="5%"` 5% of `steps_per_round` (the
optimizer steps one round of your loop takes). `rewind=None`: call `search.capture_rewind()`
yourself during round 0. `rnd.start_step` is the step a round starts from (0, or the rewind
point): a loop that follows a schedule by step should continue it from there, as `ticketsmith
run` does. Round 0 finishing before the rewind point is refused (round 1 could not start).

Everything persists in `out`, written atomically (`ticketsmith.io`), so a killed loop
resumes: create the search again on the same directory (same settings, same architecture) and
iterate; finished rounds are skipped and the first unfinished one starts over (round 0 from the
initial state saved when the search began, round r >= 1 from the rewind point under its saved
mask, decided once).

    OUT/search.json              the settings and parameter shapes (others are refused)
    OUT/init.safetensors         all model state when the search began
    OUT/rewind.safetensors       all model state at the rewind point (metadata: iteration)
    OUT/round_NN/masks.safetensors   round NN's mask (rounds >= 1), decided before it trains
    OUT/round_NN/weights.safetensors the state at rnd.finish()
    OUT/round_NN/round.json      written last: the round is done (sparsity, steps, your metrics)
    OUT/summary.json             every finished round's record

One process trains; for data-parallel training use `ticketsmith run` under torchrun. A second
process on the same directory is refused while the first holds it; in one process, a new
search on the directory takes it over (the old object is closed).

The dynamic sparse half of this API needs no search object: `ts.dst.SRigL(model, optimizer,
sparsity=0.9, total_steps=N)` (also `RigL`, `SET`) changes the mask while your loop trains:
call its `step()` after every `optimizer.step()`; `s.masks` is the ticket, `s.state_dict()` /
`s.load_state_dict()` checkpoint it with your loop's own checkpoints.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from . import records
from .io import load_tensors, save_tensors, write_json
from .masks import Masks, MaskHold, copy_module
from .runs import (LOCK_FILE, clean_temporaries, imp_step, load_state, lock_directory, mask_record,
                   masks_once, parse_rewind, round_dir, state_tensors, structure_masks)

SEARCH_FILE = "search.json"
KIND = "ticketsmith.search"
STRUCTURES = ("none", "refill", "regroup")
# arguments of refill / regroup that the search supplies itself (the rest are settings)
_SUPPLIED = {"model", "masks", "data", "example_inputs"}
# searches open in this process, by directory: a new one on the same directory takes over
_OPEN: dict[str, weakref.ref] = {}


@dataclass(frozen=True)
class Ticket:
    """A finished round of a search: its mask, its trained weights (the model's state dict at
    `rnd.finish()`, pruned entries exactly zero) and its record (round.json)."""
    round: int
    masks: Masks
    weights: dict[str, torch.Tensor]
    record: dict[str, Any]

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the ticket's weights into `model` (the search's architecture) and return it."""
        self.masks.check(model)
        model.load_state_dict(self.weights)
        return model


class Round:
    """One round of a `TicketSearch`, as the loop sees it: `index` (0 is the dense round),
    `masks` (None in round 0), `start_step` (the optimizer step it starts from: 0, or the rewind
    point), `steps` (optimizer steps taken so far in it). Call `finish(**metrics)` once its
    training is done."""

    def __init__(self, search: "TicketSearch", index: int, masks: Masks | None, start_step: int):
        self.index, self.masks, self.start_step = index, masks, start_step
        self._search = search
        self.record: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.record is not None

    @property
    def steps(self) -> int:
        return self._search._steps if self._search._current is self else int(
            (self.record or {}).get("steps", 0))

    def finish(self, **metrics: float | str) -> dict[str, Any]:
        """Record the round (its weights, mask statistics and `metrics`, e.g. val_acc=0.91:
        numbers or strings, what `TicketSearch.best` ranks by) and decide the next round's mask.
        Returns the round's record."""
        return self._search._finish(self, metrics)

    def __repr__(self) -> str:
        what = "dense" if self.masks is None else f"sparsity {self.masks.sparsity():.2%}"
        return f"Round({self.index}, {what}, start_step={self.start_step}" + (
            ", finished)" if self.finished else ")")


def _settings_of(structure: str) -> set[str]:
    from .structure import refill, regroup
    fn = refill if structure == "refill" else regroup
    return set(inspect.signature(fn).parameters) - _SUPPLIED


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _metric(name: str, value: Any) -> float | int | str:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise UsageError(f"metric {name!r}: a tensor of {value.numel()} values; give one number")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"metric {name!r} must be a number or a string, got {type(value).__name__}")
    return value


class TicketSearch:
    """Iterative magnitude pruning with rewinding, driven from your own training loop; see the
    module docstring for the round semantics, the rewind point and the directory.

    - `model`, `optimizer`: what your loop trains (the optimizer must hold the prunable weights;
      None: given later by `use_optimizer`, e.g. by `ticketsmith.lightning.TicketSearchCallback`).
    - `out`: the directory the search persists to and resumes from.
    - `rounds`: pruning rounds after the dense round 0; `prune_fraction` of the remaining
      weights is pruned per round (round r keeps (1 - prune_fraction)^r).
    - `rewind`: 0 / "init", an optimizer step, a percentage of `steps_per_round`, or None
      (`capture_rewind()` by hand).
    - `structure`: None (plain IMP), "refill" (whole channels) or "regroup" (dense blocks), with
      `structure_settings` the keyword settings of `ts.refill` (criterion, extra (refill+),
      coupling) or `ts.regroup` (t1, partitioner, width_ratio, t2, b1, b2, granularity, seed,
      layers, ...). `example_inputs`: a batch for tracing the model's graph; `data` = (x, y):
      a fixed batch for refill's data criteria (feature-l1, feature-l2, saliency).
    - `include_head`, `include_first`: as `Masks.ones`: prune the classifier head / the first
      layer too.
    - `method`: "imp" (the only one; dynamic sparse training is `ts.dst.SRigL` in your loop).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, out: str | Path,
                 method: str = "imp", rounds: int = 5, prune_fraction: float = 0.2,
                 rewind: str | int | None = "5%", steps_per_round: int | None = None,
                 structure: str | None = None, structure_settings: Mapping[str, Any] | None = None,
                 example_inputs: Any = None, data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 include_head: bool = False, include_first: bool = True):
        self._closed: str | None = None
        self._lock_file = None
        self._hold: MaskHold | None = None
        self._step_hook = None
        self._current: Round | None = None
        self._steps = 0
        if method in ("srigl", "rigl", "set"):
            raise UsageError(f"method {method!r}: dynamic sparse training needs no search object; use "
                             f"ts.dst.{ {'srigl': 'SRigL', 'rigl': 'RigL', 'set': 'SET'}[method] }(model, "
                             "optimizer, sparsity=..., total_steps=...) and call its step() after every "
                             "optimizer.step()")
        if method != "imp":
            raise UsageError(f"unknown method {method!r}; TicketSearch runs 'imp' (iterative magnitude "
                             "pruning with rewinding)")
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise UsageError(f"rounds must be an integer >= 0, got {rounds!r}")
        if isinstance(prune_fraction, bool) or not isinstance(prune_fraction, (int, float)) \
                or not 0 < prune_fraction < 1:
            raise UsageError(f"prune fraction must be in (0, 1), got {prune_fraction!r}")
        structure = "none" if structure is None else structure
        if structure not in STRUCTURES:
            hint = " (refill+ is refill with structure_settings={'extra': 0.2})" if structure == "refill+" else ""
            raise UsageError(f"unknown structure {structure!r}; choose one of: None, refill, regroup{hint}")
        settings = dict(structure_settings or {})
        if settings and structure == "none":
            raise UsageError("structure_settings need a structure ('refill' or 'regroup')")
        if settings:
            unknown = sorted(set(settings) - _settings_of(structure))
            if unknown:
                raise UsageError(f"{structure} has no setting {unknown[0]!r}; its settings: "
                                 f"{', '.join(sorted(_settings_of(structure)))}")
        try:  # recorded in search.json: the settings must read back as they are
            settings = json.loads(json.dumps(settings, sort_keys=True))
        except TypeError as e:
            raise UsageError(f"structure_settings must be plain values (numbers, strings, lists): {e}") from None
        self.model, self.optimizer = model, None
        self.out, self.rounds, self.prune_fraction = Path(out), rounds, float(prune_fraction)
        self.structure, self.structure_settings = structure, settings
        self.include_head, self.include_first = include_head, include_first
        self.example_inputs, self.data = _to_cpu(example_inputs), _to_cpu(data)
        if self.data is not None and (not isinstance(self.data, (tuple, list)) or len(self.data) != 2):
            raise UsageError("data must be a batch (x, y) of inputs and labels")
        self.rewind_step = self._rewind_step(rewind, steps_per_round)
        self._base = Masks.ones(model, include_head, include_first)
        self._shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        self._identity = {"kind": KIND, "method": method, "rounds": rounds,
                          "prune_fraction": self.prune_fraction,
                          "rewind": None if rewind is None else str(rewind).strip(), "steps_per_round": steps_per_round, "rewind_step": self.rewind_step,
                          "structure": structure, "structure_settings": settings,
                          "include_head": include_head, "include_first": include_first,
                          "parameters": self._shapes}
        if optimizer is not None:
            self.use_optimizer(optimizer)
        self._open_directory()

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Train with `optimizer` from now on: the search counts its steps and holds the masks
        through it. Given to the constructor, or here when your framework creates the optimizer
        inside each round's training (the Lightning callback does so)."""
        self._check_open()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if optimizer is self.optimizer:
            return
        params = dict(self.model.named_parameters())
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n in self._base if id(params[n]) not in in_opt]
        if missing:
            raise UsageError(f"parameter {missing[0]!r} is not among the optimizer's parameters; give "
                             "the search the optimizer that trains the model")
        if self._step_hook is not None:
            self._step_hook.remove()
        self.optimizer = optimizer
        # each round starts the optimizer afresh: its hyper-parameters as they are now
        self._defaults = [copy.deepcopy({k: v for k, v in g.items() if k != "params"})
                          for g in optimizer.param_groups]
        ref = weakref.ref(self)  # the optimizer must not keep a dropped search alive

        def counted(*_):
            search = ref()
            if search is not None:
                search._on_step()
        self._step_hook = optimizer.register_step_post_hook(counted)
        if self._hold is not None:  # a round in progress: hold its masks through this optimizer
            self._hold.remove()
            self._hold = self._hold.masks.hold(self.model, optimizer)

    # -- settings and the directory ----------------------------------------------------------
    @staticmethod
    def _rewind_step(rewind: str | int | None, steps_per_round: int | None) -> int | None:
        if steps_per_round is not None and (isinstance(steps_per_round, bool)
                                            or not isinstance(steps_per_round, int) or steps_per_round < 1):
            raise UsageError(f"steps_per_round must be a positive integer, got {steps_per_round!r}")
        if rewind is None:
            return None
        if isinstance(rewind, bool):
            raise UsageError(f"rewind must be a step, a percentage, 'init' or None, got {rewind!r}")
        if rewind == "init":
            return 0
        if isinstance(rewind, str) and rewind.strip().endswith("%"):
            if steps_per_round is None:
                raise UsageError(f"rewind={rewind!r} is a share of a round's optimizer steps: give "
                                 "steps_per_round= (epochs x batches per epoch), or a step (rewind=500), "
                                 "or rewind=0 for the initialization")
            step = parse_rewind(rewind, steps_per_round)
        else:
            step = parse_rewind(str(rewind), 1)
        if steps_per_round is not None and step >= steps_per_round:
            raise UsageError(f"rewind point {step} is not before the end of a round "
                             f"({steps_per_round} steps)")
        return step

    def _open_directory(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"out {out} is a file, not a directory")
        if (out / "config.json").exists():
            raise UsageError(f"{out} is a `ticketsmith run` directory, not a ticket search; choose another out")
        if out.exists() and not (out / SEARCH_FILE).exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise UsageError(f"{out} exists, is not empty and is not a ticket search; choose another out")
        key = str(out.resolve())
        old = _OPEN.get(key, lambda: None)()
        if old is not None and old is not self:  # this process's own earlier search: taken over
            old.close(reason=f"a newer TicketSearch took over {out}")
        self._lock_file = lock_directory(out, "wait for it to finish or choose another out")
        _OPEN[key] = weakref.ref(self)
        try:
            self._check_or_write_identity()
        except BaseException:
            self.close()
            raise

    def _check_or_write_identity(self) -> None:
        f = self.out / SEARCH_FILE
        if f.exists():
            before = records.read(f, "search")
            if before["kind"] != KIND:
                raise UsageError(f"{f}: not a ticket search record")
            clean_temporaries(self.out)
            old, new = before.get("parameters", {}), self._shapes
            for name in list(new) + list(old):  # in the model's order
                if old.get(name) != new.get(name):
                    raise UsageError(self._shape_message(name, new.get(name), old.get(name), f"in {self.out}"))
            changed = sorted(k for k in self._identity if k != "parameters" and before.get(k) != self._identity[k])
            if changed == ["rounds"] and self.rounds > int(before["rounds"]):
                write_json(f, self._identity)  # a search grows by more rounds
            elif changed:
                raise UsageError(f"{self.out} holds a search with other settings (" + "; ".join(
                    f"{k}: {before.get(k)!r} there, {self._identity[k]!r} now" for k in changed)
                    + "); give the same settings or choose another out")
        else:
            write_json(f, self._identity)
        if not (self.out / "init.safetensors").exists():
            save_tensors(self.out / "init.safetensors", state_tensors(self.model))

    @staticmethod
    def _shape_message(name: str, now, then, where: str) -> str:
        def show(s):
            return "absent" if s is None else f"shape {tuple(s)}"
        return (f"parameter {name!r}: {show(now)} now, {show(then)} {where}; a ticket search keeps one "
                "architecture through all rounds (masks and the rewind point are per parameter)")

    def _check_shapes(self) -> None:
        now = {n: list(p.shape) for n, p in self.model.named_parameters()}
        for name in list(self._shapes) + list(now):
            if now.get(name) != self._shapes.get(name):
                raise UsageError(self._shape_message(name, now.get(name), self._shapes.get(name),
                                                     "when the search began"))

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"this TicketSearch is closed ({self._closed}); create a new one on "
                             f"{self.out} to resume")

    # -- the rounds --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Round]:
        self._check_open()
        if self._current is not None:  # a loop broken off mid-round: that round starts over
            self._end_round()
        while True:
            r = self.next_round()
            if r > self.rounds:
                break
            rnd = self._begin(r)
            yield rnd
            self._check_open()
            if self._current is not rnd:  # finished, or abandoned by a newer loop over the search
                if not rnd.finished:
                    return
                continue
            raise UsageError(f"round {r} ended without rnd.finish(...): call it once the round's "
                             "training is done")
        self._release()

    def next_round(self) -> int:
        """The first round not finished (rounds + 1 when the search is complete)."""
        r = 0
        while r <= self.rounds and (round_dir(self.out, r) / "round.json").exists():
            r += 1
        return r

    def _begin(self, r: int) -> Round:
        self._check_shapes()
        rewind = self.out / "rewind.safetensors"
        if r == 0:
            load_state(self.model, self.out / "init.safetensors")  # a restarted round 0 too
            masks, start = None, 0
            rewind.unlink(missing_ok=True)  # one from a killed round 0 is not this round's
        else:
            if not rewind.exists():
                raise UsageError(f"{self.out}: no rewind point; round {r} cannot start (round 0 must "
                                 "capture it)")
            masks = self._round_masks(r)
            tensors, meta = load_tensors(rewind)
            self.model.load_state_dict(tensors)  # the shapes were checked against search.json
            start = int(meta.get("iteration", 0))
            masks.apply(self.model)
        self._reset_optimizer()
        self._steps = 0
        self._t0 = time.perf_counter()
        self._hold = masks.hold(self.model, self.optimizer) if masks is not None else None
        self._current = Round(self, r, masks, start)
        if r == 0 and self.rewind_step == 0:
            self._save_rewind(0)
        return self._current

    def _reset_optimizer(self) -> None:
        """A fresh optimizer, as `ticketsmith run` makes one per round: no momentum or moments,
        the hyper-parameters it had when the search began."""
        if self.optimizer is None:
            return
        self.optimizer.state.clear()
        for group, defaults in zip(self.optimizer.param_groups, self._defaults):
            group.update(copy.deepcopy(defaults))

    def _round_masks(self, r: int) -> Masks:
        """Round r's mask, decided once (from round r-1's weights and mask) and saved."""
        def decide() -> Masks:
            prev = round_dir(self.out, r - 1)
            prev_masks = self._base if r == 1 else Masks.load(prev / "masks.safetensors")
            trained = copy_module(self.model).to("cpu")  # pruned and structured on the CPU, as a run does
            load_state(trained, prev / "weights.safetensors")
            return imp_step(trained, prev_masks, self.prune_fraction,
                            self._structured if self.structure != "none" else None)
        return masks_once(round_dir(self.out, r), decide)

    def _structured(self, masks: Masks, trained: nn.Module) -> Masks:
        return structure_masks(masks, trained, self.structure, self.data, self.example_inputs,
                               **self.structure_settings)

    def _on_step(self) -> None:
        rnd = self._current
        if rnd is None:
            return
        self._steps += 1
        if rnd.index == 0 and self.rewind_step is not None and self._steps == self.rewind_step:
            self._save_rewind(self._steps)

    def _save_rewind(self, step: int) -> None:
        save_tensors(self.out / "rewind.safetensors", state_tensors(self.model), {"iteration": step})

    def capture_rewind(self) -> None:
        """Save the model's state now as the rewind point (with `rewind=None`, during round 0)."""
        self._check_open()
        if self.rewind_step is not None:
            raise UsageError(f"this search captures the rewind point itself, after step {self.rewind_step} "
                             "of round 0; create it with rewind=None to capture it by hand")
        if self._current is None or self._current.index != 0:
            raise UsageError("the rewind point is captured during round 0 (the dense round)")
        if (self.out / "rewind.safetensors").exists():
            raise UsageError("the rewind point of this round 0 is already captured")
        self._save_rewind(self._steps)

    def _finish(self, rnd: Round, metrics: dict[str, Any]) -> dict[str, Any]:
        self._check_open()
        if rnd.finished:
            raise UsageError(f"round {rnd.index} is already finished")
        if rnd is not self._current:
            raise UsageError(f"round {rnd.index} is not the round in progress")
        self._check_shapes()
        metrics = {str(k): _metric(k, v) for k, v in metrics.items()}
        r = rnd.index
        if r == 0 and not (self.out / "rewind.safetensors").exists():
            where = ("call search.capture_rewind() during it" if self.rewind_step is None else
                     f"the rewind point is step {self.rewind_step}")
            raise UsageError(f"round 0 ended after {self._steps} optimizer steps without a rewind point "
                             f"({where}); train longer or rewind earlier, then run round 0 again")
        if r == 0 and self._identity["steps_per_round"] not in (None, self._steps):
            warnings.warn(f"round 0 took {self._steps} optimizer steps, not steps_per_round="
                          f"{self._identity['steps_per_round']}: the rewind point "
                          f"{self._identity['rewind']!r} was counted on the latter", RuntimeWarning, stacklevel=3)
        path = round_dir(self.out, r)
        record: dict[str, Any] = {"round": r, "start_step": rnd.start_step, "steps": self._steps,
                                  "seconds": time.perf_counter() - self._t0, "metrics": metrics}
        record.update(mask_record(rnd.masks) if rnd.masks is not None else {"sparsity": 0.0})
        save_tensors(path / "weights.safetensors", state_tensors(self.model))
        write_json(path / "round.json", record)  # last: the round is done
        rnd.record = record
        self._end_round()
        write_json(self.out / "summary.json", self.summary())
        if r < self.rounds:  # the next round's mask now: a structure that refuses says so here
            self._round_masks(r + 1)
        return record

    def _end_round(self) -> None:
        if self._hold is not None:
            self._hold.remove()
        self._hold, self._current = None, None

    # -- results -----------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """The records (round.json) of the finished rounds, in order."""
        return [records.read(round_dir(self.out, r) / "round.json", "search-round")
                for r in range(self.next_round())]

    def summary(self) -> dict[str, Any]:
        """The search's settings, whether it is complete, and every finished round's record."""
        records = self.records()
        return {"search": str(self.out), "settings": self._identity,
                "complete": len(records) == self.rounds + 1, "rounds": records}

    def ticket(self, r: int) -> Ticket:
        """Finished round `r` (>= 1) as a `Ticket`."""
        path = round_dir(self.out, r)
        if r < 1 or not (path / "round.json").exists():
            raise UsageError(f"round {r} is not a finished sparse round of {self.out}")
        weights, _ = load_tensors(path / "weights.safetensors")
        return Ticket(r, Masks.load(path / "masks.safetensors"), weights, records.read(path / "round.json", "search-round"))

    def best(self, metric: str = "val_acc", *, minimize: bool = False, within: float | None = None) -> Ticket:
        """The best finished sparse round by `metric` (a name given to `rnd.finish`; highest, or
        lowest with `minimize`; the earliest on ties). With `within`, instead the sparsest round
        whose metric is at most `within` worse than the dense round 0's (a matching ticket)."""
        records = self.records()
        sparse = [rec for rec in records if rec["round"] >= 1]
        if not sparse:
            raise UsageError(f"{self.out}: no sparse round (1 or later) is finished yet")
        for rec in records:
            value = rec.get("metrics", {}).get(metric)
            if (rec["round"] >= 1 or within is not None) and not isinstance(value, (int, float)):
                raise UsageError(f"round {rec['round']} recorded no number {metric!r} "
                                 f"(it has: {', '.join(rec.get('metrics', {})) or 'none'}); pass it "
                                 f"to rnd.finish({metric}=...) or choose another metric")
        sign = -1.0 if minimize else 1.0

        def score(rec) -> float:
            v = sign * float(rec["metrics"][metric])
            return -math.inf if math.isnan(v) else v
        if within is None:
            pick = max(sparse, key=lambda rec: (score(rec), -rec["round"]))
        else:
            floor = score(records[0]) - float(within)
            ok = [rec for rec in sparse if score(rec) >= floor]
            if not ok:
                raise UsageError(f"no sparse round's {metric} is within {within} of the dense round's "
                                 f"({records[0]['metrics'][metric]})")
            pick = max(ok, key=lambda rec: (rec["sparsity"], -rec["round"]))
        return self.ticket(pick["round"])

    # -- lifetime ----------------------------------------------------------------------------
    @property
    def round(self) -> Round | None:
        """The round in progress, if any."""
        return self._current

    def _release(self) -> None:
        """Hooks off and the directory's lock given back (the search stays readable)."""
        self._end_round()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        f, self._lock_file = self._lock_file, None
        if f is not None:
            f.close()  # closing the file drops the flock

    def close(self, reason: str = "close() was called") -> None:
        """Stop: the masks are no longer held, the directory is free for another search."""
        if not self._closed:
            self._closed = reason
        self._release()

    def __enter__(self) -> "TicketSearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        f = getattr(self, "_lock_file", None)
        if f is not None:
            f.close()

    def __repr__(self) -> str:
        return (f"TicketSearch({self.out}, {self.structure}, round {self.next_round()} of "
                f"0..{self.rounds}" + (f", closed: {self._closed}" if self._closed else "") + ")")


__all__ = ["TicketSearch", "Ticket", "Round"]

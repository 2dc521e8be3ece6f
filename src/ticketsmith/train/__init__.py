"""The training loop: SGD with momentum, weight decay and a multistep schedule, under an
optional mask, with per-epoch validation/test evaluation and checkpoint seams.

Learning-rate milestones are fractions of the whole run, applied per iteration, so a run that
starts at a rewind point mid-epoch gets exactly the learning rate the dense run had there.
Data parallelism plugs in through `Dist` (rank, world size, reductions) and the sampler in
`ticketsmith.data.batches`; only the caller decides what is written, and only on rank 0.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import data as tsdata
from .. import faults
from ..errors import DivergenceError, UsageError
from ..masks import Masks


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training; the paper's 80/120 of 160
    gamma: float = 0.1
    seed: int = 0
    channels_last: bool = False
    eval_batch_size: int = 500

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UsageError(f"learning rate must be a positive number, got {self.lr}")
        if not all(0 < m <= 1 for m in self.milestones):
            raise UsageError(f"milestones are fractions of training in (0, 1], got {self.milestones}")
        if not 0 <= self.momentum < 1:  # SGD refuses a negative one; 1 or more never converges
            raise UsageError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.weight_decay < 1:
            raise UsageError(f"weight decay must be in [0, 1), got {self.weight_decay}")
        if not 0 <= self.seed < 2 ** 63:  # torch.manual_seed takes a signed 64-bit integer
            raise UsageError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass
class Dist:
    """Who this process is in a data-parallel job; the single-process default does nothing.

    `Dist.from_env()` joins the job torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): backend nccl on GPUs, gloo on CPUs, unless one is named."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @classmethod
    def from_env(cls, backend: str | None = None, device: str = "auto") -> "Dist":
        import os
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        dev = f"cuda:{local}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(local)
        if world == 1:
            return cls(device=dev)
        import torch.distributed as tdist
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
        return cls(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local, device=dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _comm_device(self) -> str:
        import torch.distributed as tdist
        return self.device if tdist.get_backend() == "nccl" else "cpu"

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            moved = t.to(self._comm_device())
            torch.distributed.all_reduce(moved)
            t.copy_(moved.to(t.device))
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's bytes on every rank (no pickle: a length, then a uint8 tensor)."""
        if self.world_size == 1:
            assert data is not None
            return data
        dev = self._comm_device()
        n = torch.tensor([len(data) if self.is_main else 0], dtype=torch.int64, device=dev)
        torch.distributed.broadcast(n, 0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if self.is_main
               else torch.empty(int(n.item()), dtype=torch.uint8, device=dev))
        torch.distributed.broadcast(buf, 0)
        return bytes(buf.cpu().numpy().tobytes())

    def check_same(self, digest: str, what: str) -> None:
        """Fail loudly unless every rank holds the same `digest` of `what`."""
        if self.world_size == 1:
            return
        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=self._comm_device())
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, mine)
        digests = [bytes(g.cpu().tolist()).hex() for g in gathered]
        if len(set(digests)) != 1:
            raise RuntimeError(f"{what} differs across ranks: " + ", ".join(
                f"rank {i}: {d[:12]}" for i, d in enumerate(digests)))


class Sparsifier(Protocol):
    """What the loop needs from a dynamic sparse trainer (ticketsmith.dst)."""
    def step(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class EpochRecord:
    epoch: int
    iteration: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    test_loss: float
    test_acc: float
    seconds: float
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    history: list[dict]
    best_epoch: int
    best_val_acc: float
    test_acc_at_best: float
    final_test_acc: float


def lr_at(cfg: TrainConfig, iteration: int, total: int) -> float:
    passed = sum(iteration >= round(m * total) for m in cfg.milestones)
    return cfg.lr * cfg.gamma ** passed


@torch.no_grad()
def evaluate(model: nn.Module, ds: tsdata.Dataset, split: tsdata.Split, batch_size: int = 500,
             channels_last: bool = False, dist: Dist | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) of the model on a split, reduced over all processes."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for x, y in tsdata.batches(ds, split, batch_size, train=False, rank=dist.rank,
                               world_size=dist.world_size, channels_last=channels_last):
        x, y = x.to(dist.device), y.to(dist.device)
        out = model(x)
        totals += torch.tensor([F.cross_entropy(out, y, reduction="sum").item(),
                                (out.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    model.train(was_training)
    dist.all_reduce_sum(totals)
    n = max(totals[2].item(), 1.0)
    return totals[0].item() / n, totals[1].item() / n


class Trainer:
    """Trains one model on one dataset for `cfg.epochs`, optionally under masks."""

    def __init__(self, model: nn.Module, ds: tsdata.Dataset, cfg: TrainConfig,
                 dist: Dist | None = None, progress: bool = True, desc: str = ""):
        cfg.validate()
        self.model, self.ds, self.cfg = model, ds, cfg
        self.dist = dist or Dist()
        self.progress = progress and self.dist.is_main
        self.desc = desc
        if cfg.batch_size % self.dist.world_size:
            raise UsageError(f"batch size {cfg.batch_size} (global) does not split evenly over "
                             f"{self.dist.world_size} processes")
        self.local_batch = cfg.batch_size // self.dist.world_size
        self.iters_per_epoch = tsdata.num_batches(len(ds.train), self.local_batch, self.dist.world_size)
        self.total_iters = self.iters_per_epoch * cfg.epochs
        if not hasattr(model, "module"):  # a DDP-wrapped model is already on its device
            model.to(self.dist.device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)

    # -- checkpoint state (tensors + JSON), written by the caller ------------------------------
    def state(self, next_epoch: int, history: list[dict], sparsifier: Sparsifier | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        module = getattr(self.model, "module", self.model)  # unwrap DDP
        tensors = {f"model/{k}": v for k, v in module.state_dict().items()}
        opt = self.optimizer.state_dict()
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim/{idx}/{k}"] = v
        meta = {"next_epoch": next_epoch, "history": history,
                "param_groups": opt["param_groups"]}
        if sparsifier is not None:
            sp_tensors, sp_meta = sparsifier.state_dict()
            tensors.update({f"sparsifier/{k}": v for k, v in sp_tensors.items()})
            meta["sparsifier"] = sp_meta
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict,
                   sparsifier: Sparsifier | None = None) -> tuple[int, list[dict]]:
        module = getattr(self.model, "module", self.model)
        module.load_state_dict({k[len("model/"):]: v for k, v in tensors.items()
                                if k.startswith("model/")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, idx, name = k.split("/", 2)
                state.setdefault(int(idx), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if sparsifier is not None:
            sparsifier.load_state_dict(
                ({k[len("sparsifier/"):]: v for k, v in tensors.items() if k.startswith("sparsifier/")},
                 meta["sparsifier"]))
        return int(meta["next_epoch"]), list(meta["history"])

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, masks: Masks | None = None, start_iter: int = 0, *,
            resume: tuple[dict, dict] | None = None,
            on_iteration: Callable[[int], None] | None = None,
            on_epoch_end: Callable[[int, list[dict]], None] | None = None,
            sparsifier: Sparsifier | None = None) -> TrainResult:
        """Train from iteration `start_iter` (a rewind point) to the end.

        `resume`: a checkpoint (tensors, meta) from `state()`; training continues after it.
        `on_iteration(it)`: called before iteration `it` runs (used to save the rewind point).
        `on_epoch_end(next_epoch, history)`: called after each epoch (used to checkpoint).
        `sparsifier.step()`: called after every optimizer step (dynamic sparse training).
        """
        cfg, model = self.cfg, self.model
        hold = masks.hold(getattr(model, "module", model), self.optimizer) if masks is not None else None
        history: list[dict] = []
        first_epoch = start_iter // self.iters_per_epoch
        if resume is not None:
            first_epoch, history = self.load_state(*resume, sparsifier=sparsifier)
            start_iter = first_epoch * self.iters_per_epoch
            if hold is not None:
                hold.enforce()
        try:
            for epoch in range(first_epoch, cfg.epochs):
                skip = max(0, start_iter - epoch * self.iters_per_epoch)
                history.append(self._epoch(epoch, skip, on_iteration, sparsifier))
                faults.reach("epoch")
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, history)
        finally:
            if hold is not None:
                hold.remove()
        return summarize(history)

    def _epoch(self, epoch: int, skip: int, on_iteration, sparsifier) -> dict:
        cfg, model, ds, dist = self.cfg, self.model, self.ds, self.dist
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + dist.rank)
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        it = epoch * self.iters_per_epoch + skip
        bar = tqdm(total=self.iters_per_epoch, initial=skip, disable=not self.progress,
                   desc=f"{self.desc}epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=1.0)
        for x, y in tsdata.batches(ds, ds.train, self.local_batch, train=True, epoch=epoch,
                                   seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                   skip=skip, channels_last=cfg.channels_last):
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            if on_iteration is not None:
                on_iteration(it)
            lr = lr_at(cfg, it, self.total_iters)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            out = model(x)
            loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"{self.desc}epoch {epoch + 1}, iteration {it}: the loss is {loss.item()}; "
                    "training diverged. The last finished epoch's checkpoint is kept: rerun the "
                    "same command with a lower --lr to resume from it")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if sparsifier is not None:
                sparsifier.step()
            with torch.no_grad():
                sums += torch.tensor([loss.item() * len(y), (out.argmax(1) == y).sum().item(),
                                      len(y)], dtype=torch.float64)
            it += 1
            faults.reach("iteration")
            bar.update(1)
            if bar.n % 10 == 0:
                bar.set_postfix(loss=f"{sums[0].item() / max(sums[2].item(), 1):.3f}",
                                acc=f"{sums[1].item() / max(sums[2].item(), 1):.3f}", refresh=False)
        bar.close()
        dist.all_reduce_sum(sums)
        val_loss, val_acc = evaluate(model, ds, ds.val, cfg.eval_batch_size, cfg.channels_last, dist)
        test_loss, test_acc = evaluate(model, ds, ds.test, cfg.eval_batch_size, cfg.channels_last, dist)
        rec = EpochRecord(epoch=epoch + 1, iteration=it, lr=lr_at(cfg, it - 1, self.total_iters),
                          train_loss=sums[0].item() / max(sums[2].item(), 1),
                          train_acc=sums[1].item() / max(sums[2].item(), 1),
                          val_loss=val_loss, val_acc=val_acc, test_loss=test_loss, test_acc=test_acc,
                          seconds=time.perf_counter() - t0)
        if sparsifier is not None and hasattr(sparsifier, "stats"):
            rec.extra = sparsifier.stats()
        if self.progress:
            tqdm.write(f"{self.desc}epoch {epoch + 1}/{cfg.epochs}: loss {rec.train_loss:.4f} "
                       f"train {rec.train_acc:.4f} val {val_acc:.4f} test {test_acc:.4f} "
                       f"({rec.seconds:.0f}s)")
        return asdict(rec)


def summarize(history: list[dict]) -> TrainResult:
    if not history:
        return TrainResult([], 0, float("nan"), float("nan"), float("nan"))
    best = max(history, key=lambda r: (r["val_acc"], -r["epoch"]))  # earliest best epoch
    return TrainResult(history, best["epoch"], best["val_acc"], best["test_acc"],
                       history[-1]["test_acc"])

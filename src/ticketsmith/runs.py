"""Run directories: one experiment, resumable by construction.

    RUN/config.json            the settings that define the run (refused if they differ)
    RUN/rewind.safetensors     all model state (weights, BN statistics, head) at the rewind point
    RUN/round_NN/masks.safetensors     the round's mask, decided once, before training
    RUN/round_NN/checkpoint.safetensors  last finished epoch (model, optimizer, history)
    RUN/round_NN/weights.safetensors   final state of the round's training
    RUN/round_NN/metrics.jsonl         one line per epoch
    RUN/round_NN/round.json            written last: the round is done
    RUN/summary.json           per round: sparsity, best validation accuracy, test accuracy

Round 0 trains the dense network and records the rewind point. Each later round derives its
mask from the previous round (IMP) or from round 0 (one-shot sources), optionally makes it
structured, rewinds *all* state to the rewind point, and retrains under the mask. Running the
same command again skips finished rounds and resumes an unfinished one from its checkpoint.
Every file is written atomically; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ConfigDict, TypeAdapter
from torch import nn

from . import data as tsdata
from . import models as tsmodels
from . import faults, prune, records
from .errors import ArtifactError, DivergenceError, UsageError
from .io import TMP_SUFFIX, load_tensors, read_json, refuse_outside_links, save_tensors, write_json
from .masks import Masks
from .train import Dist, Trainer, TrainConfig

METHODS = ("dense", "imp", "oneshot", "srigl", "rigl", "set")
SOURCES = ("omp", "rp", "snip", "grasp", "synflow", "admm")
STRUCTURES = ("none", "refill", "refill+", "regroup")
REINITS = ("none", "random")


def _help(text: str, **kw) -> dict:
    return {"help": text, **kw}


LOCK_FILE = ".lock"  # held (flock) by the process working in a run directory
DATA_FILE = "data.json"  # the identity of the data the run was trained on
# record fields that measure wall-clock time: the only ones an interrupted and resumed run may
# have different from an uninterrupted one (the crash tests compare everything else)
WALL_CLOCK_FIELDS = frozenset({"train_seconds", "seconds_per_epoch", "seconds"})
# below this share of its threads' CPU time per epoch, a training process is starved by others
OVERSUBSCRIBED = 0.35


@dataclass
class RunConfig:
    """Everything that defines a run. Each field is a `ticketsmith run` flag."""
    model: str = field(default="resnet20", metadata=_help(
        f"a zoo model ({', '.join(tsmodels.names())}) or your own: package.module:function (a "
        "builder; it gets the dataset's in_channels, num_classes, image_size if it names them), "
        "timm:NAME or torchvision:NAME (when installed)"))
    model_kwargs: str = field(default="", metadata=_help(
        "keyword arguments of a --model builder, as a JSON object, e.g. '{\"width\": 2}'"))
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset name", choices=tsdata.names()))
    width: float = field(default=1.0, metadata=_help("width multiplier of every hidden layer"))
    method: str = field(default="imp", metadata=_help(
        "dense: train once; imp: iterative magnitude pruning with rewinding; oneshot: one "
        "mask per --sparsity from --source; srigl/rigl/set: dynamic sparse training", choices=METHODS))
    rounds: int = field(default=5, metadata=_help(
        "IMP pruning rounds after the dense round 0 (0: the dense round only); a finished IMP "
        "run can be extended by rerunning it with more rounds"))
    prune_fraction: float = field(default=0.2, metadata=_help("IMP: fraction of the remaining weights pruned per round"))
    rewind: str = field(default="5%", metadata=_help(
        "rewind point: a percentage of training ('5%%') or an iteration ('0' = original init)"))
    sparsity: tuple[float, ...] = field(default=(0.8,), metadata=_help(
        "oneshot / dynamic sparse training: target sparsity, or a comma-separated list (oneshot)"))
    source: str = field(default="omp", metadata=_help("oneshot: where the unstructured mask comes from",
                                                       choices=SOURCES))
    synflow_iterations: int = field(default=100, metadata=_help("oneshot synflow: pruning iterations"))
    admm_epochs: int = field(default=5, metadata=_help("oneshot admm: epochs of ADMM training on the dense model"))
    admm_rho: float = field(default=1e-2, metadata=_help("oneshot admm: initial penalty (grows to 1)"))
    structure: str = field(default="none", metadata=_help(
        "post-process each round's mask: refill (channels), refill+ (extra channels), regroup "
        "(dense blocks)", choices=STRUCTURES))
    refill_criterion: str = field(default="l1", metadata=_help(
        "refill: how channels are scored", choices=("l1", "count", "feature-l1", "feature-l2", "saliency")))
    refill_extra: float = field(default=0.2, metadata=_help(
        "refill+: extra fraction of the dropped channels kept (k + round(extra * (c_out - k)))"))
    refill_coupling: str = field(default="none", metadata=_help(
        "refill: layers whose channels meet at a residual addition: none (each layer on its own, "
        "the paper's Alg. 2), shared (one channel set for the group), union (a channel stays if "
        "any layer of the group keeps it)", choices=("none", "shared", "union")))
    regroup_t1: int = field(default=0, metadata=_help(
        "regroup: the paper's t1, the number of row groups per layer (0: min(8, rows // b1) per layer)"))
    regroup_partitioner: str = field(default="metis", metadata=_help(
        "regroup: hypergraph partitioner (kahypar is GPLv3+, an optional extra)", choices=("metis", "kahypar")))
    regroup_granularity: str = field(default="element", metadata=_help(
        "regroup: block columns are single (c_in, kh, kw) positions (element, the paper) or whole "
        "input channels (channel: runs as dense convolutions)", choices=("element", "channel")))
    regroup_width_ratio: float = field(default=1.5, metadata=_help(
        "regroup: the authors' block width rule, w > ratio x a row's nonzeros outside the block (1.5)"))
    regroup_t2: int = field(default=0, metadata=_help(
        "regroup: minimum kept weights of a column in a group (0: from the layer's density)"))
    regroup_b1: int = field(default=16, metadata=_help("regroup: minimum rows of a block"))
    regroup_b2: int = field(default=16, metadata=_help("regroup: minimum columns (elements) of a block"))
    structure_every_round: bool = field(default=False, metadata=_help(
        "IMP: prune the structured mask of the previous round (group-aware IMP, Alg. 4) "
        "instead of post-processing an unstructured IMP chain"))
    chain: str = field(default="", metadata=_help(
        "IMP with --structure: take the unstructured IMP chain (rewind point, dense round, each "
        "round's mask and weights) from this finished IMP run directory instead of training it "
        "again; its training settings must match"))
    reinit: str = field(default="none", metadata=_help(
        "random: train tickets from a fresh random init instead of the rewind point (control; "
        "for group-aware IMP, with --chain naming the group-aware IMP run whose masks it trains)",
        choices=REINITS))
    null_mask: bool = field(default=False, metadata=_help(
        "control (IMP with --structure): structure a random mask with each chain round's "
        "per-layer kept counts instead of the IMP mask (the structure-less null)"))
    dst_delta_t: int = field(default=100, metadata=_help("srigl/rigl/set: steps between mask updates"))
    dst_t_end: float = field(default=0.75, metadata=_help("srigl/rigl/set: mask updates stop at this fraction of training"))
    dst_alpha: float = field(default=0.3, metadata=_help("srigl/rigl/set: initial drop fraction (cosine decay)"))
    dst_gamma_sal: float = field(default=0.3, metadata=_help(
        "srigl: a neuron with fewer than gamma_sal * k salient weights is ablated"))
    dst_ablation: bool = field(default=True, metadata=_help("srigl: ablate neurons (--no-dst-ablation: keep all)"))
    dst_distribution: str = field(default="erk", metadata=_help("srigl/rigl/set: layer densities",
                                                                 choices=("erk", "uniform")))
    dst_dense_layers: str = field(default="", metadata=_help("srigl/rigl/set: comma-separated layers kept dense"))
    dst_grad_accumulation: int = field(default=1, metadata=_help(
        "srigl/rigl: dense gradients averaged over this many steps before an update"))
    include_head: bool = field(default=False, metadata=_help("prune the classifier head too"))
    exclude_first: bool = field(default=False, metadata=_help("do not prune the first layer"))
    epochs: int = field(default=30, metadata=_help("training epochs per round"))
    batch_size: int = field(default=128, metadata=_help("global batch size (split across processes)"))
    lr: float | None = field(default=None, metadata=_help(
        "initial learning rate (default: the model's, recorded in config.json: 0.1, LeNet-5 0.02)"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=_help("weight decay"))
    milestones: tuple[float, ...] = field(default=(0.5, 0.75), metadata=_help(
        "learning rate x0.1 at these fractions of training"))
    seed: int = field(default=0, metadata=_help("random seed"))
    channels_last: bool = field(default=False, metadata=_help("train in channels_last memory format"))
    val_size: int = field(default=-1, metadata=_help(
        "examples held out of the training set for validation (-1: the dataset's default)"))
    # Settings of later stages (structure, DST) extend this class; a config.json written before
    # a field existed reads as that field's default.

    def __post_init__(self):
        if self.lr is None:  # the model's default, written into config.json as a number
            self.lr = tsmodels.default_lr(self.model)
        with contextlib.suppress(UsageError):  # one spelling per value: the run's identity
            kwargs = tsmodels.parse_kwargs(self.model_kwargs)
            self.model_kwargs = json.dumps(kwargs, sort_keys=True) if kwargs else ""

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           momentum=self.momentum, weight_decay=self.weight_decay,
                           milestones=tuple(self.milestones), seed=self.seed,
                           channels_last=self.channels_last)

    def validate(self) -> None:
        tsmodels.check_spec(self.model)
        tsmodels.parse_kwargs(self.model_kwargs)
        for name in ("dataset", "method", "source", "structure", "reinit", "refill_criterion",
                     "refill_coupling", "dst_distribution", "regroup_partitioner", "regroup_granularity"):
            choices = RunConfig.__dataclass_fields__[name].metadata.get("choices")
            if getattr(self, name) not in choices:
                raise UsageError(f"unknown {name} {getattr(self, name)!r}; choose one of: "
                                 f"{', '.join(choices)}")
        if self.rounds < (0 if self.method == "imp" else 1):
            raise UsageError(f"rounds must be at least {0 if self.method == 'imp' else 1}, got {self.rounds}")
        if not 0 < self.prune_fraction < 1:
            raise UsageError(f"prune fraction must be in (0, 1), got {self.prune_fraction}")
        if not self.sparsity:
            raise UsageError("give at least one --sparsity")
        for s in self.sparsity:
            prune.check_sparsity(s)
        if self.method in ("srigl", "rigl", "set"):
            if len(self.sparsity) != 1:
                raise UsageError(f"--method {self.method} trains one sparsity per run; give one --sparsity")
            if not 0 < self.sparsity[0] < 1:
                raise UsageError(f"sparsity must be in (0, 1) for {self.method}, got {self.sparsity[0]}")
        if self.synflow_iterations < 1 or self.admm_epochs < 1 or not self.admm_rho > 0:
            raise UsageError("synflow iterations and admm epochs must be >= 1, admm rho > 0")
        if self.regroup_t1 < 0 or self.regroup_t2 < 0 or self.regroup_b1 < 1 or self.regroup_b2 < 1 \
                or not self.regroup_width_ratio > 0:
            raise UsageError("regroup settings: t1 (groups) >= 0, width ratio > 0, t2 >= 0, b1 >= 1, b2 >= 1")
        if not 0 <= self.refill_extra <= 1:
            raise UsageError(f"refill extra must be in [0, 1], got {self.refill_extra}")
        if self.width <= 0:
            raise UsageError(f"width must be > 0, got {self.width}")
        parse_rewind(self.rewind, 1)
        self.train_config().validate()
        self._check_applicable()
        if self.structure == "regroup" and self.regroup_partitioner == "kahypar":
            import importlib.util  # before any training: not after the dense round
            if importlib.util.find_spec("kahypar") is None:
                raise UsageError("partitioner 'kahypar' needs the optional KaHyPar package (GPLv3+): "
                                 "pip install ticketsmith[kahypar]")
        if self.structure_every_round and (self.method != "imp" or self.structure == "none"):
            raise UsageError("--structure-every-round needs --method imp and a --structure")
        if self.chain and (self.method != "imp" or self.structure == "none"):
            raise UsageError("--chain needs --method imp with a --structure")
        if self.chain and self.structure_every_round and self.reinit != "random":
            raise UsageError("--chain with --structure-every-round trains another group-aware IMP "
                             "run's masks: it needs --reinit random (the random-ticket control)")
        if self.null_mask and (self.method != "imp" or self.structure == "none" or self.structure_every_round):
            raise UsageError("--null-mask needs --method imp with a --structure (and no "
                             "--structure-every-round): it replaces each chain round's mask")

    def _check_applicable(self) -> None:
        """A setting changed from its default that this run would ignore is refused, naming it:
        silently training something else than asked is worse than an error."""
        dst, sparse = self.method in ("srigl", "rigl", "set"), self.method in ("imp", "oneshot")
        refill = self.structure in ("refill", "refill+")
        builder = tsmodels.is_builder(self.model)
        applies = {
            "width": (not builder, "a builder takes its own settings: give them in --model-kwargs"),
            "model_kwargs": (builder, "only a builder (--model package.module:function) takes kwargs"),
            "sparsity": (self.method in ("oneshot", "srigl", "rigl", "set"),
                         "IMP's sparsity follows from --rounds and --prune-fraction"),
            "rounds": (self.method == "imp", "only IMP has pruning rounds"),
            "prune_fraction": (self.method == "imp", "only IMP prunes per round"),
            "source": (self.method == "oneshot", "only --method oneshot takes a mask source"),
            "synflow_iterations": (self.method == "oneshot" and self.source == "synflow", "it is SynFlow's"),
            "admm_epochs": (self.method == "oneshot" and self.source == "admm", "it is ADMM's"),
            "admm_rho": (self.method == "oneshot" and self.source == "admm", "it is ADMM's"),
            "structure": (sparse, f"--method {self.method} has no IMP / one-shot mask to structure"),
            "refill_criterion": (refill, "it is refill's"), "refill_coupling": (refill, "it is refill's"),
            "refill_extra": (self.structure == "refill+", "it is refill+'s"),
            "reinit": (sparse, "only tickets (IMP / one-shot rounds) are reinitialised"),
            "include_head": (sparse or dst, "a dense run prunes nothing"),
            "exclude_first": (sparse or dst, "a dense run prunes nothing"),
        }
        for f in dataclasses.fields(self):
            if f.name.startswith("regroup_"):
                applies[f.name] = (self.structure == "regroup", "it is regroup's")
            elif f.name.startswith("dst_"):
                applies[f.name] = (dst, "it is dynamic sparse training's (--method srigl / rigl / set)")
        applies["dst_gamma_sal"] = (self.method == "srigl", "it is SRigL's")
        applies["dst_ablation"] = (self.method == "srigl", "it is SRigL's")
        for name, (ok, why) in applies.items():
            if not ok and getattr(self, name) != RunConfig.__dataclass_fields__[name].default:
                what = (f"--model {self.model}" if name in ("width", "model_kwargs")
                        else f"--method {self.method}, --structure {self.structure}")
                raise UsageError(f"--{name.replace('_', '-')} does not apply to this run ({what}): {why}")

    def identity(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, source: str | Path = "config.json") -> "RunConfig":
        """A config record (as `identity()` wrote it, old spellings read as today's), validated:
        a tampered or foreign one is an ArtifactError naming `source` and the field."""
        if not isinstance(obj, dict):
            raise ArtifactError(f"{source}: not a run config (a JSON object), got {type(obj).__name__}")
        obj = dict(obj)
        if "regroup_groups" in obj:  # written before t1 named the number of groups, as in the paper
            obj["regroup_width_ratio"] = obj.pop("regroup_t1", 1.5)
            obj["regroup_t1"] = obj.pop("regroup_groups")
        if "refill_coupled" in obj:  # written before refill_coupling existed (a bool, default True)
            coupled = obj.pop("refill_coupled")
            obj.setdefault("refill_coupling", "shared" if coupled else "none")
        # fields every config ever written has; a later field missing reads as its default
        missing = [k for k in ("model", "dataset", "method", "epochs", "seed") if k not in obj]
        if missing:
            raise ArtifactError(f"{source}: field '{missing[0]}' is missing")
        return records.validate(_config_schema(), json.dumps(obj), source)

    @classmethod
    def read(cls, path: str | Path) -> "RunConfig":
        """A run directory's config.json (or the file itself), validated."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        return cls.from_json(read_json(path), path)


RunConfig.__pydantic_config__ = ConfigDict(extra="forbid")  # an unknown key is refused, named


@functools.cache
def _config_schema() -> TypeAdapter:
    return TypeAdapter(RunConfig)


# what an IMP chain taken from another run must share with the run that uses it
CHAIN_FIELDS = ("model", "dataset", "width", "prune_fraction", "rewind", "include_head",
                "exclude_first", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                "milestones", "seed", "channels_last", "val_size")


def parse_rewind(text: str, total_iters: int) -> int:
    """'5%' -> 5% of the training iterations; '0' or '120' -> that iteration."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            frac = float(t[:-1]) / 100
            if not 0 <= frac < 1:
                raise ValueError
            return int(round(frac * total_iters))
        it = int(t)
        if it < 0:
            raise ValueError
        return it
    except ValueError:
        raise UsageError(f"rewind point must be a percentage in [0%, 100%) or an iteration >= 0, "
                         f"got {text!r}") from None


def round_dir(run: Path, r: int) -> Path:
    return Path(run) / f"round_{r:02d}"


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_state(model: nn.Module, path: Path) -> None:
    tensors, _ = load_tensors(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: does not fit the model ({str(e).splitlines()[0]})") from None


def lock_directory(out: Path, advice: str):
    """An exclusive lock (flock) on `out`, held until the returned file is closed: two processes
    writing one run would interleave rounds. The kernel drops the lock when the process ends,
    however it ends, so a crash leaves nothing stale. A directory in use raises UsageError ending
    in `advice`; returns None where there is no flock (not POSIX: no locking)."""
    try:
        import fcntl
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"{out} is in use by another ticketsmith process; {advice}") from None
    return f


def clean_temporaries(out: Path) -> None:
    """Remove the temporary files and folders a crash mid-write left in `out` (ours: named
    `.*` + TMP_SUFFIX; never read, never a user's file)."""
    import shutil
    for tmp in out.rglob(f".*{TMP_SUFFIX}"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def masks_once(path: Path, decide: Callable[[], Masks]) -> Masks:
    """A round's mask in `path` (its masks.safetensors): read back if it was decided before (a
    resumed run must not re-draw a random or data-dependent mask), else `decide()`d now and
    written before anything trains under it."""
    f = path / "masks.safetensors"
    if f.exists():
        return Masks.load(f)
    masks = decide()
    faults.reach("mask")
    masks.save(f)
    return masks


def imp_step(trained: nn.Module, masks: Masks, fraction: float,
             structured: Callable[[Masks, nn.Module], Masks] | None = None) -> Masks:
    """One IMP round's mask: prune `fraction` of the weights `masks` keeps by global magnitude
    of `trained` (the previous round's trained weights), then `structured(mask, trained)`
    (e.g. `structure_masks`) when given."""
    unstructured = prune.magnitude(trained, masks, fraction)
    return structured(unstructured, trained) if structured is not None else unstructured


def structure_masks(masks: Masks, trained: nn.Module, structure: str,
                    data: tuple[torch.Tensor, torch.Tensor] | None = None, example_inputs=None,
                    **settings: Any) -> Masks:
    """Post-process an unstructured mask into `structure`: 'none' (unchanged), 'refill' /
    'refill+' (`ticketsmith.structure.refill`: whole channels) or 'regroup'
    (`ticketsmith.structure.regroup`: dense blocks; the rows no block covers are dead channels,
    so their bias / BatchNorm are masked too). `trained` holds the weights `masks` was pruned
    from; `data` = (x, y) is a fixed batch for refill's data criteria, `example_inputs` a batch
    for tracing the graph (default: data's first input); `settings` are the keyword settings
    of refill or regroup (e.g. criterion, extra, coupling; t1, partitioner, b1, seed)."""
    if structure == "none":
        return masks
    from .structure import channel_companions, refill, regroup
    if example_inputs is None and data is not None:
        example_inputs = data[0][:1]
    if structure in ("refill", "refill+"):
        return refill(trained, masks, data=data, example_inputs=example_inputs, **settings)
    if structure == "regroup":
        return channel_companions(trained, regroup(masks, **settings), example_inputs)
    raise UsageError(f"unknown structure {structure!r}; choose one of: {', '.join(STRUCTURES)}")


def mask_record(masks: Masks) -> dict[str, Any]:
    """What a round records of its mask: sparsity overall, per layer, of output channels, the
    channels kept per layer and, for regrouped masks, the blocks per layer."""
    info = dict(sparsity=masks.sparsity(), layer_sparsity=masks.layer_sparsity(),
                channel_sparsity=masks.channel_sparsity(), channels_kept=structure_counts(masks)["channels"])
    if masks.blocks:
        info["blocks"] = structure_counts(masks)["blocks"]
    return info


class Run:
    """Executes (or resumes) a run in `out`. Call `execute()`."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, data_dir: str | None = None,
                 progress: bool = True, dist: Dist | None = None):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out)
        self.data_dir = data_dir
        self._lock_file = None  # the run directory's lock, while this process holds it
        self.dist = dist or Dist()
        self.progress = progress
        self.ds = tsdata.load(cfg.dataset, data_dir, None if cfg.val_size < 0 else cfg.val_size)
        self.tcfg = cfg.train_config()
        probe_model = self.new_model()
        tsmodels.check_classifier(probe_model, self.ds, cfg.model)
        probe = Trainer(probe_model, self.ds, self.tcfg, self.dist, progress=False)
        self.total_iters = probe.total_iters
        if cfg.method in ("srigl", "rigl", "set"):  # its settings refused now, before anything is written
            self.sparsifier(probe_model, probe)
        self.rewind_iter = parse_rewind(cfg.rewind, self.total_iters)
        if self.rewind_iter >= self.total_iters:
            raise UsageError(f"rewind point {self.rewind_iter} is not before the end of training "
                             f"({self.total_iters} iterations)")
        self.chain_dir = self._check_chain() if cfg.chain else None

    # -- helpers -----------------------------------------------------------------------------
    def new_model(self, seed: int | None = None) -> nn.Module:
        torch.manual_seed(self.cfg.seed if seed is None else seed)
        return tsmodels.for_dataset(self.cfg.model, self.ds, self.cfg.width,
                                    tsmodels.parse_kwargs(self.cfg.model_kwargs))

    def original_model(self) -> nn.Module | None:
        """The run's model as its builder made it, before `ts.models.build` swapped modules for
        prunable ones (a dense baseline to time: `bench.compare`'s `original`); None where
        nothing was swapped (a zoo model, or a builder's model holding no such module)."""
        if not tsmodels.is_builder(self.cfg.model):
            return None
        torch.manual_seed(self.cfg.seed)
        return tsmodels.original(self.cfg.model, tsmodels.parse_kwargs(self.cfg.model_kwargs),
                                 in_channels=self.ds.in_channels, num_classes=self.ds.num_classes,
                                 image_size=tuple(self.ds.image_size))

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as trained: DistributedDataParallel when there are several processes."""
        model.to(self.dist.device)
        if self.dist.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.dist.local_rank] if self.dist.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    def on_main(self, fn) -> bytes:
        """Run `fn() -> bytes` on rank 0 only and give its result (or its UsageError) to
        every rank, so that a decision is taken once."""
        result, error = b"", ""
        if self.dist.is_main:
            try:
                result = fn()
            except UsageError as e:
                error = str(e)
        status = self.dist.broadcast_bytes((b"E" + error.encode()) if error else (b"K" + result)
                                           if self.dist.is_main else None)
        if status[:1] == b"E":
            raise UsageError(status[1:].decode())
        return status[1:]

    def base_masks(self, model: nn.Module) -> Masks:
        return Masks.ones(model, include_head=self.cfg.include_head,
                          include_first=not self.cfg.exclude_first)

    @property
    def writer(self) -> bool:
        return self.dist.is_main

    def prepare(self) -> None:
        """Create the run directory, or check that an existing one was made by this config
        (on rank 0; the other ranks get its verdict)."""
        def check() -> bytes:
            self._prepare()
            return b""
        self.on_main(check)

    def _lock(self) -> None:
        """Hold the run directory's lock while this process works in it (see `lock_directory`)."""
        if self._lock_file is not None:
            return
        self._lock_file = lock_directory(
            self.out, "wait for it to finish (rerunning the same command then resumes) or choose another --out")

    def _prepare(self) -> None:
        cfg_path = self.out / "config.json"
        if cfg_path.exists():
            refuse_outside_links(self.out)
            old_cfg = RunConfig.read(cfg_path)
            changed = [k for k, v in old_cfg.identity().items() if self.cfg.identity()[k] != v]
            lower_lr = changed == ["lr"] and (self.out / "diverged.json").exists() and self.cfg.lr < old_cfg.lr
            # an IMP run grows by more rounds: the rounds it has are those of the longer run
            extend = changed == ["rounds"] and self.cfg.method == "imp" and self.cfg.rounds > old_cfg.rounds
            if changed and not (lower_lr or extend):
                diff = [f"{k}: {getattr(old_cfg, k)!r} there, {getattr(self.cfg, k)!r} now" for k in changed]
                raise UsageError(f"{self.out} holds a run made by a different config ("
                                 + "; ".join(diff) + "); choose another --out")
            self._lock()  # before anything is cleaned or changed: another process may be writing
            self._check_data()
            if lower_lr:
                self._lower_lr(old_cfg.lr)  # resuming a diverged run with a lower learning rate
            if extend:
                self._record_change({"event": "rounds extended", "from": old_cfg.rounds,
                                     "to": self.cfg.rounds})
            clean_temporaries(self.out)
        elif self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file, not a directory; choose another --out")
        elif self.out.exists() and any(p.name != LOCK_FILE for p in self.out.iterdir()):
            raise UsageError(f"{self.out} exists, is not empty and is not a ticketsmith run; "
                             "choose another --out")
        else:
            created = not self.out.exists()
            self._lock()
            if cfg_path.exists():  # another process made the run between our check and the lock
                return self._prepare()
            try:
                write_json(cfg_path, self.cfg.identity())
                self._check_data()
            except BaseException:  # e.g. a full disk: leave nothing behind
                self.release()
                (self.out / LOCK_FILE).unlink(missing_ok=True)
                if created:
                    with contextlib.suppress(OSError):  # not empty: someone else's now
                        self.out.rmdir()
                raise

    def _check_data(self) -> None:
        """The run remembers the data it was trained on (`data.json`: a digest of every split
        and the folder it came from); resuming it on other data is refused. A run made before
        this record existed adopts the data it is resumed with."""
        f = self.out / DATA_FILE
        now = {"dataset": self.cfg.dataset, "digest": self.ds.digest(),
               "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else "(default)"}
        if f.exists():
            before = records.read(f, "data")
            if before["digest"] != now["digest"]:
                raise UsageError(f"{self.out} was trained on other data ({before['data_dir']}, digest "
                                 f"{before['digest'][:12]}) "
                                 f"than given now ({now['data_dir']}, digest {now['digest'][:12]}); "
                                 "give the same data or choose another --out")
            return
        write_json(f, now)

    def _lower_lr(self, old_lr: float) -> None:
        """Record that the run continues with a lower learning rate after a divergence."""
        self._record_change({"event": "learning rate lowered after divergence", "from": old_lr,
                             "to": self.cfg.lr, "divergence": records.read(self.out / "diverged.json", "diverged")})
        (self.out / "diverged.json").unlink()

    def _record_change(self, event: dict) -> None:
        """An accepted change of config.json, kept in history.json (the event first: a crash
        between the two writes leaves the event recorded and the rerun repeats the change)."""
        f = self.out / "history.json"
        history = records.read(f, "history") if f.exists() else []
        write_json(self.out / "history.json", history + [event])
        write_json(self.out / "config.json", self.cfg.identity())

    # -- one round of training ---------------------------------------------------------------
    def train_round(self, path: Path, masks: Masks | None, start: str, desc: str,
                    sparsifier_factory=None, extra: dict | None = None) -> dict:
        """Train in `path` (resuming from its checkpoint) and write its outputs; returns round.json.

        start: 'init' (from the seeded initial weights, iteration 0), 'rewind' (from the rewind
        point) or 'reinit' (fresh random weights, trained from the rewind iteration).
        """
        done = path / "round.json"
        if done.exists():
            return records.read(done, "round")
        if self.progress and self.dist.is_main:
            self._say_eta(desc)
        model = self.new_model()
        start_iter = 0
        if start == "rewind":
            load_state(model, self.out / "rewind.safetensors")
            start_iter = self.rewind_iter
        elif start == "reinit":
            model = self.new_model(seed=self.cfg.seed + 1_000_003)
            start_iter = self.rewind_iter
        if masks is not None:
            masks.apply(model)
        trainer = Trainer(self.wrap(model), self.ds, self.tcfg, self.dist, self.progress, desc=desc)
        sparsifier = sparsifier_factory(model, trainer) if sparsifier_factory else None
        if sparsifier is not None and self.dist.world_size > 1:
            sparsifier = CheckedSparsifier(sparsifier, self.dist)
        ckpt = path / "checkpoint.safetensors"
        resume = load_tensors(ckpt) if ckpt.exists() else None

        def on_iteration(it: int) -> None:
            if start == "init" and it == self.rewind_iter and self.writer:
                save_tensors(self.out / "rewind.safetensors", state_tensors(model),
                             {"iteration": it})

        clock = [time.perf_counter(), time.process_time(), False]  # wall, CPU, warned

        def on_epoch_end(next_epoch: int, history: list[dict]) -> None:
            self._check_oversubscription(clock, desc)
            if self.writer:  # metrics first: a kill between the two then only repeats the epoch
                write_metrics(path / "metrics.jsonl", history)
                save_tensors(ckpt, *trainer.state(next_epoch, history, sparsifier))

        t0 = time.perf_counter()
        try:
            result = trainer.fit(masks, start_iter, resume=resume, on_iteration=on_iteration,
                                 on_epoch_end=on_epoch_end, sparsifier=sparsifier)
        except DivergenceError as e:
            if self.writer:  # lets a rerun with a lower --lr resume from the last checkpoint
                write_json(self.out / "diverged.json", {"round": path.name, "lr": self.cfg.lr,
                                                         "message": str(e)})
            raise
        chance = 1.0 / self.ds.num_classes
        if self.dist.is_main and result.best_val_acc <= chance + 0.02:
            import warnings
            warnings.warn(f"{desc.strip() or path.name}: validation accuracy {result.best_val_acc:.1%} is at "
                          f"chance ({chance:.0%}): the network did not learn; try a lower --lr "
                          f"(now {self.cfg.lr})", RuntimeWarning, stacklevel=2)
        final_masks = sparsifier.masks if sparsifier is not None else masks
        info = {"best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
                "test_acc": result.test_acc_at_best, "final_test_acc": result.final_test_acc,
                "epochs": self.tcfg.epochs, "start_iteration": start_iter,
                "train_seconds": time.perf_counter() - t0,
                # median over the round's epochs (a resumed round's earlier ones may have run elsewhere)
                "seconds_per_epoch": _seconds_per_epoch(result.history),
                "machine": _machine()}
        if final_masks is not None:
            info.update(mask_record(final_masks))
            if self.writer:
                info.update(self.effective(getattr(model, "module", model), final_masks))
        else:
            info.update(sparsity=0.0)
        info.update(extra or {})
        if self.writer:
            if final_masks is not None and sparsifier is not None:
                final_masks.save(path / "masks.safetensors")
            save_tensors(path / "weights.safetensors", state_tensors(getattr(model, "module", model)))
            write_metrics(path / "metrics.jsonl", result.history)  # whole, however often it resumed
            write_json(done, info)
            ckpt.unlink(missing_ok=True)
        self.dist.barrier()  # the other ranks read what rank 0 just wrote
        faults.reach("round")
        return info

    def effective(self, model: nn.Module, masks: Masks) -> dict:
        """Effective sparsity and compact parameter count of a trained ticket (see
        `compact.effective`); a model channel surgery cannot handle records why instead."""
        from .compact import effective
        from .errors import TicketsmithError
        x = self.structure_batch(2)[0].to(self.dist.device)
        try:
            eff = effective(model, masks, x)
        except TicketsmithError as e:
            return {"effective_sparsity": None, "effective_error": str(e)}
        return {k: eff[k] for k in ("effective_sparsity", "params", "compact_params")}

    def _trainings(self) -> tuple[int, list[Path]]:
        """How many trainings the whole run has, and the round.json files of those finished."""
        cfg = self.cfg
        if cfg.method in ("srigl", "rigl", "set", "dense"):
            total = 1
        elif cfg.method == "oneshot":
            total = len(cfg.sparsity) + 1
        else:
            internal_chain = cfg.structure != "none" and not cfg.structure_every_round and not cfg.chain
            total = cfg.rounds + 1 + (max(cfg.rounds - 1, 0) if internal_chain else 0)
        finished = list(self.out.glob("round_[0-9]*/round.json")) + list(self.out.glob("chain/round_[0-9]*/round.json"))
        return total, finished

    def _say_eta(self, desc: str) -> None:
        """One line before each training: how much of the run is left, from the measured pace."""
        total, finished = self._trainings()
        paces = []
        for f in finished:
            try:
                spe = records.read(f, "round").get("seconds_per_epoch")
            except (ArtifactError, AttributeError):
                continue
            if isinstance(spe, (int, float)):
                paces.append(spe)
        left = max(total - len(finished), 1)
        line = f"{desc.strip() or 'training'}: training {len(finished) + 1} of {total}"
        if paces:
            minutes = paces[-1] * self.tcfg.epochs * left / 60
            line += f"; about {minutes:.0f} min left for the run ({paces[-1]:.0f} s per epoch so far)"
        import sys
        print(line, file=sys.stderr)

    def _check_oversubscription(self, clock: list, desc: str) -> None:
        """Warn once per round when this process got far less CPU time than its threads could
        use: other processes compete for the cores (training was measured 7-10x slower so)."""
        wall, cpu = time.perf_counter(), time.process_time()
        used = (cpu - clock[1]) / max(wall - clock[0], 1e-9) / max(torch.get_num_threads(), 1)
        clock[0], clock[1] = wall, cpu
        if used < OVERSUBSCRIBED and not clock[2] and self.dist.device == "cpu" and self.dist.is_main:
            clock[2] = True
            import warnings
            warnings.warn(f"{desc.strip() or 'training'}: this process used {used:.0%} of its "
                          f"{torch.get_num_threads()} thread(s)' CPU time in the last epoch: the machine "
                          "is oversubscribed; run fewer jobs or fewer --threads", RuntimeWarning, stacklevel=2)

    def round_masks(self, path: Path, decide) -> Masks:
        """The round's mask: read back if it was decided before (a resumed run must not
        re-draw a random or data-dependent mask), else decided now and written first."""
        def on_rank0() -> bytes:
            return masks_once(path, decide).to_bytes()
        masks = Masks.from_bytes(self.on_main(on_rank0))
        self.dist.check_same(masks.digest(), f"the mask of {path.name}")
        return masks

    def trained(self, path: Path) -> nn.Module:
        model = self.new_model()
        load_state(model, path / "weights.safetensors")
        return model

    # -- the methods -------------------------------------------------------------------------
    def execute(self) -> dict:
        try:
            self.prepare()
            cfg = self.cfg
            if cfg.method in ("srigl", "rigl", "set"):
                self._dynamic()
            else:
                if self.chain_dir is not None:  # round 0 and the rewind point come from the chain
                    self._adopt_chain()
                self.train_round(round_dir(self.out, 0), None, "init", "round 0 ")
                if cfg.method == "imp":
                    self._imp()
                elif cfg.method == "oneshot":
                    self._oneshot()
            return self.write_summary()
        finally:
            self.release()

    def release(self) -> None:
        """Give up the run directory's lock (the end of execute does)."""
        f, self._lock_file = self._lock_file, None
        if f is not None:
            f.close()  # closing the file drops the flock

    def _start(self) -> str:
        return "reinit" if self.cfg.reinit == "random" else "rewind"

    def _imp(self) -> None:
        cfg = self.cfg
        chained = cfg.structure != "none" and not cfg.structure_every_round
        external = self.chain_dir
        prev = round_dir(self.out, 0)  # the round whose weights the next IMP step prunes
        prev_masks = self.base_masks(self.new_model())
        for r in range(1, cfg.rounds + 1):
            path = round_dir(self.out, r)
            if chained:  # tickets post-process the rounds of an unstructured IMP chain
                cpath = (external or self.out / "chain") / f"round_{r:02d}"
                if external is not None:
                    if not (cpath / "masks.safetensors").exists() or not (prev / "round.json").exists():
                        raise UsageError(f"chain run {external} has no round {r} mask or no finished "
                                         f"round {r - 1}; finish it first (or use fewer --rounds)")
                    cmasks = Masks.load(cpath / "masks.safetensors")
                trained = self.trained(prev)
                if external is None:
                    cmasks = self.round_masks(cpath, lambda: prune.magnitude(
                        trained, prev_masks, cfg.prune_fraction))
                if cfg.null_mask:  # the control: only the layer-wise counts of the IMP mask
                    masks = self.round_masks(path, lambda: self.structured(
                        prune.null_masks(cmasks, seed=cfg.seed * 1000 + r), trained))
                else:
                    masks = self.round_masks(path, lambda: self.structured(cmasks, trained))
                if external is None and r < cfg.rounds:  # the last chain round is never pruned again
                    self.train_round(cpath, cmasks, "rewind", f"chain {r} ")
                extra = {"unstructured_sparsity": cmasks.sparsity()}
                prev, prev_masks = cpath, cmasks
            elif external is not None:  # group-aware IMP's own masks, retrained (--reinit random)
                cpath = external / f"round_{r:02d}"
                if not (cpath / "round.json").exists():
                    raise UsageError(f"chain run {external} has no finished round {r}; finish it "
                                     "first (or use fewer --rounds)")
                masks = self.round_masks(path, lambda: Masks.load(cpath / "masks.safetensors"))
                extra = {}
            else:
                def decide():
                    return imp_step(self.trained(prev), prev_masks, cfg.prune_fraction, self.structured)
                masks = self.round_masks(path, decide)
                extra = {}
                prev, prev_masks = path, masks
            self.train_round(path, masks, self._start(), f"round {r} ", extra=extra)

    def _check_chain(self) -> Path:
        """The IMP run named by --chain, checked before anything is written."""
        ext = Path(self.cfg.chain)
        if not (ext / "config.json").exists():
            raise UsageError(f"--chain {ext}: not a ticketsmith run directory")
        other = RunConfig.read(ext / "config.json")
        if self.cfg.structure_every_round:  # the masks of a group-aware IMP run, retrained
            same = [f for f in dataclasses.fields(RunConfig) if f.name.startswith(("regroup_", "refill_"))
                    or f.name in ("structure", "structure_every_round", "method")]
            diff = [f.name for f in same if getattr(other, f.name) != getattr(self.cfg, f.name)]
            if diff:
                raise UsageError(f"--chain {ext}: not the same group-aware IMP (differs in {', '.join(diff)})")
        elif other.method != "imp" or other.structure != "none":
            raise UsageError(f"--chain {ext}: not an unstructured IMP run "
                             f"(method {other.method}, structure {other.structure})")
        diff = [f for f in CHAIN_FIELDS if getattr(other, f) != getattr(self.cfg, f)]
        if diff:
            raise UsageError(f"--chain {ext}: its settings differ in {', '.join(diff)}")
        if not (ext / "round_00" / "round.json").exists() or not (ext / "rewind.safetensors").exists():
            raise UsageError(f"--chain {ext}: its dense round 0 is not finished")
        return ext

    def _adopt_chain(self) -> None:
        """Copy the chain's rewind point and dense round 0 into this run (atomically)."""
        import shutil
        ext = self.chain_dir
        if self.writer:
            if not (self.out / "rewind.safetensors").exists():
                tmp = self.out / f".rewind.safetensors{TMP_SUFFIX}"
                shutil.copyfile(ext / "rewind.safetensors", tmp)
                tmp.replace(self.out / "rewind.safetensors")
            dense = round_dir(self.out, 0)
            if not (dense / "round.json").exists():
                tmp = self.out / f".round_00{TMP_SUFFIX}"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(ext / "round_00", tmp)
                shutil.rmtree(dense, ignore_errors=True)
                tmp.replace(dense)
        self.dist.barrier()

    def _oneshot(self) -> None:
        dense = round_dir(self.out, 0)
        for r, s in enumerate(self.cfg.sparsity, start=1):
            path = round_dir(self.out, r)
            masks = self.round_masks(path, lambda: self.structured(
                self.source_masks(dense, s), self.trained(dense)))
            self.train_round(path, masks, self._start(), f"round {r} ")

    def source_masks(self, dense: Path, sparsity: float) -> Masks:
        """The unstructured one-shot mask at `sparsity` from `cfg.source`."""
        cfg = self.cfg
        if cfg.source == "omp":
            return prune.omp(self.trained(dense), sparsity, self.base_masks(self.new_model()))
        base = self.base_masks(self.new_model())
        if cfg.source == "rp":
            return prune.random_masks(self.new_model(), sparsity, cfg.seed, base)
        if cfg.source == "admm":
            return prune.admm(self.trained(dense), sparsity, self.ds, epochs=cfg.admm_epochs,
                              rho=cfg.admm_rho, batch_size=cfg.batch_size, masks=base,
                              progress=self.progress, seed=cfg.seed)
        # pruning "at initialization": score the weights the ticket restarts from
        start = self.new_model()
        load_state(start, self.out / "rewind.safetensors")
        if cfg.source == "synflow":
            return prune.synflow(start, sparsity, (self.ds.in_channels, *self.ds.image_size),
                                 iterations=cfg.synflow_iterations, masks=base)
        if cfg.source == "snip":
            x, y = self.structure_batch(cfg.batch_size)
            return prune.snip(start, sparsity, (x, y), masks=base)
        return prune.grasp(start, sparsity, self.balanced_batch(10), masks=base)

    def balanced_batch(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `per_class` training examples of every class (GraSP's sample)."""
        y = self.ds.train.y
        idx = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(self.ds.num_classes)])
        return self.ds.normalize(self.ds.train.x[idx]), y[idx]

    def structure_batch(self, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch of training data for data-based criteria (and graph tracing)."""
        return self.ds.normalize(self.ds.train.x[:n]), self.ds.train.y[:n]

    def structured(self, masks: Masks, trained: nn.Module) -> Masks:
        """Post-process an unstructured mask; `trained` holds the weights it was pruned from."""
        cfg = self.cfg
        if cfg.structure == "none":
            return masks
        x, y = self.structure_batch()
        if cfg.structure in ("refill", "refill+"):
            settings = dict(criterion=cfg.refill_criterion, coupling=cfg.refill_coupling,
                            extra=cfg.refill_extra if cfg.structure == "refill+" else 0.0)
        else:
            settings = dict(t1=cfg.regroup_t1 or None, partitioner=cfg.regroup_partitioner,
                            width_ratio=cfg.regroup_width_ratio, t2=cfg.regroup_t2 or None,
                            b1=cfg.regroup_b1, b2=cfg.regroup_b2, granularity=cfg.regroup_granularity,
                            seed=cfg.seed)
        return structure_masks(masks, trained, cfg.structure, (x, y), x[:1], **settings)

    def _dynamic(self) -> None:
        """Sparse training from scratch: one round, round_00, its mask learned while training."""
        self.train_round(round_dir(self.out, 0), None, "init", f"{self.cfg.method} ",
                         sparsifier_factory=self.sparsifier)

    def sparsifier(self, model: nn.Module, trainer: Trainer):
        """The dynamic sparse training method of this run, stepping `trainer`'s optimizer."""
        from . import dst
        cfg = self.cfg
        return dst.make_sparsifier(
            cfg.method, model, trainer.optimizer, trainer.total_iters, cfg.sparsity[0],
            delta_t=cfg.dst_delta_t, t_end=cfg.dst_t_end, alpha=cfg.dst_alpha,
            gamma_sal=cfg.dst_gamma_sal, ablation=cfg.dst_ablation,
            distribution=cfg.dst_distribution, grad_accumulation=cfg.dst_grad_accumulation,
            dense_layers=tuple(n for n in cfg.dst_dense_layers.split(",") if n),
            include_head=cfg.include_head, include_first=not cfg.exclude_first, seed=cfg.seed)

    # -- summary: rebuilt from the round.json files, which are the source of truth -----------
    def write_summary(self) -> dict:
        summary = summarize_run(self.out)
        if self.writer:
            write_json(self.out / "summary.json", summary)
        return summary


def _seconds_per_epoch(history: list[dict]) -> float | None:
    """Median wall seconds of the recorded epochs (training and evaluation)."""
    import statistics
    secs = [h["seconds"] for h in history if isinstance(h.get("seconds"), (int, float))]
    return statistics.median(secs) if secs else None


def _machine() -> dict:
    """Where a round was trained: CPU model, threads, torch version, host."""
    import platform

    from .bench import machine
    info = {k: v for k, v in machine().items() if k != "command"}
    info["host"] = platform.node()
    return info


def structure_counts(masks: Masks) -> dict:
    """Per layer: [kept output channels, all output channels], and the number of blocks."""
    channels = {}
    for k in masks.weight_names:
        rows = masks[k].reshape(masks[k].shape[0], -1).any(dim=1)
        channels[k] = [int(rows.sum()), int(rows.numel())]
    return {"channels": channels, "blocks": {k: len(v) for k, v in masks.blocks.items()}}


class CheckedSparsifier:
    """Checks, at every mask change of a dynamic sparse trainer, that all ranks agree."""

    def __init__(self, inner, dist: Dist):
        self.inner, self.dist, self._last = inner, dist, inner.masks

    def step(self) -> None:
        self.inner.step()
        if self.inner.masks is not self._last:
            self._last = self.inner.masks
            self.dist.check_same(self._last.digest(), "the dynamic sparse mask")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def write_metrics(path: Path, history: list[dict]) -> None:
    from .io import atomic_write_bytes
    atomic_write_bytes(path, "".join(json.dumps(h, sort_keys=True) + "\n" for h in history).encode())


def summarize_run(run: str | Path) -> dict:
    """Collect the rounds of a run directory; unfinished rounds are listed as partial."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise UsageError(f"{run} is not a ticketsmith run directory (no config.json)")
    refuse_outside_links(run)
    cfg = read_json(run / "config.json")
    RunConfig.from_json(cfg, run / "config.json")  # refused, naming the field, if tampered
    rounds = []
    numbered = [d for d in run.glob("round_*") if d.is_dir() and d.name[6:].isdigit()]
    for d in sorted(numbered, key=lambda d: int(d.name[6:])):  # round_100 after round_99
        r = int(d.name.split("_")[1])
        if (d / "round.json").exists():
            try:
                info = records.read(d / "round.json", "round")
            except ArtifactError:  # reported, and the other rounds still are
                rounds.append({"round": r, "status": "corrupt", "corrupt": ["round.json"]})
                continue
            bad = [f.name for f in (d / "masks.safetensors", d / "weights.safetensors")
                   if f.exists() and not _intact(f)]
            rounds.append({"round": r, "status": "done", **({"corrupt": bad} if bad else {}),
                           **{k: info.get(k) for k in (
                "sparsity", "effective_sparsity", "compact_params", "params", "unstructured_sparsity",
                "best_val_acc", "test_acc", "best_epoch", "final_test_acc", "train_seconds",
                "seconds_per_epoch")}})
        else:
            epochs_done = 0
            if (d / "metrics.jsonl").exists():
                epochs_done = sum(1 for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip())
            entry = {"round": r, "status": "partial", "epochs_done": epochs_done}
            if (d / "masks.safetensors").exists():
                try:
                    entry["sparsity"] = Masks.load(d / "masks.safetensors").sparsity()
                except ArtifactError:
                    entry["status"] = "corrupt"
            rounds.append(entry)
    expected = _expected_rounds(cfg)
    complete = len([x for x in rounds if x["status"] == "done"]) == expected
    return {"run": str(run), "config": cfg, "complete": complete, "rounds": rounds}


def _intact(path: Path) -> bool:
    """True if a tensor file loads and its checksum matches."""
    try:
        load_tensors(path)
        return True
    except ArtifactError:
        return False


def _expected_rounds(cfg: dict) -> int:
    method = cfg.get("method", "imp")
    if method == "imp":
        return int(cfg.get("rounds", 5)) + 1
    if method == "oneshot":
        return len(cfg.get("sparsity", [0.8])) + 1
    return 1


def format_summary(summary: dict) -> str:
    """A plain-text table of a run's summary."""
    c = summary["config"]
    lines = [f"{summary['run']}: {c.get('method')} {c.get('model')} on {c.get('dataset')}"
             + (f", structure {c['structure']}" if c.get("structure", "none") != "none" else "")
             + ("" if summary["complete"] else "  [partial]"),
             f"{'round':>5} {'sparsity':>9} {'effective':>9} {'best val':>9} {'test@best':>10} "
             f"{'epoch':>6}  status"]
    for r in summary["rounds"]:
        def pct(v):
            return f"{v:9.2%}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>9}"
        lines.append(f"{r['round']:>5} {pct(r.get('sparsity'))} {pct(r.get('effective_sparsity'))} "
                     f"{pct(r.get('best_val_acc'))} "
                     f"{pct(r.get('test_acc')):>10} {str(r.get('best_epoch', '-')):>6}  {r['status']}"
                     + ((f": {', '.join(r['corrupt'])}" if r["status"] == "corrupt" else
                         f" (corrupt: {', '.join(r['corrupt'])})") if r.get("corrupt") else ""))
    return "\n".join(lines)

"""How sensitive is Regroup to its hyper-parameters? (the blog review's question)

`sweep(imp_run, round, values)` takes one round of a finished unstructured IMP run, regroups
its mask once per setting (one hyper-parameter varied at a time, the others at their
defaults), and records for each: the structured sparsity and blocks, the test accuracy after
retraining from the run's rewind point (`epochs` sets the budget; 0 skips retraining) and the
measured speedup of the compacted ticket. Each setting's result is written as soon as it is
known, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import bench, records
from .errors import UsageError
from .io import write_json
from .masks import Masks
from .runs import Run, RunConfig, load_state, round_dir
from .train import Trainer, TrainConfig

PARAMS = {"t1": int, "width_ratio": float, "t2": int, "b1": int, "b2": int}
DEFAULTS = {"t1": None, "width_ratio": 1.5, "t2": None, "b1": 16, "b2": 16}


def parse_values(specs: Sequence[str]) -> dict[str, list]:
    """'width_ratio=1,1.5,2' -> {'width_ratio': [1.0, 1.5, 2.0]}."""
    out: dict[str, list] = {}
    for spec in specs:
        name, _, vals = spec.partition("=")
        if name not in PARAMS or not vals:
            raise UsageError(f"sweep values look like NAME=V1,V2 with NAME one of "
                             f"{', '.join(PARAMS)}; got {spec!r}")
        try:
            out[name] = [PARAMS[name](v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"{name}: expected {PARAMS[name].__name__} values, got {vals!r}") from None
    if not out:
        raise UsageError("give at least one --vary NAME=V1,V2")
    return out


def sweep(imp_run: str | Path, round_: int, values: Mapping[str, Sequence], out: str | Path, *,
          epochs: int = 0, granularity: str = "element", batch_size: int = 64, pairs: int = 10,
          data_dir: str | None = None, progress: bool = True, runtimes: Sequence[str] | None = None,
          log: Callable[[str], None] = print) -> list[dict]:
    imp_run, out = Path(imp_run), Path(out)
    if not (imp_run / "config.json").exists():
        raise UsageError(f"{imp_run} is not a ticketsmith run directory (no config.json)")
    cfg = RunConfig.read(imp_run)
    if cfg.method != "imp" or cfg.structure != "none":
        raise UsageError(f"{imp_run}: sweep needs an unstructured IMP run")
    src, prev = round_dir(imp_run, round_), round_dir(imp_run, round_ - 1)
    if round_ < 1 or not (src / "masks.safetensors").exists() or not (prev / "round.json").exists():
        raise UsageError(f"{imp_run}: round {round_} has no mask or round {round_ - 1} is not finished")
    if epochs < 0:
        raise UsageError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1 or pairs < 3:
        raise UsageError(f"batch size must be >= 1 and pairs >= 3, got {batch_size} and {pairs}")
    # what every row depends on besides its own setting: a row made under others is not reused
    common = {"run": str(imp_run.resolve()), "round": round_, "epochs": epochs, "granularity": granularity,
              "batch_size": batch_size, "pairs": pairs, "runtimes": sorted(runtimes) if runtimes else None}
    run = Run(cfg, imp_run, data_dir=data_dir, progress=False)
    unstructured = Masks.load(src / "masks.safetensors")
    trained = run.trained(prev)
    dense = run.trained(round_dir(imp_run, 0))
    original = run.original_model()
    x, _ = run.structure_batch()
    shape = (run.ds.in_channels, *run.ds.image_size)
    settings = [("default", None)] + [(name, v) for name, vs in values.items() for v in vs]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, value in settings:
        key = f"{name}={value}" if value is not None else "default"
        f = out / f"setting_{key.replace('=', '_')}.json"
        if f.exists():
            row = records.read(f, "sweep-row")
            if row.get("settings") != common:
                before = row.get("settings") or {}
                diff = [f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in common.items() if before.get(k) != v]
                raise UsageError(f"{out} holds sweep rows made with other settings ({'; '.join(diff)}); "
                                 "choose another --out")
            rows.append(row)
            continue
        kw = dict(DEFAULTS)
        if value is not None:
            kw[name] = value
        log(f"sweep {key}: regroup")
        from .structure import channel_companions, regroup
        try:
            masks = regroup(unstructured, kw["t1"], "metis", width_ratio=kw["width_ratio"], t2=kw["t2"], b1=kw["b1"],
                            b2=kw["b2"], granularity=granularity, seed=cfg.seed)
        except UsageError as e:  # a setting that leaves a layer without any block
            row = {"setting": key, "param": name, "value": value, "error": str(e), "settings": common}
            write_json(f, row)
            rows.append(row)
            continue
        masks = channel_companions(trained, masks, x[:1])
        row = {"setting": key, "param": name, "value": value, "settings": common, "sparsity": masks.sparsity(),
               "unstructured_sparsity": unstructured.sparsity(),
               "blocks": sum(len(b) for b in masks.blocks.values())}
        ticket = run.trained(src) if epochs == 0 else _retrain(run, masks, epochs, key, progress, row)
        log(f"sweep {key}: bench at batch {batch_size}")
        res = bench.bench_ticket(dense, ticket, masks, shape, batch_sizes=(batch_size,), pairs=pairs,
                                 layerwise=False, runtimes=runtimes, original=original)
        head = bench.headline(res)  # fastest dense of any runtime vs fastest compact
        row.update(ideal_speedup=res["ideal_speedup"], speedup=head["speedup_median"],
                   speedup_min=head["speedup_min"], speedup_max=head["speedup_max"],
                   batch_size=batch_size, runtimes=res["runtimes"],
                   dense_runtime=head.get("dense_runtime", head["backend"]),
                   compact_runtime=head.get("compact_runtime", head["backend"]))
        write_json(f, row)
        rows.append(row)
    write_json(out / "sweep.json", {"run": str(imp_run), "round": round_, "epochs": epochs,
                                    "granularity": granularity, "rows": rows})
    from .io import write_text
    write_text(out / "sweep.md", to_markdown(rows, imp_run, round_, epochs, granularity, batch_size))
    plot(rows, out / "sweep.png")
    return rows


def _retrain(run: Run, masks: Masks, epochs: int, key: str, progress: bool, row: dict):
    """Retrain the ticket from the run's rewind point for `epochs` (a short budget runs the
    same schedule, compressed: LR milestones at the same fractions)."""
    model = run.new_model()
    load_state(model, run.out / "rewind.safetensors")
    masks.apply(model)
    c = run.cfg
    tcfg = TrainConfig(epochs=epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                       weight_decay=c.weight_decay, milestones=tuple(c.milestones), seed=c.seed,
                       channels_last=c.channels_last)
    result = Trainer(model, run.ds, tcfg, progress=progress, desc=f"{key} ").fit(masks)
    row.update(best_val_acc=result.best_val_acc, test_acc=result.test_acc_at_best, epochs=epochs)
    model.to(memory_format=torch.contiguous_format)
    return model


def to_markdown(rows, run, round_, epochs, granularity, batch_size) -> str:
    lines = [f"# Regroup sensitivity: {run}, round {round_}", "",
             f"Granularity {granularity}; retraining budget: "
             + (f"{epochs} epochs from the rewind point" if epochs else "none (speed and sparsity only)")
             + f"; speedup at batch {batch_size}, median of paired ratios, the fastest dense of the runtimes "
             "timed against the fastest compact.", "",
             "| setting | structured sparsity % | blocks | test acc % | speedup (min-max) | ideal |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | no block in some layer | - | - | - | - |")
            continue
        acc = f"{100 * r['test_acc']:.2f}" if "test_acc" in r else "-"
        lines.append(f"| {r['setting']} | {100 * r['sparsity']:.2f} | {r['blocks']} | {acc} | "
                     f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
                     f"{r['ideal_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = [p for p in PARAMS if any(r["param"] == p for r in rows)]
    default = next((r for r in rows if r["setting"] == "default" and "error" not in r), None)
    fig, axes = plt.subplots(3, max(1, len(params)), figsize=(3.2 * max(1, len(params)), 7), squeeze=False)
    metrics = [("sparsity", "structured sparsity %", 100), ("test_acc", "test accuracy %", 100),
               ("speedup", "speedup (x)", 1)]
    for j, p in enumerate(params):
        pts = sorted((r["value"], r) for r in rows if r["param"] == p and "error" not in r)
        for i, (key, label, scale) in enumerate(metrics):
            ax = axes[i][j]
            ys = [(v, r[key] * scale) for v, r in pts if key in r]
            if ys:
                ax.plot([v for v, _ in ys], [y for _, y in ys], "o-")
            if default is not None and key in default:
                ax.axhline(default[key] * scale, color="k", ls="--", lw=0.8)
            ax.set_xlabel(p)
            if j == 0:
                ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    fig.suptitle("Regroup hyper-parameters, one at a time (dashed: defaults)", fontsize=10)
    fig.tight_layout()
    from .io import save_figure
    save_figure(fig, path, 110)
    plt.close(fig)


__all__ = ["sweep", "parse_values", "PARAMS", "DEFAULTS"]

"""Reports a researcher would rather look at than read: PNG plots, `report.md`, and a
self-contained `report.html`, made from finished (or partial) run directories.

- accuracy vs sparsity, one curve per method, the dense accuracy as a line, each method's
  extreme sparsity (the largest sparsity whose test accuracy is still >= dense) marked;
- end-to-end time saving vs sparsity per method, one panel per batch size (from bench.json);
- layer-wise speedup bars (the paper's Figure 7) for any architecture;
- mask pictures of chosen layers side by side, rows and columns reordered so that each
  regrouped block is one rectangle, outlined;
- a table per run: round, sparsity, val/test accuracy, MACs, time saving.
"""
from __future__ import annotations

import base64
import html
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import records  # noqa: E402
from ..errors import ArtifactError, UsageError  # noqa: E402
from ..io import save_figure, write_json, write_text  # noqa: E402
from ..masks import Masks  # noqa: E402
from ..runs import summarize_run  # noqa: E402
from . import evidence  # noqa: E402

DPI = 110
SIZE = (7.0, 4.5)  # inches: 770 x 495 pixels


@dataclass
class RunView:
    """What the report needs of one run directory."""
    path: Path
    label: str
    config: dict
    summary: dict
    bench: dict[int, dict] = field(default_factory=dict)  # round -> bench.json

    @property
    def done(self) -> list[dict]:
        return [r for r in self.summary["rounds"] if r["status"] == "done"]


def method_label(cfg: dict) -> str:
    """The paper's name for what a run did."""
    method = cfg.get("method", "imp")
    if method == "imp":
        s = cfg.get("structure", "none")
        if s == "none":
            name = "IMP"
        elif cfg.get("structure_every_round"):
            name = {"regroup": "Group-aware IMP", "refill": "IMP-Refill (every round)",
                    "refill+": "IMP-Refill+ (every round)"}[s]
        else:
            name = {"refill": "IMP-Refill", "refill+": "IMP-Refill+", "regroup": "IMP-Regroup"}[s]
        if s == "regroup" and cfg.get("regroup_granularity", "element") == "channel":
            name += " (channel blocks)"
        if s in ("refill", "refill+"):  # which coupling: old configs' refill_coupled (default on)
            coupling = cfg.get("refill_coupling") or ("shared" if cfg.get("refill_coupled", True) else "none")
            name += {"none": " (per layer)", "shared": " (shared)", "union": " (union)"}[coupling]
    elif method == "oneshot":
        name = cfg.get("source", "omp").upper()
        if cfg.get("structure", "none") != "none":
            name += "-" + {"refill": "Refill", "refill+": "Refill+", "regroup": "Regroup"}[cfg["structure"]]
    elif method == "dense":
        name = "Dense"
    else:
        name = {"srigl": "SRigL", "rigl": "RigL", "set": "SET"}.get(method, method)
        if method == "srigl" and not cfg.get("dst_ablation", True):  # noqa: SIM102
            name += " (no ablation)"
    if cfg.get("reinit") == "random":
        name = f"Random ticket ({name})"
    if cfg.get("null_mask"):
        name = f"Null mask ({name})"
    return name


def load_run(path: str | Path) -> RunView:
    path = Path(path)
    summary = summarize_run(path)  # raises a UsageError for a non-run directory
    cfg = summary["config"]
    view = RunView(path, method_label(cfg), cfg, summary)
    for r in summary["rounds"]:
        f = path / f"round_{r['round']:02d}" / "bench.json"
        if f.exists():
            try:
                view.bench[r["round"]] = records.read(f, "bench")
            except ArtifactError:
                r["bench"] = "corrupt"
    return view


def md_text(value) -> str:
    """A value from a record or the command line, safe inside one Markdown line or table cell:
    one line, no table or image syntax (a crafted model name or title must not become an image
    the HTML page would inline)."""
    text = " ".join(str(value).split())
    return html.escape(text, quote=False).replace("|", "&#124;").replace("!", "&#33;").replace("[", "&#91;") \
        .replace("]", "&#93;").replace("`", "&#96;").replace("#", "&#35;")


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def group_key(v: RunView) -> tuple:
    """Runs are compared only within the same model, dataset, width and training budget."""
    c = v.config
    return (c.get("model"), c.get("dataset"), c.get("width", 1.0), c.get("epochs"))


def group_name(key: tuple) -> str:
    model, dataset, width, epochs = (md_text(k) for k in key)
    return f"{model}{'' if width == '1.0' else f' x{width}'} on {dataset}, {epochs} epochs"


def dense_accuracy(runs: Sequence[RunView]) -> float | None:
    """Mean test accuracy of the dense network over the seeds (each distinct dense run once,
    see `evidence.dense_by_seed`; a sparse-training run's round 0 is sparse: it does not count)."""
    per_seed = evidence.dense_by_seed(runs)
    return sum(per_seed.values()) / len(per_seed) if per_seed else None


def _save(fig, path: Path) -> Path:
    save_figure(fig, path, DPI)
    plt.close(fig)
    return path


def x_axis(vs: Sequence[evidence.Verdict], asked: str = "auto") -> str:
    """The sparsity the plots use: effective where every point has it recorded (asked 'auto' or
    'effective'), else the mask's."""
    if asked == "mask":
        return "mask"
    return "effective" if vs and all(v.effective is not None for v in vs) else "mask"


def plot_accuracy(vs: Sequence[evidence.Verdict], dense: dict[int, float], out: Path,
                  suffix: str = "", axis: str = "auto") -> Path:
    """Mean test accuracy vs sparsity per arm, error bars = sd over seeds; the dense mean with a
    band of its sd; stars where the decision rule says winner."""
    fig, ax = plt.subplots(figsize=SIZE)
    axis = x_axis(vs, axis)
    arms: dict[str, list[evidence.Verdict]] = {}
    for v in vs:
        if v.accuracy is not None:
            arms.setdefault(v.arm, []).append(v)
    for label, pts in arms.items():
        pts = sorted(pts, key=lambda v: (v.effective if axis == "effective" else v.sparsity) or 0)
        xs = [100 * ((v.effective if axis == "effective" else v.sparsity) or 0) for v in pts]
        ys = [100 * v.accuracy for v in pts]
        err = [100 * (v.accuracy_sd or 0) for v in pts]
        n = max(v.n for v in pts)
        cont = ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=f"{label} (n<={n})",
                           ls="--" if pts[0].verdict == "control" else "-")
        colour = cont.lines[0].get_color()
        for x, y, v in zip(xs, ys, pts):
            if v.verdict == "winner":
                ax.plot(x, y, "*", ms=15, color=colour, mec="k")
    if dense:
        accs = [100 * a for a in dense.values()]
        m = sum(accs) / len(accs)
        sd = (sum((a - m) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        ax.axhline(m, color="k", ls="--", lw=1, label=f"dense {m:.2f}% (n={len(accs)} seeds)")
        if sd:
            ax.axhspan(m - sd, m + sd, color="k", alpha=0.1)
    ax.set_xlabel(f"{axis} sparsity (%)" + (" (what the compact model keeps)" if axis == "effective" else
                                             " (of the mask)"))
    ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
    ax.set_title("Test accuracy vs sparsity (star: winner by the decision rule)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / f"accuracy_vs_sparsity{suffix}.png")


def _saving_range(res: dict) -> tuple[float, float, float]:
    """Time saving at the median, lowest and highest paired ratio of one bench result."""
    def saving(ratio):
        return 1 - 1 / ratio if ratio else float("nan")
    med = res["time_saving"]
    return med, saving(res.get("speedup_min", res.get("speedup_median"))), \
        saving(res.get("speedup_max", res.get("speedup_median")))


def headline_rows(bench_result: dict) -> list[dict]:
    """The rows a time saving is read from: the fastest-vs-fastest rows (the fastest dense of
    any runtime against the fastest compact) where the bench timed several runtimes, else the
    eager PyTorch rows of a single-runtime bench."""
    rows = bench_result.get("results", [])
    fastest = [r for r in rows if r.get("backend") == "fastest"]
    return fastest or [r for r in rows if r.get("backend", "torch") == "torch"]


def bench_points(view: RunView, axis: str = "mask"
                 ) -> dict[tuple[int, int], list[tuple[float, float, float, float]]]:
    """(batch size, threads) -> [(sparsity, time saving at the median, min and max paired ratio)]
    from the run's bench results (`headline_rows`); the sparsity is the mask's or (axis
    'effective') the effective one, from the round or its bench record."""
    if axis == "effective":
        sparsity = {r["round"]: r.get("effective_sparsity") if r.get("effective_sparsity") is not None
                    else view.bench.get(r["round"], {}).get("effective_sparsity") for r in view.done}
    else:
        sparsity = {r["round"]: r.get("sparsity") for r in view.done}
    out: dict[tuple[int, int], list] = {}
    for rnd, b in sorted(view.bench.items()):
        if sparsity.get(rnd) is None:
            continue
        for res in headline_rows(b):
            key = (res["batch_size"], res.get("threads", 0))
            out.setdefault(key, []).append((sparsity[rnd], *_saving_range(res)))
    return {k: sorted(v) for k, v in out.items()}


def plot_time_saving(runs: Sequence[RunView], out: Path, suffix: str = "", axis: str = "mask") -> Path:
    """One panel per batch size, one line per method and thread count; error bars span the
    lowest to the highest paired ratio (the machine drifts: a single ratio means little)."""
    per_method: dict[tuple[str, int], dict[int, list]] = {}  # a method's runs merged, per thread count
    for v in runs:
        for (b, t), pts in bench_points(v, axis=axis).items():
            per_method.setdefault((v.label, t), {}).setdefault(b, []).extend(pts)
    curves = [(key, {b: sorted(p) for b, p in d.items()}) for key, d in per_method.items()]
    threads = {t for (_, t), _ in curves}
    batches = sorted({b for _, p in curves for b in p})
    n = max(1, len(batches))
    fig, axes = plt.subplots(1, n, figsize=(SIZE[0], SIZE[1]), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], batches or [None]):
        for (label, t), pts in curves:
            if b in pts:
                p = pts[b]
                ys = [100 * m for _, m, _, _ in p]
                err = [[100 * (m - lo) for _, m, lo, _ in p], [100 * (hi - m) for _, m, _, hi in p]]
                ax.errorbar([100 * x[0] for x in p], ys, yerr=err, marker="o", ms=4, capsize=3,
                            label=label + (f", {t} thread{'s' if t != 1 else ''}" if len(threads) > 1 or t else ""))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"batch {b}" if b is not None else "no bench results yet")
        ax.set_xlabel(f"{axis} sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("end-to-end time saving vs dense (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(fontsize=7)
    fig.suptitle("Time saving vs sparsity (CPU; fastest dense of any runtime timed vs the fastest "
                 "compact where several were timed; median, bars: min-max of paired ratios)", fontsize=8)
    fig.tight_layout()
    return _save(fig, out / f"time_saving{suffix}.png")


def pick_round(view: RunView) -> int | None:
    """The round a per-ticket picture shows: the sparsest benched sparse round."""
    sparse = {x["round"] for x in view.done if x.get("sparsity")}  # DST: round 0 is sparse
    benched = [r for r in view.bench if r in sparse]
    return max(benched) if benched else None


def plot_layerwise(runs: Sequence[RunView], out: Path, suffix: str = "",
                   batch_size: int | None = None) -> Path:
    chosen = [(v, pick_round(v)) for v in runs]
    chosen = [(v, r) for v, r in chosen if r is not None and v.bench[r].get("layers")]
    fig, ax = plt.subplots(figsize=(max(SIZE[0], 0.35 * 30), SIZE[1]))
    if not chosen:
        ax.text(0.5, 0.5, "no layer-wise bench results", ha="center", va="center")
        ax.set_axis_off()
        fig.tight_layout()
        return _save(fig, out / f"layerwise_speedup{suffix}.png")
    b = batch_size or max(row["batch_size"] for v, r in chosen for row in v.bench[r]["layers"])
    names: list[str] = []
    for v, r in chosen:
        for row in v.bench[r]["layers"]:
            if row["batch_size"] == b and row["layer"] not in names:
                names.append(row["layer"])
    width = 0.8 / len(chosen)
    for i, (v, r) in enumerate(chosen):
        rows = {row["layer"]: row for row in v.bench[r]["layers"] if row["batch_size"] == b}
        sparsity = next((x["sparsity"] for x in v.done if x["round"] == r), None)
        ax.bar([j + i * width for j in range(len(names))],
               [rows[n]["speedup_median"] if n in rows else 0 for n in names], width,
               label=f"{v.label}, round {r} ({_pct(sparsity)}% sparse)")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("layer speedup vs dense (x)")
    ax.set_title(f"Layer-wise speedup, batch {b} (conv and linear layers)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / f"layerwise_speedup{suffix}.png")


def block_order(mask2d: torch.Tensor, blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column orders that bring each block's rows and columns together (blocks in
    order, first appearance wins); without blocks, rows by how many weights they keep."""
    rows_seen: dict[int, None] = {}
    cols_seen: dict[int, None] = {}
    for b in blocks or []:
        rows_seen.update((int(i), None) for i in b.rows.tolist())
        cols_seen.update((int(i), None) for i in b.cols.tolist())
    rest_r = [i for i in range(mask2d.shape[0]) if i not in rows_seen]
    rest_c = [i for i in range(mask2d.shape[1]) if i not in cols_seen]
    if not blocks:
        rest_r = sorted(rest_r, key=lambda i: -int(mask2d[i].sum()))
    return torch.tensor(list(rows_seen) + rest_r), torch.tensor(list(cols_seen) + rest_c)


def plot_masks(panels: Sequence[tuple[str, Masks]], layer: str, out: Path, name: str) -> Path:
    """Side-by-side pictures of one layer's mask from several runs (paper Fig. A9): kept
    weights black, each regroup block in its own colour (blocks of later passes share rows
    with earlier ones, so colours show them where outlines could not)."""
    from matplotlib.colors import ListedColormap
    palette = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, len(panels), figsize=(max(SIZE[0] * 1.3, 2.3 * len(panels)), SIZE[1]),
                             squeeze=False)
    for ax, (title, masks) in zip(axes[0], panels):
        m = masks[layer].reshape(masks[layer].shape[0], -1)
        blocks = masks.blocks.get(layer) or []
        img = m.to(torch.int64)  # 0 pruned, 1 kept, 2 + i block i
        for i, b in enumerate(blocks):
            img[b.rows[:, None], b.cols[None, :]] = 2 + i % len(palette)
        rows, cols = block_order(m, blocks)
        n_colours = 2 + (min(len(blocks), len(palette)) if blocks else 0)
        cmap = ListedColormap(["white", "black", *palette][:n_colours])
        ax.imshow(img[rows][:, cols].numpy(), cmap=cmap, vmin=0, vmax=n_colours - 1,
                  aspect="auto", interpolation="nearest")
        ax.set_title(textwrap.fill(title, 24) + f"\n{100 * (1 - float(m.float().mean())):.1f}% sparse"
                     + (f", {len(blocks)} blocks" if blocks else ""), fontsize=8)
        ax.set_xlabel("columns, reordered", fontsize=7)
        ax.set_ylabel("output channels, reordered", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"Mask of {layer} (white = pruned, black = kept, colours = regroup blocks; "
                 "columns = c_in x kh x kw)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / f"masks_{name}.png")


def mask_sources(runs: Sequence[RunView]) -> list[tuple[str, Masks]]:
    """Each run's mask at one round for all (the last round every run finished), so the
    pictures compare the same IMP step; a run without that round shows its last one."""
    done = [{x["round"] for x in v.done if x["round"] > 0} for v in runs]
    common = set.intersection(*done) if done else set()
    panels = []
    for v, rounds in zip(runs, done):
        r = max(common) if common else max(rounds, default=None)
        if r is None:
            continue
        f = v.path / f"round_{r:02d}" / "masks.safetensors"
        if f.exists():
            try:
                panels.append((f"{v.label} (round {r})", Masks.load(f)))
            except ArtifactError:
                continue
    return panels


def choose_layers(panels: Sequence[tuple[str, Masks]], layers: Sequence[str] | None) -> list[str]:
    """The layers to picture: those asked for (each must be in every run's masks), or the
    largest layer and one from the middle."""
    if not panels:
        return []
    common = [n for n in panels[0][1].weight_names if all(n in m for _, m in panels)]
    if layers:
        missing = [n for n in layers if n not in common]
        if missing:
            raise UsageError(f"layers not in every run's masks: {', '.join(missing)}; "
                             f"choose from: {', '.join(common)}")
        return list(layers)
    by_size = sorted(common, key=lambda n: -panels[0][1][n].numel())
    return list(dict.fromkeys([by_size[0], common[len(common) // 2]]))[:2] if common else []


def run_table(v: RunView) -> list[str]:
    lines = [f"#### {v.label}: {md_text(v.path)}" + ("" if v.summary["complete"] else " (partial)"), "",
             "| round | mask sparsity % | effective sparsity % | compact params | unstructured % | val acc % "
             "| test acc % | best epoch | s / epoch | compact MACs | time saving % b=1 (min to max) | time saving % b=64 | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in v.summary["rounds"]:
        b = v.bench.get(r["round"], {})
        saving = {res["batch_size"]: _saving_range(res) for res in headline_rows(b)}
        macs = b.get("compact", {}).get("macs")

        def cell(batch):
            if batch not in saving:
                return "-"
            med, lo, hi = saving[batch]
            return f"{_pct(med)} ({_pct(lo)} to {_pct(hi)})"
        # older rounds did not record the compact model's parameters; their bench did
        params = r.get("compact_params") or b.get("compact", {}).get("params")
        spe = r.get("seconds_per_epoch")
        lines.append(f"| {r['round']} | {_pct(r.get('sparsity'))} | {_pct(r.get('effective_sparsity'))} "
                     f"| {f'{params:,}' if params else '-'} | {_pct(r.get('unstructured_sparsity'))} "
                     f"| {_pct(r.get('best_val_acc'))} | {_pct(r.get('test_acc'))} | {r.get('best_epoch', '-')} "
                     f"| {f'{spe:.0f}' if spe else '-'} | {f'{macs:,}' if macs else '-'} "
                     f"| {cell(1)} | {cell(64)} "
                     f"| {r['status']}{' (' + str(r.get('epochs_done')) + ' epochs)' if r['status'] == 'partial' else ''}"
                     f"{(': ' if r['status'] == 'corrupt' else ' (corrupt: ') + ', '.join(r['corrupt']) + ('' if r['status'] == 'corrupt' else ')') if r.get('corrupt') else ''} |")
    return lines + [""]


def winners_table(vs: Sequence[evidence.Verdict]) -> list[str]:
    """Per arm: the largest sparsity at which the rule says winner (never decided by eye)."""
    lines = ["| arm | largest winning effective sparsity % (mask %) | test acc % | n | points decided |",
             "|---|---|---|---|---|"]
    arms: dict[str, list[evidence.Verdict]] = {}
    for v in vs:
        arms.setdefault(v.arm, []).append(v)
    for label, pts in arms.items():
        if pts[0].verdict == "control":
            continue
        wins = [v for v in pts if v.verdict == "winner"]
        counts = ", ".join(f"{k} {sum(v.verdict == k for v in pts)}" for k in ("winner", "refuted", "inconclusive"))
        if wins:
            w = max(wins, key=lambda v: (v.effective if v.effective is not None else v.sparsity) or 0)
            lines.append(f"| {label} | {_pct(w.effective)} ({_pct(w.sparsity)}) | "
                         f"{_pct(w.accuracy)} | {w.n} | {counts} |")
        else:
            lines.append(f"| {label} | none | - | {max(v.n for v in pts)} | {counts} |")
    return lines


def make_report(run_dirs: Sequence[str | Path], out: str | Path, layers: Sequence[str] | None = None,
                title: str = "ticketsmith report", axis: str = "auto") -> Path:
    """Write the plots, report.md, verdicts.md and report.html for the given runs into `out`.

    Runs of one method under the same settings but the seed are the seeds of one arm (mean ±
    sd, n); each arm is compared with the dense network of the same seed and with its controls
    by the pre-registered decision rule (`evidence`, docs/decision_rule.md)."""
    if not run_dirs:
        raise UsageError("give at least one run directory")
    if axis not in ("auto", "effective", "mask"):
        raise UsageError(f"sparsity axis must be auto, effective or mask, got {axis!r}")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    groups: dict[tuple, list[RunView]] = {}
    for v in runs:
        groups.setdefault(group_key(v), []).append(v)
    pictures, decided = {}, {}  # decided before anything is written: bad input writes nothing
    for key, members in groups.items():
        panels = mask_sources(members)
        pictures[key] = (panels, choose_layers(panels, layers))
        decided[key] = evidence.verdicts(members)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {md_text(title)}", ""]
    verdict_md = [f"# Verdicts: {md_text(title)}", "",
                  f"Generated by `ticketsmith report` from {len(runs)} run directories; regenerate "
                  "with the same command, never edit by hand.", ""]
    plots: list[Path] = []
    for key, members in groups.items():
        suffix = "" if len(groups) == 1 else "_" + re.sub(r"[^A-Za-z0-9]+", "_", "_".join(map(str, key)))
        panels, chosen = pictures[key]
        vs, dense = decided[key]
        x = x_axis(vs, axis)
        group_plots = [plot_accuracy(vs, dense, out, suffix, x), plot_time_saving(members, out, suffix, x),
                       plot_layerwise(members, out, suffix)]
        group_plots += [plot_masks(panels, n, out, re.sub(r"[^A-Za-z0-9]+", "_", n) + suffix) for n in chosen]
        plots += group_plots
        table = evidence.verdict_table(vs, dense)
        compared = evidence.comparison_table(evidence.comparisons(members))
        if compared:
            table += [""] + compared
        n_dense = evidence.dense_runs(members)
        head = [f"## {group_name(key)}", "",
                f"Dense: {n_dense} distinct dense run{'s' if n_dense != 1 else ''}. Plots use the "
                f"{x} sparsity" + (" (effective sparsity is not recorded for every round)"
                                    if axis == "effective" and x == "mask" else "") + ".", ""]
        md += head + winners_table(vs) + [""] + table + [""]
        verdict_md += head + table + [""]
        for p in group_plots:
            md += [f"![{p.stem}]({p.name})", ""]
        md += ["### Runs", ""]
        for v in members:
            md += run_table(v)
    text = "\n".join(md) + "\n"
    write_text(out / "report.md", text)
    write_text(out / "verdicts.md", "\n".join(verdict_md) + "\n")
    write_text(out / "report.html", _html(text, out, title, {p.name for p in plots}))
    write_json(out / "report.json", {"runs": [str(v.path) for v in runs],
                                     "plots": [p.name for p in plots],
                                     "verdicts": [{**vars(v), "point": list(v.point)}
                                                  for vs, _ in decided.values() for v in vs]})
    return out / "report.md"


def _html(markdown: str, folder: Path, title: str, plots: set[str]) -> str:
    """A self-contained HTML page: the report's tables and headings, and inlined exactly the
    plot files this report wrote (`plots`): nothing else on disk is ever read into it."""
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[-| ]+\|", r)]
            cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
                        + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if (m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line)) and m.group(2) in plots:
            data = base64.b64encode((folder / m.group(2)).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")

"""Seeds, controls and the pre-registered decision rule (docs/decision_rule.md).

An *arm* is every run of one method under one set of settings: runs that differ only by seed
(and by where their IMP chain came from) are the seeds of one arm. Each arm has *points*: the
rounds of an IMP / one-shot run, or the target sparsity of a sparse-training run. At every point
the rule compares the ticket with the dense network of the same seed (Δ, in points) and with
the arm's controls (the same arm with a random initialisation, or the structure-less null), and
gives a verdict: winner, refuted or inconclusive. Nothing is called a winner by eye.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import UsageError

# The rule, in points of test accuracy (PROTOCOL.md, "The decision rule"). Changing a value here
# changes every verdict: it is a protocol change and needs a dated section in PROTOCOL.md.
MIN_SEEDS = 2            # fewer paired seeds than this: inconclusive
WIN_MEAN = -0.2          # winner: mean Δ >= this ...
WIN_EACH = -0.5          # ... and every seed's Δ >= this ...
CONTROL_MARGIN = 0.5     # ... and the ticket beats each control by >= this on every shared seed
REFUTE_MEAN = -0.5       # refuted: mean Δ <= this with every seed's Δ < 0 ...
CONTROL_CLOSE = 0.2      # ... or a control's mean paired gap is <= this
EQUAL_WITHIN = 0.2       # paired comparison of two arms: |mean gap| <= this is "equal"

# settings that do not make a different arm: the seed, where an IMP chain was read from, and how
# many rounds a run has (a shorter run is the same arm with its later points missing)
NOT_ARM = ("seed", "chain", "rounds")
# settings that make a control of an arm rather than another method
CONTROL_FIELDS = ("reinit", "null_mask")
DST = ("srigl", "rigl", "set")


def _canon(cfg: dict) -> dict:
    """A config with old spellings read as today's (see RunConfig.from_json)."""
    from ..runs import RunConfig
    try:
        return RunConfig.from_json(cfg).identity()
    except (TypeError, UsageError):
        return dict(cfg)


def arm_settings(cfg: dict) -> dict:
    """What defines the arm of a run: its settings but the seed (and the chain's path); for a
    sparse-training run also but its target sparsity (a point of the arm's curve)."""
    c = {k: v for k, v in _canon(cfg).items() if k not in NOT_ARM}
    if c.get("method") in DST:
        c.pop("sparsity", None)
    return c


def point_of(cfg: dict, rnd: dict) -> tuple | None:
    """Where a finished round sits on its arm: ('round', r) for IMP / one-shot rounds, ('sparsity',
    s) for a sparse-training run, ('dense', 0) for a dense round (None: not a ticket)."""
    method = cfg.get("method", "imp")
    if method in DST:
        return ("sparsity", float(cfg.get("sparsity", [0.0])[0]))
    if rnd["round"] == 0:
        return ("dense", 0)
    return ("round", rnd["round"])


def point_name(point: tuple) -> str:
    kind, v = point
    return f"round {v}" if kind == "round" else (f"{100 * v:g}%" if kind == "sparsity" else "dense")


@dataclass
class Arm:
    label: str
    settings: dict
    runs: dict[int, object] = field(default_factory=dict)  # seed -> RunView (one per seed)
    dst_runs: dict[tuple[float, int], object] = field(default_factory=dict)

    @property
    def is_control(self) -> bool:
        return self.settings.get("reinit") == "random" or bool(self.settings.get("null_mask"))

    @property
    def structured(self) -> bool:
        return self.settings.get("structure", "none") != "none"

    def results(self) -> dict[tuple, dict[int, dict]]:
        """point -> seed -> the round's record, for finished sparse rounds."""
        out: dict[tuple, dict[int, dict]] = {}
        views = list(self.runs.items()) + [(seed, v) for (_, seed), v in self.dst_runs.items()]
        for seed, v in views:
            for r in v.done:
                p = point_of(v.config, r)
                if p is None or p[0] == "dense" or r.get("test_acc") is None:
                    continue
                out.setdefault(p, {})[seed] = r
        return dict(sorted(out.items()))

    def seeds(self) -> set[int]:
        return set(self.runs) | {s for _, s in self.dst_runs}


def _diff(a: dict, b: dict) -> list[str]:
    return [f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def build_arms(views: Sequence) -> list[Arm]:
    """Group runs into arms by their label; runs with one label must differ only by seed (a
    report never averages runs of different models, datasets or budgets as seeds)."""
    arms: dict[str, Arm] = {}
    for v in views:
        settings = arm_settings(v.config)
        seed = int(_canon(v.config).get("seed", 0))
        arm = arms.get(v.label)
        if arm is None:
            arm = arms[v.label] = Arm(v.label, settings)
        elif arm.settings != settings:
            other = next(iter(arm.runs.values()), None) or next(iter(arm.dst_runs.values()))
            raise UsageError(f"{other.path} and {v.path} are both {v.label!r} runs but differ in "
                             f"{', '.join(_diff(arm.settings, settings))}: they are not seeds of one "
                             "arm; give them to separate reports")
        if v.config.get("method") in DST:
            key = (float(v.config.get("sparsity", [0.0])[0]), seed)
            if key in arm.dst_runs:
                raise UsageError(f"{arm.dst_runs[key].path} and {v.path}: two {v.label!r} runs of seed "
                                 f"{seed} at sparsity {key[0]}")
            arm.dst_runs[key] = v
        else:
            if seed in arm.runs:
                raise UsageError(f"{arm.runs[seed].path} and {v.path}: two {v.label!r} runs of seed {seed}")
            arm.runs[seed] = v
    return list(arms.values())


def _dense_records(views: Sequence) -> dict[str, tuple[int, float]]:
    """Each distinct dense run once: the dense round 0 of IMP-family runs and dense runs (a run
    that adopted another's chain holds a byte-identical copy of its round 0: counted once)."""
    seen: dict[str, tuple[int, float]] = {}
    for v in views:
        if v.config.get("method") in DST:
            continue  # a sparse-training run's round 0 is sparse
        for r in v.done:
            if r["round"] == 0 and not r.get("sparsity") and r.get("test_acc") is not None:
                f = v.path / "round_00" / "round.json"
                ident = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else \
                    json.dumps(r, sort_keys=True)
                seen[ident] = (int(_canon(v.config).get("seed", 0)), r["test_acc"])
    return seen


def dense_by_seed(views: Sequence) -> dict[int, float]:
    """Test accuracy of the dense network per seed, each distinct dense run counted once, the
    distinct runs of one seed averaged."""
    per_seed: dict[int, list[float]] = {}
    for seed, acc in _dense_records(views).values():
        per_seed.setdefault(seed, []).append(acc)
    return {s: statistics.fmean(a) for s, a in sorted(per_seed.items())}


def dense_runs(views: Sequence) -> int:
    """How many distinct dense runs `dense_by_seed` counts."""
    return len(_dense_records(views))


def controls_of(arm: Arm, arms: Sequence[Arm]) -> list[Arm]:
    """The arms that are controls of `arm`: its settings but a random init or the null mask."""
    if arm.is_control:
        return []
    base = {k: v for k, v in arm.settings.items() if k not in CONTROL_FIELDS}
    return [a for a in arms if a is not arm and a.is_control
            and {k: v for k, v in a.settings.items() if k not in CONTROL_FIELDS} == base]


def _sd(xs: Sequence[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


@dataclass
class Verdict:
    arm: str
    point: tuple
    sparsity: float | None            # mean mask sparsity
    effective: float | None           # mean effective sparsity (None: not recorded)
    accuracy: float | None            # mean test accuracy
    accuracy_sd: float | None
    n: int
    seeds: list[int]
    missing: list[int]
    delta: list[float]                # per seed, points, in the order of `seeds`
    controls: list[dict]              # label, n, gaps, mean
    verdict: str
    why: str

    @property
    def mean_delta(self) -> float | None:
        return statistics.fmean(self.delta) if self.delta else None

    @property
    def sd_delta(self) -> float | None:
        return _sd(self.delta)


def decide(delta: Sequence[float], controls: Sequence[Sequence[float]], needs_control: bool) -> tuple[str, str]:
    """The pre-registered rule. `delta`: per seed, ticket - same-seed dense (points);
    `controls`: per control, per shared seed, ticket - control (points)."""
    n = len(delta)
    if n < MIN_SEEDS:
        return "inconclusive", f"n = {n} < {MIN_SEEDS} seeds"
    mean = statistics.fmean(delta)
    for gaps in controls:
        if len(gaps) >= MIN_SEEDS and statistics.fmean(gaps) <= CONTROL_CLOSE:
            return "refuted", f"a control is within {CONTROL_CLOSE} points (mean gap {statistics.fmean(gaps):+.2f})"
    if mean <= REFUTE_MEAN and all(d < 0 for d in delta):
        return "refuted", f"mean Δ {mean:+.2f} <= {REFUTE_MEAN}, every seed below dense"
    if mean >= WIN_MEAN and min(delta) >= WIN_EACH:
        usable = [g for g in controls if len(g) >= MIN_SEEDS]
        if needs_control and not usable:
            return "inconclusive", "no control finished on enough seeds"
        if any(min(g) < CONTROL_MARGIN for g in usable):
            return "inconclusive", f"a control is not beaten by {CONTROL_MARGIN} on every seed"
        if len(usable) < len(controls):
            return "inconclusive", "a control has too few shared seeds"
        return "winner", f"mean Δ {mean:+.2f} >= {WIN_MEAN}, every seed >= {WIN_EACH}" + (
            f", controls beaten by >= {CONTROL_MARGIN}" if usable else "")
    return "inconclusive", f"mean Δ {mean:+.2f}, worst seed {min(delta):+.2f}"


def verdicts(views: Sequence) -> tuple[list[Verdict], dict[int, float]]:
    """Every arm's verdict at every point (controls get their Δ but no verdict)."""
    arms = build_arms(views)
    dense = dense_by_seed(views)
    expected = sorted(set().union(*(a.seeds() for a in arms))) if arms else []
    out = []
    for arm in arms:
        if arm.label == "Dense":
            continue
        ctrls = [(c, c.results()) for c in controls_of(arm, arms)]
        for point, by_seed in arm.results().items():
            seeds = sorted(s for s in by_seed if s in dense)
            delta = [100 * (by_seed[s]["test_acc"] - dense[s]) for s in seeds]
            cinfo = []
            for c, cres in ctrls:
                shared = sorted(s for s in cres.get(point, {}) if s in by_seed)
                gaps = [100 * (by_seed[s]["test_acc"] - cres[point][s]["test_acc"]) for s in shared]
                cinfo.append({"label": c.label, "seeds": shared, "gaps": gaps,
                              "mean": statistics.fmean(gaps) if gaps else None})
            if arm.is_control:
                verdict, why = "control", "a control of another arm"
            else:
                verdict, why = decide(delta, [c["gaps"] for c in cinfo], arm.structured)
                if not cinfo and arm.structured and verdict == "inconclusive" and len(delta) >= MIN_SEEDS \
                        and "control" in why:
                    why = "no control run given"
            accs = [by_seed[s]["test_acc"] for s in seeds]
            out.append(Verdict(
                arm.label, point, _mean(r.get("sparsity") for r in by_seed.values()),
                _mean(r.get("effective_sparsity") for r in by_seed.values())
                if all(r.get("effective_sparsity") is not None for r in by_seed.values()) else None,
                statistics.fmean(accs) if accs else None, _sd(accs), len(seeds), seeds,
                [s for s in expected if s not in seeds], delta, cinfo, verdict, why))
    return out, dense


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[str, list[float]]:
    """Paired comparison of two arms' accuracies per seed: 'A better', 'B better', 'equal' or
    'inconclusive' (PROTOCOL.md)."""
    gaps = [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b))]
    if len(gaps) < MIN_SEEDS:
        return "inconclusive", gaps
    m = statistics.fmean(gaps)
    if m >= CONTROL_MARGIN and all(g > 0 for g in gaps):
        return "A better", gaps
    if m <= -CONTROL_MARGIN and all(g < 0 for g in gaps):
        return "B better", gaps
    if abs(m) <= EQUAL_WITHIN:
        return "equal", gaps
    return "inconclusive", gaps


# arms that differ in exactly one of these settings are compared with each other, seed by seed
COMPARED = ("method", "dst_ablation", "refill_coupling")


def comparisons(views: Sequence) -> list[dict]:
    """Paired comparisons of arms that differ in one compared setting only (e.g. SRigL vs RigL,
    SRigL with vs without ablation, refill couplings), at every point both have."""
    arms = [a for a in build_arms(views) if a.label != "Dense" and not a.is_control]
    out = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            diff = [k for k in set(a.settings) | set(b.settings) if a.settings.get(k) != b.settings.get(k)]
            if len(diff) != 1 or diff[0] not in COMPARED:
                continue
            ra, rb = a.results(), b.results()
            for point in sorted(set(ra) & set(rb)):
                acc_a = {s: r["test_acc"] for s, r in ra[point].items()}
                acc_b = {s: r["test_acc"] for s, r in rb[point].items()}
                verdict, gaps = paired(acc_a, acc_b)
                out.append({"a": a.label, "b": b.label, "setting": diff[0], "point": point,
                            "n": len(gaps), "gaps": gaps,
                            "mean": statistics.fmean(gaps) if gaps else None, "sd": _sd(gaps),
                            "verdict": {"A better": f"{a.label} better", "B better": f"{b.label} better"}
                            .get(verdict, verdict)})
    return out


def comparison_table(rows: Sequence[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["Paired comparisons (arms that differ in one setting; gap = A - B per shared seed, points; "
             f"'better': mean gap >= {CONTROL_MARGIN} with every seed on that side, 'equal': |mean| <= "
             f"{EQUAL_WITHIN}):", "",
             "| A | B | point | n | mean gap ± sd | per seed | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} | {r['b']} | {point_name(r['point'])} | {r['n']} | "
                     f"{fmt(r['mean'], signed=True)} ± {fmt(r['sd'])} | "
                     f"{', '.join(f'{g:+.2f}' for g in r['gaps']) or '-'} | **{r['verdict']}** |")
    return lines


def fmt(v: float | None, digits: int = 2, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def verdict_table(vs: Sequence[Verdict], dense: dict[int, float], x: str = "effective") -> list[str]:
    """The verdict table in Markdown (one row per arm and point)."""
    dense_txt = ", ".join(f"seed {s}: {100 * a:.2f}%" for s, a in dense.items()) or "none"
    lines = [f"Dense test accuracy per seed (each distinct dense run once): {dense_txt}.", "",
             "Verdicts by the pre-registered rule (docs/decision_rule.md): Δ = ticket - dense of "
             "the same seed, in points; controls: mean paired gap ticket - control (n).", "",
             "| arm | point | mask sparsity % | effective sparsity % | n | missing seeds | test acc % "
             "(mean ± sd) | mean Δ ± sd | worst Δ | controls | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in vs:
        ctrl = "; ".join(f"{c['label']}: {fmt(c['mean'], signed=True)} (n={len(c['seeds'])})"
                         for c in v.controls) or "-"
        acc = "-" if v.accuracy is None else f"{100 * v.accuracy:.2f} ± {fmt(None if v.accuracy_sd is None else 100 * v.accuracy_sd)}"
        lines.append(
            f"| {v.arm} | {point_name(v.point)} | {fmt(None if v.sparsity is None else 100 * v.sparsity, 1)} "
            f"| {fmt(None if v.effective is None else 100 * v.effective, 1)} | {v.n} "
            f"| {', '.join(map(str, v.missing)) or '-'} | {acc} "
            f"| {fmt(v.mean_delta, signed=True)} ± {fmt(v.sd_delta)} "
            f"| {fmt(min(v.delta) if v.delta else None, signed=True)} | {ctrl} "
            f"| **{v.verdict}** ({v.why}) |")
    return lines

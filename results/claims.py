"""The reading of the pre-registered protocol, claim by claim (results/PROTOCOL.md, "Claims and
how each is read"): applies each claim's registered condition to the verdicts and paired
comparisons that `ticketsmith report` computes from the finished runs, and writes
results/protocol/claims.md, and its table into results/README.md (between the markers). Never
edit either by hand; regenerate them with

    .venv/bin/python results/claims.py          (results/protocol.sh report runs it)

A claim whose arms are not finished on enough seeds reads "cannot decide (yet)" with what is
missing: a partial protocol is never read as a result.
"""
from __future__ import annotations

from pathlib import Path

from ticketsmith.report import load_run
from ticketsmith.report.evidence import comparisons, point_name, verdicts

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "protocol" / "runs"
OUT = ROOT / "protocol" / "claims.md"
README = ROOT / "README.md"  # its claims table (between the markers) is this table, copied
BEGIN, END = "<!-- claims table: begin (results/claims.py) -->", "<!-- claims table: end -->"
NETS = {"mlp": "mlp-*", "vgg": "vgg-e30-*", "resnet": "resnet-e30-*"}  # as protocol.sh report
REFILL, REGROUP, GAIMP = "IMP-Refill (per layer)", "IMP-Regroup", "Group-aware IMP"


def evidence(net: str):
    views = [load_run(d) for d in sorted(RUNS.glob(NETS[net])) if (d / "config.json").exists()]
    if not views:
        return [], []
    return verdicts(views)[0], comparisons(views)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def row(v) -> str:
    """One verdict with its figures: arm, point, effective sparsity, n, mean Δ ± sd, controls."""
    ctrl = "; ".join(f"{c['label']} gap {c['mean']:+.2f} (n={len(c['seeds'])})" for c in v.controls
                     if c["mean"] is not None)
    sd = f" ± {v.sd_delta:.2f}" if v.sd_delta is not None else ""
    md = f"{v.mean_delta:+.2f}{sd}" if v.mean_delta is not None else "-"
    return (f"{v.arm}, {point_name(v.point)}: effective {pct(v.effective)}, n={v.n}, mean Δ {md}"
            + (f", controls: {ctrl}" if ctrl else "") + f" → {v.verdict}")


def pair_row(c, effective=None) -> str:
    """One paired comparison with its figures: A - B, point, n, mean gap ± sd, verdict; with
    `effective` ((arm, point) -> effective sparsity), each side's effective sparsity as well."""
    sd = f" ± {c['sd']:.2f}" if c["sd"] is not None else ""
    eff = ""
    if effective:
        a, b = (effective.get((c[k], c["point"])) for k in ("a", "b"))
        eff = f" (effective {pct(a)} vs {pct(b)})"
    return (f"{c['a']} - {c['b']}, {point_name(c['point'])}{eff}: n={c['n']}, mean gap "
            f"{c['mean']:+.2f}{sd} → {c['verdict']}")


def ticket_claim(vs, arm: str, confirm, refute_scope, threshold_text: str) -> tuple[str, list[str]]:
    """Winner at a qualifying round confirms; refuted at every round in scope refutes."""
    rows = [v for v in vs if v.arm == arm]
    if not rows:
        return "cannot decide (yet): no finished round", []
    lines = [row(v) for v in rows]
    if any(v.verdict == "winner" and v.effective is not None and confirm(v.effective) for v in rows):
        return f"**confirmed** (a winner at effective sparsity {threshold_text})", lines
    scope = [v for v in rows if v.effective is not None and refute_scope(v.effective)]
    if scope and all(v.verdict == "refuted" for v in scope) and all(v.n >= 2 for v in rows):
        return "**refuted** (refuted at every round in the claim's range)", lines
    return "cannot decide (yet)", lines


def control_claim(vs) -> tuple[str, list[str]]:
    rows = [v for v in vs if v.arm in (REFILL, REGROUP) and v.controls]
    lines = [row(v) for v in rows]
    tested = [(v, c) for v in rows for c in v.controls if len(c["seeds"]) >= 2]
    if any(c["mean"] <= 0.2 for _, c in tested):
        return "**refuted** (a control within 0.2 points of its ticket)", lines
    if tested and all(min(c["gaps"]) >= 0.5 for _, c in tested) and all(
            len(c["seeds"]) >= 2 for v in rows for c in v.controls):
        return "**confirmed** (every ticket beats its controls by >= 0.5 on every shared seed)", lines
    return "cannot decide (yet)" + ("" if tested else ": no control finished on 2 seeds"), lines


def gaimp_claim(vs) -> tuple[str, list[str]]:
    def best(arm):
        wins = [v.effective for v in vs if v.arm == arm and v.verdict == "winner" and v.effective is not None]
        return max(wins) if wins else None
    rows = [v for v in vs if v.arm in (REGROUP, GAIMP)]
    lines = [row(v) for v in rows]
    done = {a: [v for v in rows if v.arm == a and v.n >= 2] for a in (REGROUP, GAIMP)}
    if len(done[REGROUP]) < 5 or len(done[GAIMP]) < 5:
        return "cannot decide (yet): both arms need their 5 rounds on >= 2 seeds", lines
    r, g = best(REGROUP), best(GAIMP)
    if r is None and g is None:  # PROTOCOL.md, 2026-12-06, "neither arm has a winning round"
        return ("cannot decide: neither arm has a winning round, so the registered measure (the "
                "largest winning effective sparsity) is undefined; read literally (none >= none) "
                "the rule would say refuted"), lines
    r, g = r or 0.0, g or 0.0  # an arm with no winning round has reached no sparsity
    if r - g >= 0.05:
        return f"**confirmed** (largest winning effective sparsity {pct(r)} vs {pct(g)})", lines
    if g >= r:
        return f"**refuted** (group-aware IMP's {pct(g)} >= IMP-Regroup's {pct(r)})", lines
    return "cannot decide", lines


def pair_claim(cs, a: str, b: str, points, confirm, refute) -> tuple[str, list[str]]:
    rows = [c for c in cs if {c["a"], c["b"]} == {a, b} and c["point"][1] in points]
    lines = [pair_row(c) for c in rows if c["mean"] is not None]
    verdicts_at = {c["point"][1]: c["verdict"] for c in rows}
    if set(verdicts_at) != set(points):
        return "cannot decide (yet): not every point compared", lines
    if refute(verdicts_at):
        return "**refuted**", lines
    if confirm(verdicts_at):
        return "**confirmed**", lines
    return "cannot decide", lines


def coupling_claim(cs, vs=()) -> tuple[str, list[str]]:
    """Read from the paired shared - none and union - none comparisons only (shared - union is
    not part of the claim), and only once both pairs have rounds 1-3 on the registered 2 seeds:
    a partial arm is never read as a result. The couplings keep different numbers of weights at
    the same round (union far more), so each line shows both sides' effective sparsity (from
    the verdicts `vs`): a gap at one round may also be a gap in sparsity."""
    rows = [c for c in cs if c["setting"] == "refill_coupling" and REFILL in (c["a"], c["b"])]
    effective = {(v.arm, v.point): v.effective for v in vs}
    lines = [pair_row(c, effective) for c in rows if c["mean"] is not None]
    if not rows:
        return ("cannot decide (yet): no paired comparison yet (a round needs a coupled and "
                "the per-layer refill on one seed)"), lines
    done = {(c["a"], c["b"], c["point"][1]) for c in rows if c["n"] >= 2}
    if len(done) < 2 * 3:
        return ("cannot decide (yet): shared - none and union - none need rounds 1-3 "
                "on >= 2 seeds"), lines

    def other(c):
        return c["b"] if c["a"] == REFILL else c["a"]

    def where(c):
        coupled, per_layer = (effective.get((arm, c["point"])) for arm in (other(c), REFILL))
        sides = (f" ({pct(coupled)} effective, per layer {pct(per_layer)})"
                 if coupled is not None and per_layer is not None else "")
        return f"{other(c)} at {point_name(c['point'])}{sides}"
    wins = [where(c) for c in rows if c["verdict"] == f"{REFILL} better"]
    if wins:
        # the registered rule needs one such round; a round where a coupled refill is better is
        # not part of it, but the reading names it so the verdict is not read wider than it is
        losses = [where(c) for c in rows if c["verdict"] == f"{other(c)} better"]
        return ("**confirmed** (per-layer refill better than " + "; ".join(wins) + ")"
                + (f"; but a coupled refill better than per-layer refill: {'; '.join(losses)}"
                   if losses else "")), lines
    if all(c["verdict"] == "equal" for c in rows):
        return "**refuted** (equal at every round)", lines
    return "cannot decide", lines


def into_readme(readme: Path, table: list[str]) -> None:
    """Replace what stands between the markers in `readme` with `table` (so the page states each
    claim's reading without a hand-typed figure); a readme without both markers is an error."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    readme.write_text("\n".join([head + BEGIN, *table, END + rest.split(END, 1)[1]]))


def main() -> None:
    vgg, _ = evidence("vgg")
    _, mlp = evidence("mlp")
    resnet_vs, resnet = evidence("resnet")
    claims = [
        ("channel-wise (Refill) tickets to ~50%", "V-Refill rounds 1-2",
         ticket_claim(vgg, REFILL, lambda e: e >= 0.45, lambda e: e <= 0.60, ">= 45%")),
        ("group-wise (Regroup) tickets to ~78%", "V-Regroup rounds 1-5",
         ticket_claim(vgg, REGROUP, lambda e: e >= 0.70, lambda e: e >= 0.70, ">= 70%")),
        ("random tickets are worse", "V-*-reinit, V-Regroup-null", control_claim(vgg)),
        ("group-aware IMP worse than IMP-Regroup", "V-GAIMP vs V-Regroup", gaimp_claim(vgg)),
        ("SRigL within ~0.1 of RigL", "M, SRigL vs RigL at 90 and 95%",
         pair_claim(mlp, "RigL", "SRigL", (0.9, 0.95),
                    lambda v: all(x in ("equal", "SRigL better") for x in v.values()),
                    lambda v: any(x == "RigL better" for x in v.values()))),
        ("ablation helps at extreme sparsity", "M, SRigL vs SRigL without ablation at 98 and 99%",
         pair_claim(mlp, "SRigL", "SRigL (no ablation)", (0.98, 0.99),
                    lambda v: any(x == "SRigL better" for x in v.values())
                    and not any(x == "SRigL (no ablation) better" for x in v.values()),
                    lambda v: all(x in ("equal", "SRigL (no ablation) better") for x in v.values()))),
        ("coupling refill across residual additions costs accuracy (ours)",
         "R, shared - none and union - none per round", coupling_claim(resnet, resnet_vs)),
    ]
    out = ["# The protocol's claims, read by the registered rule", "",
           "Generated by `results/claims.py` from the finished runs in `results/protocol/runs/` "
           "(the same verdicts and paired comparisons as the reports' `verdicts.md`); never edit by "
           "hand. Each claim's condition is the one registered in [PROTOCOL.md](../PROTOCOL.md).", ""]
    table = ["| claim (paper) | read from | reading |", "|---|---|---|"]
    table += [f"| {claim} | {source} | {reading} |" for claim, source, (reading, _) in claims]
    out += table
    out += ["", "## The figures behind each reading", ""]
    for claim, _, (_, lines) in claims:
        figures = [f"- {ln}" for ln in lines] or ["- no finished run or paired comparison yet"]
        out += [f"**{claim}**", "", *figures, ""]
    OUT.write_text("\n".join(out))
    into_readme(README, table)
    print(f"written: {OUT}, and the table into {README}")


if __name__ == "__main__":
    main()

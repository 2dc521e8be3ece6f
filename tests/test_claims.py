"""results/claims.py: the reading of the protocol's claims by their registered conditions."""
import pytest

from ticketsmith.report.evidence import Verdict


def verdict(arm, rnd, verdict, effective):
    return Verdict(arm=arm, point=("round", rnd), sparsity=effective, effective=effective,
                   accuracy=0.9, accuracy_sd=0.001, n=2, seeds=[0, 1], missing=[],
                   delta=[-0.1, 0.1], controls=[], verdict=verdict, why="")


def arms(regroup, gaimp):
    """Five rounds of each arm on two seeds; `regroup` / `gaimp`: round -> verdict."""
    return ([verdict("IMP-Regroup", r, regroup.get(r, "refuted"), 0.15 * r) for r in range(1, 6)]
            + [verdict("Group-aware IMP", r, gaimp.get(r, "inconclusive"), 0.1 * r) for r in range(1, 6)])


def test_group_aware_imp_is_undecided_when_neither_arm_has_a_winning_round(load_script):
    claims = load_script("results/claims.py")
    reading, lines = claims.gaimp_claim(arms({}, {}))
    assert reading.startswith("cannot decide: neither arm has a winning round")
    assert len(lines) == 10  # every round of both arms is shown with its figures


def test_group_aware_imp_claim_follows_the_registered_rule_once_an_arm_wins(load_script):
    claims = load_script("results/claims.py")
    # IMP-Regroup wins up to round 4 (60%): exceeds group-aware IMP's none by >= 5 points
    reading, _ = claims.gaimp_claim(arms({3: "winner", 4: "winner"}, {}))
    assert reading == "**confirmed** (largest winning effective sparsity 60.0% vs 0.0%)"
    # group-aware IMP wins at round 5 (50%), IMP-Regroup nowhere: group-aware IMP is not worse
    reading, _ = claims.gaimp_claim(arms({}, {5: "winner"}))
    assert reading.startswith("**refuted**")


def test_group_aware_imp_waits_for_five_rounds_on_two_seeds(load_script):
    claims = load_script("results/claims.py")
    reading, _ = claims.gaimp_claim(arms({}, {})[:-1])
    assert reading.startswith("cannot decide (yet)")


def pair(a, rnd, verdict, n=2):
    """One paired comparison of IMP-Refill (`a`) with the per-layer one at round `rnd`."""
    return {"a": f"IMP-Refill ({a})", "b": "IMP-Refill (per layer)", "setting": "refill_coupling",
            "point": ("round", rnd), "n": n, "gaps": [0.0] * n, "mean": 0.0, "sd": 0.0, "verdict": verdict}


def couplings(verdicts=None, n=2, rounds=(1, 2, 3)):
    """shared - none, union - none and shared - union at each round; `verdicts`: (a, round) -> verdict."""
    verdicts = verdicts or {}
    rows = [pair(a, r, verdicts.get((a, r), "equal"), n) for a in ("shared", "union") for r in rounds]
    return rows + [dict(pair("shared", r, "inconclusive", n), b="IMP-Refill (union)") for r in rounds]


def test_coupling_is_refuted_when_shared_and_union_equal_per_layer_at_every_round(load_script):
    claims = load_script("results/claims.py")
    # shared - union is inconclusive, but the claim is read from the pairs with per-layer refill
    reading, lines = claims.coupling_claim(couplings())
    assert reading == "**refuted** (equal at every round)"
    assert len(lines) == 6


def test_coupling_is_confirmed_when_per_layer_refill_beats_a_coupled_one(load_script):
    claims = load_script("results/claims.py")
    reading, _ = claims.coupling_claim(couplings({("union", 2): "IMP-Refill (per layer) better"}))
    assert reading.startswith("**confirmed**")
    reading, _ = claims.coupling_claim(couplings({("union", 2): "IMP-Refill (union) better"}))
    assert reading == "cannot decide"


def test_a_confirmed_coupling_reading_names_the_rounds_where_a_coupled_refill_was_better(load_script):
    claims = load_script("results/claims.py")
    mixed = {("shared", 2): "IMP-Refill (per layer) better", ("union", 3): "IMP-Refill (union) better"}
    vs = [verdict(f"IMP-Refill ({a})", 3, "refuted", e) for a, e in (("union", 0.73), ("per layer", 0.82))]
    reading, _ = claims.coupling_claim(couplings(mixed), vs)
    # the registered rule: per-layer better at a round confirms; the reverse round is named
    assert reading.startswith("**confirmed** (per-layer refill better than IMP-Refill (shared) at round 2)")
    assert reading.endswith("but a coupled refill better than per-layer refill: IMP-Refill (union) at "
                            "round 3 (73.0% effective, per layer 82.0%)")
    assert "but" not in claims.coupling_claim(couplings({("shared", 2): "IMP-Refill (per layer) better"}))[0]


def test_coupling_waits_for_three_rounds_on_two_seeds(load_script):
    claims = load_script("results/claims.py")
    per_layer_wins = {("shared", 1): "IMP-Refill (per layer) better"}
    assert claims.coupling_claim(couplings(per_layer_wins, n=1))[0].startswith("cannot decide (yet)")
    assert claims.coupling_claim(couplings(per_layer_wins, rounds=(1, 2)))[0].startswith("cannot decide (yet)")
    assert claims.coupling_claim([])[0].startswith("cannot decide (yet): no paired comparison yet")


def test_coupling_lines_show_each_sides_effective_sparsity(load_script):
    claims = load_script("results/claims.py")
    # the couplings keep different numbers of weights at one round: the line must say so
    vs = [verdict("IMP-Refill (union)", 1, "inconclusive", 0.30),
          verdict("IMP-Refill (per layer)", 1, "inconclusive", 0.43)]
    _, lines = claims.coupling_claim(couplings(rounds=(1,)), vs)
    assert "IMP-Refill (union) - IMP-Refill (per layer), round 1 (effective 30.0% vs 43.0%)" in lines[1]
    assert "(effective 30.0% vs 43.0%)" not in lines[0]  # shared has no verdict here: shown as "-"
    assert "(effective - vs 43.0%)" in lines[0]


def test_the_claims_table_replaces_what_stands_between_the_readme_markers(load_script, tmp_path):
    claims = load_script("results/claims.py")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Results\n\n{claims.BEGIN}\n| old | table |\n{claims.END}\n\nafter\n")
    table = ["| claim | reading |", "|---|---|", "| a | **refuted** |"]
    claims.into_readme(readme, table)
    claims.into_readme(readme, table)  # a second report leaves the page as the first wrote it
    assert readme.read_text() == (f"# Results\n\n{claims.BEGIN}\n" + "\n".join(table)
                                  + f"\n{claims.END}\n\nafter\n")
    readme.write_text("# Results without the markers\n")
    with pytest.raises(SystemExit, match="markers"):
        claims.into_readme(readme, table)

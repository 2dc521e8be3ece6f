"""results/claims.py: the reading of the protocol's claims by their registered conditions."""
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

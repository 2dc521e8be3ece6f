import json
import struct

import pytest
import torch

import ticketsmith as ts
from ticketsmith.bench import compare
from ticketsmith.io import write_json
from ticketsmith.report import DPI, SIZE, make_report
from ticketsmith.runs import Run, RunConfig


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model="lenet5", dataset="digits", epochs=2, batch_size=64, rounds=2)
    run = Run(cfg, out, progress=False)
    run.execute()
    # a bench result for round 2 (compact = the masked model itself is enough for the report)
    dense = run.trained(out / "round_00")
    ticket = run.trained(out / "round_02")
    res = compare(dense, ticket, lambda b: torch.randn(b, 1, 8, 8), batch_sizes=(1, 4), pairs=3,
                  burst_s=0.002, runtimes=("torch", "onnxruntime"))
    write_json(out / "round_02" / "bench.json", res)
    return out


def test_report_writes_every_plot_and_links_them(tiny_run, tmp_path):
    md = make_report([tiny_run], tmp_path / "rep")
    text = md.read_text()
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    names = {p.name for p in pngs}
    for expected in ("accuracy_vs_sparsity.png", "time_saving.png", "layerwise_speedup.png"):
        assert expected in names
    assert any(n.startswith("masks_") for n in names)
    for p in pngs:
        assert p.stat().st_size > 5000
        w, h = png_size(p)
        assert w >= SIZE[0] * DPI * 0.99 and h >= SIZE[1] * DPI * 0.99, (p.name, w, h)
        assert f"]({p.name})" in text, f"{p.name} not linked from report.md"
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "| 2 | 36.00 |" in text  # the table row of round 2
    # the benched round's time saving appears in the table: the fastest-vs-fastest figure
    rows = json.loads((tiny_run / "round_02" / "bench.json").read_text())["results"]
    saving = next(r for r in rows if r["backend"] == "fastest" and r["batch_size"] == 1)["time_saving"]
    assert f"{100 * saving:.2f}" in text
    import re
    assert re.search(r"-?\d+\.\d\d \(-?\d+\.\d\d to -?\d+\.\d\d\)", text)  # the spread of the ratios
    from ticketsmith.report import bench_points, load_run
    keys = set(bench_points(load_run(tiny_run)))
    assert keys and all(isinstance(k, tuple) and len(k) == 2 for k in keys)  # (batch, threads): a line each


def test_partial_and_missing_rounds_are_reported_not_crashed(tiny_run, tmp_path):
    import shutil
    part = tmp_path / "partial"
    shutil.copytree(tiny_run, part)
    (part / "round_02" / "round.json").unlink()  # round 2 interrupted
    (part / "round_02" / "masks.safetensors").write_bytes(b"garbage")  # and its mask corrupt
    md = make_report([part], tmp_path / "rep").read_text()
    assert "(partial)" in md and "| corrupt" in md
    shutil.rmtree(part / "round_01")  # a missing round
    md = make_report([part], tmp_path / "rep2").read_text()
    assert not any(line.startswith("| 1 |") for line in md.splitlines()) and "(partial)" in md
    # a finished round whose masks are corrupt is marked; a corrupt round.json aborts nothing
    shutil.copytree(tiny_run, tmp_path / "bad")
    (tmp_path / "bad" / "round_01" / "masks.safetensors").write_bytes(b"garbage")
    (tmp_path / "bad" / "round_02" / "round.json").write_text("{not json")
    md = make_report([tmp_path / "bad"], tmp_path / "rep3").read_text()
    assert "done (corrupt: masks.safetensors)" in md
    assert any(line.startswith("| 2 |") for line in md.splitlines()) and "| corrupt: round.json |" in md


def test_report_refuses_a_non_run_directory(tmp_path):
    with pytest.raises(ts.UsageError, match="not a ticketsmith run"):
        make_report([tmp_path], tmp_path / "rep")


def test_sparse_training_runs_form_one_curve_per_method(tmp_path):
    """DST runs: one run per sparsity, each a single sparse round 0; the dense line comes from
    the dense run only, and each method is one row and one curve."""
    runs = []
    for name, method, s in (("dense", "dense", (0.8,)), ("s5", "srigl", (0.5,)), ("s8", "srigl", (0.8,))):
        # (0.8 is the default sparsity: a dense run takes none)
        cfg = RunConfig(model="mlp-300-100", width=0.25, dataset="digits", epochs=1, batch_size=64,
                        method=method, sparsity=s, **({} if method == "dense" else {"dst_delta_t": 5}))
        Run(cfg, tmp_path / name, progress=False).execute()
        runs.append(tmp_path / name)
    dense_acc = json.loads((tmp_path / "dense" / "summary.json").read_text())["rounds"][0]["test_acc"]
    text = make_report(runs, tmp_path / "rep").read_text()
    assert f"seed 0: {100 * dense_acc:.2f}%" in text
    rows = [line for line in text.splitlines() if line.startswith("| SRigL |")]
    points = [r.split("|")[2].strip() for r in rows if r.split("|")[2].strip().endswith("%")]
    assert points == ["50%", "80%"], text  # one verdict row per sparsity
    assert len(rows) == 3  # and both in one method row of the winners table
    assert not any(line.startswith("| Dense |") for line in text.splitlines())


# -- seeds, controls and the decision rule -------------------------------------------------------
from ticketsmith.report import evidence  # noqa: E402


def fake_run(path, accs, **cfg):
    """A finished run directory written by hand: accs[r] = test accuracy of round r."""
    config = RunConfig(model="vgg16", dataset="fashion-mnist", epochs=15, rounds=len(accs) - 1,
                       **cfg).identity()
    path.mkdir(parents=True)
    write_json(path / "config.json", config)
    for r, acc in enumerate(accs):
        d = path / f"round_{r:02d}"
        d.mkdir()
        write_json(d / "round.json", {"test_acc": acc, "best_val_acc": acc, "best_epoch": 10, "epochs": 15,
                                      "sparsity": 0.0 if r == 0 else 1 - 0.64 ** r,
                                      "effective_sparsity": 0.0 if r == 0 else 1 - 0.6 ** r,
                                      "seed_marker": [cfg.get("seed", 0), str(path)]})
    return path


def test_rule_on_synthetic_seed_sets():
    d = evidence.decide
    assert d([0.1, -0.3, 0.0], [[0.9, 0.6, 1.2]], True)[0] == "winner"
    assert d([0.1, -0.3, 0.0], [], False)[0] == "winner"  # unstructured: no control needed
    assert d([0.1, -0.3, 0.0], [], True)[0] == "inconclusive"  # structured without a control
    assert d([0.1, -0.6, 0.0], [[1, 1, 1]], True)[0] == "inconclusive"  # a seed below -0.5
    assert d([0.1, -0.3, 0.0], [[0.9, 0.4, 1.2]], True)[0] == "inconclusive"  # control not beaten
    assert d([0.1, -0.3, 0.0], [[0.3, 0.0, 0.2]], True)[0] == "refuted"  # control within 0.2
    assert d([-0.6, -0.5, -0.9], [], False)[0] == "refuted"
    assert d([-0.6, 0.1, -0.9], [], False)[0] == "inconclusive"  # not every seed below dense
    assert d([0.5], [[2.0]], True)[0] == "inconclusive"  # one seed decides nothing
    assert evidence.paired({0: 0.9, 1: 0.91}, {0: 0.89, 1: 0.90})[0] == "A better"
    assert evidence.paired({0: 0.9, 1: 0.91}, {0: 0.901, 1: 0.909})[0] == "equal"


def test_report_applies_the_rule_per_arm_and_seed(tmp_path):
    dense = {0: 0.900, 1: 0.905, 2: 0.895}
    runs = []
    for s, base in dense.items():  # IMP-Regroup: at dense in round 1, far below in round 2
        runs.append(fake_run(tmp_path / f"imp{s}", [base, base + 0.001, base - 0.002], seed=s))
        runs.append(fake_run(tmp_path / f"rg{s}", [base, base - 0.001, base - 0.012], seed=s,
                             structure="regroup", chain=str(tmp_path / f"imp{s}")))
    for s in (0, 1):  # controls on two seeds: the random ticket far below, the null close
        runs.append(fake_run(tmp_path / f"rnd{s}", [dense[s], dense[s] - 0.01, dense[s] - 0.02], seed=s,
                             structure="regroup", reinit="random", chain=str(tmp_path / f"imp{s}")))
    md = make_report(runs, tmp_path / "rep").read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in md.splitlines()
            if line.startswith("| IMP-Regroup |") and "round" in line}
    assert "**winner**" in rows[("IMP-Regroup", "round 1")]
    assert "**refuted**" in rows[("IMP-Regroup", "round 2")]
    assert "| 3 | - |" in rows[("IMP-Regroup", "round 1")]  # n = 3, no seed missing
    assert "Random ticket (IMP-Regroup): +0.90 (n=2)" in rows[("IMP-Regroup", "round 1")]
    # the dense baseline: one value per distinct run (the chains' copies are not counted again)
    assert "seed 0: 90.00%, seed 1: 90.50%, seed 2: 89.50%" in md
    # IMP without controls can win; its effective sparsity is what the table shows
    imp1 = next(line for line in md.splitlines() if line.startswith("| IMP | round 1 |"))
    assert "**winner**" in imp1 and "| 40.0 |" in imp1
    assert "Plots use the effective sparsity." in md
    assert "Plots use the mask sparsity." in make_report(runs, tmp_path / "rep3", axis="mask").read_text()
    # a missing seed is named, never averaged away silently
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(tmp_path / "rg2" / "round_02")
    md = make_report(runs, tmp_path / "rep2").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| IMP-Regroup | round 2 |"))
    assert "| 2 | 2 |" in row  # n = 2, seed 2 missing


def test_dense_is_counted_once_per_distinct_run(tmp_path):
    a = fake_run(tmp_path / "a", [0.90, 0.91])
    b = tmp_path / "b"  # adopted a's chain: a byte-identical copy of its round 0
    fake_run(b, [0.50, 0.89], structure="refill", chain=str(a))
    (b / "round_00" / "round.json").write_bytes((a / "round_00" / "round.json").read_bytes())
    c = fake_run(tmp_path / "c", [0.92, 0.90], structure="regroup", structure_every_round=True)
    views = [ts.report.load_run(p) for p in (a, b, c)]
    assert evidence.dense_runs(views) == 2
    assert evidence.dense_by_seed(views) == {0: pytest.approx(0.91)}  # (0.90 + 0.92) / 2, not 5 copies


def test_runs_of_other_settings_are_not_seeds_of_one_arm(tmp_path):
    a = fake_run(tmp_path / "a", [0.90, 0.91], seed=0)
    b = fake_run(tmp_path / "b", [0.90, 0.91], seed=1, lr=0.05)
    with pytest.raises(ts.UsageError, match=r"differ in lr \(0\.1 vs 0\.05\)"):
        make_report([a, b], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()
    c = fake_run(tmp_path / "c", [0.90, 0.91], seed=0)
    with pytest.raises(ts.UsageError, match="two 'IMP' runs of seed 0"):
        make_report([a, c], tmp_path / "rep")


def test_arms_that_differ_in_one_setting_are_compared_seed_by_seed(tmp_path):
    runs = []
    for s, (rigl, srigl) in enumerate(((0.90, 0.95), (0.91, 0.96))):
        runs.append(fake_run(tmp_path / f"r{s}", [rigl], seed=s, method="rigl", sparsity=(0.9,)))
        runs.append(fake_run(tmp_path / f"s{s}", [srigl], seed=s, method="srigl", sparsity=(0.9,)))
    md = make_report(runs, tmp_path / "rep").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| RigL | SRigL | 90% |"))
    assert "| 2 |" in row and "-5.00, -5.00" in row and "**SRigL better**" in row

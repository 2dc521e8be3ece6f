"""The instruments of evidence: effective sparsity, the structure-less null, random-ticket
controls of every structured ticket, extending an IMP run."""
import json

import pytest
import torch

import ticketsmith as ts
from ticketsmith.errors import UsageError
from ticketsmith.runs import Run, RunConfig

FAST = dict(model="lenet5", dataset="digits", epochs=1, batch_size=64, rounds=2)
X8 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def resnet20():
    torch.manual_seed(0)
    return ts.models.create("resnet20", width=0.25, image_size=(8, 8))  # widths 4-8-16


@pytest.mark.parametrize("coupling", ["none", "shared", "union"])
def test_effective_sparsity_is_what_the_compact_model_keeps(coupling):
    model = resnet20()
    masks = ts.refill(model, ts.prune.random_masks(model, 0.6, seed=2), coupling=coupling,
                      example_inputs=X8[:1])
    eff = ts.compact.effective(model, masks, X8)
    small = ts.compact(model, masks, torch.randn(3, 3, 8, 8))
    kept = 0
    for key in masks.weight_names:  # refilled layers compact to dense layers (zeros folded in)
        w = small.get_submodule(key.rpartition(".")[0]).weight
        kept += int(torch.count_nonzero(w))
        assert w.numel() <= masks[key].numel()
    assert eff["effective_sparsity"] == pytest.approx(1 - kept / masks.numel(), abs=1e-12)
    assert eff["effective_sparsity"] > masks.sparsity()  # dropped inputs of kept rows
    assert eff["sparsity"] == masks.sparsity()
    assert eff["compact_params"] == sum(p.numel() for p in small.parameters())
    assert eff["params"] == sum(p.numel() for p in model.parameters()) > eff["compact_params"]


def test_effective_sparsity_of_an_unstructured_mask_is_its_own():
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.5, seed=1)
    eff = ts.compact.effective(model, masks, X8)
    assert eff["effective_sparsity"] == pytest.approx(masks.sparsity())
    assert eff["compact_params"] == eff["params"]


def test_null_masks_copy_layer_counts_and_are_otherwise_random():
    model = resnet20()
    source = ts.prune.omp(model, 0.7)
    a, b = ts.prune.null_masks(source, seed=0), ts.prune.null_masks(source, seed=1)
    assert a.weight_names == source.weight_names
    overlap = []
    for n in source.weight_names:
        assert int(a[n].sum()) == int(source[n].sum()) == int(b[n].sum()), n
        assert a[n].shape == source[n].shape and a[n].dtype == torch.bool
        inter = int((a[n] & source[n]).sum())
        overlap.append((inter, int(source[n].sum()), source[n].numel()))
    assert not torch.equal(a[source.weight_names[-1]], b[source.weight_names[-1]])
    assert ts.prune.null_masks(source, seed=0) == a  # deterministic per seed
    # random placement: the overlap with the source is what chance gives (k^2 / n), not k
    inter = sum(o[0] for o in overlap)
    chance = sum(k * k / n for _, k, n in overlap)
    assert abs(inter - chance) < 0.1 * sum(k for _, k, _ in overlap)


def test_null_mask_run_regroups_a_random_mask_with_the_chain_counts(tmp_path):
    Run(RunConfig(**FAST), tmp_path / "imp", progress=False).execute()
    cfg = RunConfig(**FAST, structure="regroup", null_mask=True, chain=str(tmp_path / "imp"))
    s = Run(cfg, tmp_path / "null", progress=False).execute()
    assert s["complete"]
    for r in (1, 2):
        chain = ts.Masks.load(tmp_path / "imp" / f"round_{r:02d}" / "masks.safetensors")
        got = ts.Masks.load(tmp_path / "null" / f"round_{r:02d}" / "masks.safetensors")
        assert got.blocks  # regrouped
        assert got != chain
        info = json.loads((tmp_path / "null" / f"round_{r:02d}" / "round.json").read_text())
        assert info["unstructured_sparsity"] == pytest.approx(chain.sparsity())
    with pytest.raises(UsageError, match="null-mask"):
        RunConfig(**FAST, null_mask=True).validate()


def test_random_reinit_controls_of_regroup_and_group_aware_imp(tmp_path):
    Run(RunConfig(**FAST), tmp_path / "imp", progress=False).execute()
    chain = dict(FAST, structure="regroup", chain=str(tmp_path / "imp"))
    Run(RunConfig(**chain), tmp_path / "rg", progress=False).execute()
    Run(RunConfig(**chain, reinit="random"), tmp_path / "rg-random", progress=False).execute()
    gaimp = dict(FAST, structure="regroup", structure_every_round=True)
    Run(RunConfig(**gaimp), tmp_path / "ga", progress=False).execute()
    s = Run(RunConfig(**gaimp, reinit="random", chain=str(tmp_path / "ga")), tmp_path / "ga-random",
            progress=False).execute()
    assert s["complete"]
    for ticket, control in (("rg", "rg-random"), ("ga", "ga-random")):
        for r in (1, 2):  # the same masks, another start
            d = f"round_{r:02d}"
            assert ts.Masks.load(tmp_path / ticket / d / "masks.safetensors") == \
                ts.Masks.load(tmp_path / control / d / "masks.safetensors")
            a = json.loads((tmp_path / ticket / d / "round.json").read_text())
            b = json.loads((tmp_path / control / d / "round.json").read_text())
            assert a["start_iteration"] == b["start_iteration"] > 0
        w1 = ts.io.load_tensors(tmp_path / ticket / "round_01" / "weights.safetensors")[0]
        w2 = ts.io.load_tensors(tmp_path / control / "round_01" / "weights.safetensors")[0]
        assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    with pytest.raises(UsageError, match="reinit random"):
        RunConfig(**gaimp, chain=str(tmp_path / "ga")).validate()
    with pytest.raises(UsageError, match="not the same group-aware IMP"):
        Run(RunConfig(**dict(gaimp, regroup_b1=4), reinit="random", chain=str(tmp_path / "ga")),
            tmp_path / "other", progress=False)


def test_rounds_record_effective_sparsity_seconds_and_machine(tmp_path):
    cfg = RunConfig(model="resnet20", width=0.25, dataset="digits", epochs=1, batch_size=128,
                    rounds=1, structure="refill", prune_fraction=0.5)
    s = Run(cfg, tmp_path, progress=False).execute()
    r1 = next(r for r in s["rounds"] if r["round"] == 1)
    assert r1["effective_sparsity"] > r1["sparsity"] > 0
    assert 0 < r1["compact_params"] < r1["params"]
    info = json.loads((tmp_path / "round_01" / "round.json").read_text())
    assert info["seconds_per_epoch"] > 0 and info["machine"]["threads"] >= 1
    assert "effective" in ts.runs.format_summary(s)


def test_an_imp_run_starts_with_its_dense_round_and_grows(tmp_path):
    s = Run(RunConfig(**dict(FAST, rounds=0)), tmp_path, progress=False).execute()
    assert s["complete"] and [r["round"] for r in s["rounds"]] == [0]
    s = Run(RunConfig(**FAST), tmp_path, progress=False).execute()
    assert s["complete"] and [r["round"] for r in s["rounds"]] == [0, 1, 2]
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1] == {"event": "rounds extended", "from": 0, "to": 2}
    with pytest.raises(UsageError, match="different config"):  # fewer rounds: not an extension
        Run(RunConfig(**dict(FAST, rounds=1)), tmp_path, progress=False).execute()
    with pytest.raises(UsageError, match="rounds must be at least 1"):
        RunConfig(**dict(FAST, method="oneshot", rounds=0)).validate()


def test_old_configs_refill_coupled_reads_as_a_coupling():
    base = {"model": "resnet20", "dataset": "digits", "method": "imp", "epochs": 1, "seed": 0}
    assert RunConfig.from_json({**base, "refill_coupled": True}).refill_coupling == "shared"
    assert RunConfig.from_json({**base, "refill_coupled": False}).refill_coupling == "none"
    assert RunConfig().refill_coupling == "none"
    old = RunConfig.from_json({**base, "regroup_groups": 4, "regroup_t1": 2.0})  # before t1 meant groups
    assert (old.regroup_t1, old.regroup_width_ratio) == (4, 2.0)
    assert RunConfig.from_json({**base, "regroup_t1": 3}).regroup_t1 == 3  # today's spelling


# -- the first hour of a new user (threads, files, names) ---------------------------------------
def test_version_and_lazy_submodules(capsys):
    from ticketsmith.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ticketsmith {ts.__version__}"
    assert callable(ts.bench.compare) and callable(ts.report.make_report)  # the README's flow table


def test_files_are_written_with_the_umask_mode(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        ts.io.write_json(tmp_path / "a.json", {"x": 1})
        ts.io.save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        ts.io.write_json(tmp_path / "b.json", {"x": 1})
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_starved_training_process_warns_once(tmp_path, monkeypatch):
    from ticketsmith import runs
    monkeypatch.setattr(runs, "OVERSUBSCRIBED", 1.01)  # no process gets more than all its CPU time
    with pytest.warns(RuntimeWarning, match="oversubscribed") as got:
        Run(RunConfig(**dict(FAST, rounds=0, epochs=2)), tmp_path / "a", progress=False).execute()
    assert len([w for w in got if "oversubscribed" in str(w.message)]) == 1  # once per round
    monkeypatch.setattr(runs, "OVERSUBSCRIBED", 0.0)
    import warnings
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        Run(RunConfig(**dict(FAST, rounds=0)), tmp_path / "b", progress=False).execute()
    assert not [w for w in got if "oversubscribed" in str(w.message)]


def test_a_round_at_chance_accuracy_warns(tmp_path):
    with pytest.warns(RuntimeWarning, match="at chance"):  # LeNet-5 at lr 10 learns nothing
        Run(RunConfig(**dict(FAST, rounds=0, lr=10.0)), tmp_path, progress=False).execute()


def test_settings_that_do_not_apply_are_refused():
    for kw, name in ((dict(method="dense", structure="refill"), "--structure"),
                     (dict(sparsity=(0.5,)), "--sparsity"),
                     (dict(method="rigl", sparsity=(0.9,), dst_gamma_sal=0.5), "--dst-gamma-sal"),
                     (dict(structure="regroup", refill_coupling="union"), "--refill-coupling"),
                     (dict(method="dense", rounds=3), "--rounds")):
        with pytest.raises(UsageError, match=f"{name} does not apply"):
            RunConfig(**kw).validate()
    RunConfig(method="srigl", sparsity=(0.9,), dst_gamma_sal=0.5).validate()  # applies: accepted


def test_each_training_says_how_much_of_the_run_is_left(tmp_path, capsys):
    run = Run(RunConfig(**FAST), tmp_path, progress=False)
    run.execute()
    total, finished = run._trainings()
    assert total == 3 and len(finished) == 3
    run._say_eta("round 2 ")
    err = capsys.readouterr().err
    assert "min left for the run" in err and "s per epoch so far" in err
    chained = Run(RunConfig(**FAST, structure="refill"), tmp_path / "c", progress=False)
    assert chained._trainings()[0] == 3 + 1  # the internal chain trains rounds 1..R-1 too


def test_interrupted_bench_says_it_starts_over(monkeypatch, capsys):
    from ticketsmith import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_summary", interrupted)
    assert cli.main(["summary", "somewhere"]) == 130
    assert "does not resume: rerunning it starts over" in capsys.readouterr().err


def test_each_zoo_model_gets_a_learning_rate_that_trains_recorded_in_the_config(tmp_path):
    assert RunConfig(model="lenet5").lr == 0.02 and RunConfig(model="resnet20").lr == 0.1
    assert RunConfig(model="lenet5", lr=0.1).lr == 0.1  # given: kept
    s = Run(RunConfig(model="lenet5", dataset="digits", epochs=3, batch_size=64, rounds=0), tmp_path,
            progress=False).execute()
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.02
    assert s["rounds"][0]["best_val_acc"] > 0.3  # at lr 0.1 this stayed at chance on Fashion-MNIST

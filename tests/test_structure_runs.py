"""IMP with structure (refill / refill+ / regroup), the reused chain, group-aware IMP."""
import json

import pytest
import torch

import ticketsmith as ts
from ticketsmith.io import load_tensors
from ticketsmith.runs import Run, RunConfig

FAST = dict(model="lenet5", dataset="digits", epochs=2, batch_size=64, rounds=2)


def rows_all_or_nothing(masks):
    for k in masks.weight_names:
        rows = masks[k].reshape(masks[k].shape[0], -1)
        assert (rows.all(1) | ~rows.any(1)).all(), k


def test_imp_refill_rounds_are_channel_structured_and_recorded(tmp_path):
    cfg = RunConfig(model="resnet20", width=0.25, dataset="digits", epochs=1, batch_size=128,
                    rounds=1, structure="refill", prune_fraction=0.5)
    s = Run(cfg, tmp_path, progress=False).execute()
    assert s["complete"]
    info = json.loads((tmp_path / "round_01" / "round.json").read_text())
    assert info["unstructured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0.3 < info["sparsity"] < 0.7
    masks = ts.Masks.load(tmp_path / "round_01" / "masks.safetensors")
    rows_all_or_nothing(masks)
    assert info["channels_kept"]["layers.3.conv1.weight"][1] == 8
    assert any(k.endswith("bn1.weight") for k in masks)  # BN companions of dropped channels
    # the ticket trained with dropped channels held at zero, BN included
    w, _ = load_tensors(tmp_path / "round_01" / "weights.safetensors")
    for k in masks:
        assert (w[k][~masks[k]] == 0).all(), k


def test_chain_reuses_an_imp_run_exactly(tmp_path):
    imp = Run(RunConfig(**FAST), tmp_path / "imp", progress=False)
    imp.execute()
    cfg = RunConfig(**FAST, structure="refill+", chain=str(tmp_path / "imp"))
    s = Run(cfg, tmp_path / "rf", progress=False).execute()
    assert s["complete"] and not (tmp_path / "rf" / "chain").exists()
    a, _ = load_tensors(tmp_path / "imp" / "round_00" / "weights.safetensors")
    b, _ = load_tensors(tmp_path / "rf" / "round_00" / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in (1, 2):  # ticket r = refill+ of IMP round r's mask, scored on IMP round r-1's weights
        chain_masks = ts.Masks.load(tmp_path / "imp" / f"round_{r:02d}" / "masks.safetensors")
        trained = imp.trained(tmp_path / "imp" / f"round_{r - 1:02d}")
        x = imp.ds.normalize(imp.ds.train.x[:256])
        expected = ts.refill(trained, chain_masks, extra=0.2, data=(x, imp.ds.train.y[:256]),
                             example_inputs=x[:1])
        got = ts.Masks.load(tmp_path / "rf" / f"round_{r:02d}" / "masks.safetensors")
        assert got == expected
        info = json.loads((tmp_path / "rf" / f"round_{r:02d}" / "round.json").read_text())
        assert info["unstructured_sparsity"] == pytest.approx(chain_masks.sparsity())


def test_chain_with_other_settings_is_refused(tmp_path):
    Run(RunConfig(**{**FAST, "rounds": 1}), tmp_path / "imp", progress=False).execute()
    cfg = RunConfig(**{**FAST, "lr": 0.05}, structure="refill", chain=str(tmp_path / "imp"))
    with pytest.raises(ts.UsageError, match="differ in lr"):
        Run(cfg, tmp_path / "rf", progress=False).execute()
    cfg = RunConfig(**FAST, structure="refill", chain=str(tmp_path / "imp"))  # 2 rounds > 1 done
    with pytest.raises(ts.UsageError, match="no round 2 mask"):
        Run(cfg, tmp_path / "rf2", progress=False).execute()


def constant_fan_in(masks):
    """Every active row of every sparse layer has the same number of nonzeros."""
    for k in masks.weight_names:
        rows = masks[k].reshape(masks[k].shape[0], -1).sum(1)
        active = rows[rows > 0]
        if int(rows.sum()) < masks[k].numel():  # a dense layer (ERK saturated) is exempt
            assert len(active.unique()) == 1, (k, active.unique())


@pytest.mark.parametrize("method", ["srigl", "rigl"])
def test_dynamic_sparse_run_layout_and_statistics(tmp_path, method):
    from ticketsmith.cli import main
    rc = main(["run", "--method", method, "--sparsity", "0.8", "--model", "lenet5", "--dataset",
               "digits", "--epochs", "2", "--batch-size", "64", "--dst-delta-t", "5",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["complete"] and [r["round"] for r in s["rounds"]] == [0]
    assert s["rounds"][0]["sparsity"] == pytest.approx(0.8, abs=0.01)
    masks = ts.Masks.load(tmp_path / "round_00" / "masks.safetensors")
    if method == "srigl":
        constant_fan_in(masks)
    metrics = [json.loads(x) for x in (tmp_path / "round_00" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:  # mask statistics over time: active neurons and fan-in per layer
        layer = m["extra"]["layers"]["fc1.weight"]
        assert {"active_neurons", "fan_in", "nonzeros"} <= set(layer)
    w, _ = load_tensors(tmp_path / "round_00" / "weights.safetensors")
    for k in masks.weight_names:
        assert (w[k][~masks[k]] == 0).all()


def test_dynamic_sparse_bad_input(tmp_path):
    with pytest.raises(ts.UsageError, match="one --sparsity"):
        RunConfig(method="srigl", sparsity=(0.8, 0.9)).validate()
    with pytest.raises(ts.UsageError, match=r"in \(0, 1\)"):
        RunConfig(method="srigl", sparsity=(0.0,)).validate()


@pytest.mark.parametrize("source", ["snip", "grasp", "synflow", "admm"])
def test_oneshot_sources_in_runs(tmp_path, source):
    extra = {"synflow": dict(synflow_iterations=5), "admm": dict(admm_epochs=1)}.get(source, {})
    cfg = RunConfig(**{**{k: v for k, v in FAST.items() if k != "rounds"}, "epochs": 1}, method="oneshot",
                    source=source, sparsity=(0.7,), **extra)
    s = Run(cfg, tmp_path, progress=False).execute()
    assert s["complete"] and s["rounds"][1]["sparsity"] == pytest.approx(0.7, abs=1e-3)


def blocks_cover_exactly(masks):
    for k, blocks in masks.blocks.items():
        cover = torch.zeros(masks[k].shape[0], masks[k][0].numel(), dtype=torch.int)
        for b in blocks:
            cover[b.rows[:, None], b.cols[None, :]] += 1
        assert cover.max() <= 1, f"{k}: blocks overlap"
        assert torch.equal(cover.bool(), masks[k].reshape(cover.shape)), f"{k}: weights outside blocks"


def test_group_aware_imp_ends_every_round_block_structured(tmp_path):
    cfg = RunConfig(model="vgg11", width=0.25, dataset="digits", epochs=1, batch_size=128, rounds=2,
                    structure="regroup", structure_every_round=True, prune_fraction=0.5)
    s = Run(cfg, tmp_path, progress=False).execute()
    assert s["complete"] and not (tmp_path / "chain").exists()
    prev = None
    for r in (1, 2):
        masks = ts.Masks.load(tmp_path / f"round_{r:02d}" / "masks.safetensors")
        assert set(masks.blocks) == set(masks.weight_names)  # every layer regrouped
        blocks_cover_exactly(masks)
        info = json.loads((tmp_path / f"round_{r:02d}" / "round.json").read_text())
        assert info["blocks"] == {k: len(v) for k, v in masks.blocks.items()}
        if prev is not None:  # Alg. 4: round 2 prunes round 1's regrouped mask
            for k in masks.weight_names:
                assert masks[k].sum() <= prev[k].numel()
        prev = masks
    w, _ = load_tensors(tmp_path / "round_02" / "weights.safetensors")
    for k in prev:
        assert (w[k][~prev[k]] == 0).all(), k

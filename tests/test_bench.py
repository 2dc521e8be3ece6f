import json

import pytest
import torch
from torch import nn

import ticketsmith as ts
from ticketsmith.bench import count_macs, paired
from ticketsmith.cli import main
from ticketsmith.runs import Run, RunConfig


def test_mac_count_of_conv_and_linear():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1),
                      nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    total, per, params = count_macs(m, torch.randn(1, 3, 8, 8))
    assert per["0"] == 8 * 3 * 9 * 64 and per["2"] == 4 * 8 * 9 * 16 and per["4"] == 64 * 10
    assert total == sum(per.values()) and params["4"] == 64 * 10 + 10


def test_mac_count_of_executors_is_their_structure():
    from ticketsmith.compact.blocks import BlockConv2d, BlockLinear
    from ticketsmith.compact.condensed import CondensedLinear
    torch.manual_seed(0)
    conv, lin, lin2 = nn.Conv2d(6, 8, 3, padding=1), nn.Linear(12, 10), nn.Linear(10, 4)
    bconv = BlockConv2d.from_conv(conv, [ts.Block((0, 1, 2), (0, 1)), ts.Block((5, 6), (3, 4, 5))])
    blin = BlockLinear.from_linear(lin, [ts.Block((0, 1), (2, 3, 4))])
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[[0, 2, 3], :3] = True  # 3 active neurons, fan-in 3
    cond = CondensedLinear.from_linear(lin2, mask)
    total, per, _ = count_macs(nn.Sequential(bconv, nn.Flatten(), nn.Linear(8 * 25, 12), blin, cond),
                               torch.randn(1, 6, 5, 5))
    # block columns index the flattened c_in*kh*kw axis: no extra kernel factor
    assert per["0"] == (3 * 2 + 2 * 3) * 25 and per["3"] == 2 * 3 and per["4"] == 3 * 3
    assert total == sum(per.values())  # the executors' own products are not counted again


@pytest.mark.parametrize("family", ["vit_qkv", "vit_timm"])
def test_mac_count_includes_attention_products_and_heads_removed_save_them(family):
    """q k^T and weights x v hold no weights but are work: 2 N^2 (heads x head_dim) MACs per
    attention layer (scaled_dot_product_attention or explicit matmuls), fewer with fewer heads."""
    from families import FAMILIES
    build, shape, _ = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    total, per, _ = count_macs(model, x)
    tokens, width = (shape[-1] // 4) ** 2, 32  # 4x4 patches of a 16x16 input, 32 features
    assert total - sum(per.values()) == 2 * tokens * tokens * width
    masks = ts.refill(model, ts.prune.omp(model, 0.6), example_inputs=x)
    small = ts.compact(model, masks, x)
    attn = small.get_submodule("block.attn")
    assert attn.num_heads < 4
    total_c, per_c, _ = count_macs(small, x)
    assert total_c - sum(per_c.values()) == 2 * tokens * tokens * attn.num_heads * (width // 4)


def test_compare_switches_kernels_per_batch(small_executors):
    from ticketsmith.bench import compare
    from ticketsmith.compact.condensed import EMBEDDING_BAG_FROM_BATCH, CondensedLinear
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    mask = torch.zeros(32, 64, dtype=torch.bool)
    for r in range(32):
        mask[r, torch.randperm(64)[:6]] = True  # constant fan-in 6 of 64
    compact = nn.Sequential(CondensedLinear.from_linear(lin, mask))
    dense = nn.Sequential(nn.Linear(64, 32))
    big = EMBEDDING_BAG_FROM_BATCH + 8
    out = compare(dense, compact, lambda b: torch.randn(b, 64), batch_sizes=(1, big), pairs=2,
                  layerwise=True, burst_s=0.001, runtimes=("torch",))
    kernels = {r["batch_size"]: r["executors"]["0"] for r in out["results"]}
    assert kernels == {1: "csr", big: "embedding_bag"}
    assert {r["batch_size"]: r["executor"] for r in out["layers"]} == kernels
    fixed = compare(dense, compact, lambda b: torch.randn(b, 64), batch_sizes=(1, big), pairs=2,
                    layerwise=False, burst_s=0.001, select_per_batch=False, runtimes=("torch",))
    assert {r["executors"]["0"] for r in fixed["results"]} == {"embedding_bag"}  # left as it was


def test_paired_ratio_sees_the_slower_side():
    slow = lambda: torch.randn(400, 400) @ torch.randn(400, 400)  # noqa: E731
    fast = lambda: torch.randn(40, 40) @ torch.randn(40, 40)  # noqa: E731
    r = paired(slow, fast, pairs=5, reps=3)
    assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"] and r["ratio_median"] > 1


@pytest.fixture(scope="module")
def refill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rf")
    cfg = RunConfig(model="resnet20", width=0.25, dataset="digits", epochs=1, batch_size=128,
                    rounds=1, structure="refill", prune_fraction=0.5)
    Run(cfg, out, progress=False).execute()
    return out


def test_bench_cli_on_a_run_directory(refill_run, capsys):
    assert main(["bench", str(refill_run), "--batch-sizes", "1,4", "--pairs", "3",
                 "--runtimes", "torch,onnxruntime,openvino"]) == 0
    res = json.loads((refill_run / "round_01" / "bench.json").read_text())
    assert res["check_rel_err"] < 1e-4
    assert res["compact"]["params"] < res["dense"]["params"]
    assert res["ideal_speedup"] > 1.2  # half the channels gone in many layers
    rows = res["results"]
    assert sorted({r["batch_size"] for r in rows}) == [1, 4]
    for b in (1, 4):  # a row per runtime and one fastest-vs-fastest row, per batch size
        assert {r["backend"] for r in rows if r["batch_size"] == b} == {"torch", "onnxruntime", "openvino", "fastest"}
    for r in rows:
        assert r["speedup_min"] <= r["speedup_median"] <= r["speedup_max"]
        if r["backend"] == "torch":
            assert r["dense_format"] in ("nchw", "channels_last")
        if r["backend"] == "fastest":
            # the baseline is the fastest dense of the candidates timed together
            dense_ms = {k.split(" ", 1)[1]: v for k, v in r["candidates_ms"].items() if k.startswith("dense ")}
            assert r["dense_runtime"] == min(dense_ms, key=dense_ms.get)
            assert r["compact_runtime"] in ("torch", "onnxruntime", "openvino")
    layers = {row["layer"] for row in res["layers"]}
    assert "layers.0.conv1" in layers and "fc" in layers
    assert "speedup median" in (refill_run / "round_01" / "bench.md").read_text()
    assert "time saving" in capsys.readouterr().out


def test_bench_cli_model_and_masks_file(tmp_path, capsys):
    torch.manual_seed(0)
    m = ts.models.create("lenet5", 1, 10, (28, 28))
    masks = ts.refill(m, ts.prune.omp(m, 0.6), example_inputs=torch.randn(1, 1, 28, 28))
    masks.save(tmp_path / "m.safetensors")
    assert main(["bench", "--model", "lenet5", "--masks", str(tmp_path / "m.safetensors"),
                 "--input-shape", "1,28,28", "--batch-sizes", "2", "--pairs", "3", "--no-layerwise",
                 "--runtimes", "torch"]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["layers"] == [] and res["compact"]["macs"] < res["dense"]["macs"]
    assert [r["backend"] for r in res["results"]] == ["torch"]  # one runtime: no fastest row


def test_bench_bad_input(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert main(["bench", "--model", "lenet5"]) == 2
    assert "RUN_DIR" in capsys.readouterr().err

"""Regroup (paper Alg. 3) and the row partitioners behind it."""
import math

import pytest
import torch

import ticketsmith as ts
from ticketsmith.errors import UsageError
from ticketsmith.masks import Block, Masks, prunable_names
from ticketsmith.structure import partition as part_mod
from ticketsmith.structure.partition import PartitionerError, connectivity, partition_rows
from ticketsmith.structure.regroup import regroup, regroup_layer, regroup_settings, regroup_stats

needs_kahypar = pytest.mark.skipif(not part_mod.kahypar_available(),
                                   reason="optional kahypar extra not installed")
BOTH = ["metis", pytest.param("kahypar", marks=needs_kahypar)]


def planted(seed, n_blocks=4, rows_per=24, cols_per=40, extra_cols=40, noise=0.01):
    """A mask made of disjoint dense blocks under random row and column permutations, plus
    random noise nonzeros; returns it and the planted (rows, cols) as sorted lists."""
    g = torch.Generator().manual_seed(seed)
    R, N = n_blocks * rows_per, n_blocks * cols_per + extra_cols
    m = torch.rand(R, N, generator=g) < noise
    pr, pc = torch.randperm(R, generator=g), torch.randperm(N, generator=g)
    blocks = []
    for b in range(n_blocks):
        r, c = pr[b * rows_per:(b + 1) * rows_per], pc[b * cols_per:(b + 1) * cols_per]
        m[r[:, None], c[None, :]] = True
        blocks.append((sorted(r.tolist()), sorted(c.tolist())))
    return m, sorted(blocks)


def as_lists(blocks):
    return sorted((b.rows.tolist(), b.cols.tolist()) for b in blocks)


def check_exact_cover(mask: torch.Tensor, blocks) -> None:
    """Blocks never overlap and their union is exactly the mask (no weight outside)."""
    flat = mask.reshape(mask.shape[0], -1)
    hits = torch.zeros(flat.shape, dtype=torch.int32)
    for b in blocks:
        assert b.rows.dtype == torch.int64 and b.cols.dtype == torch.int64
        assert torch.equal(b.rows, torch.sort(torch.unique(b.rows)).values)
        assert torch.equal(b.cols, torch.sort(torch.unique(b.cols)).values)
        hits[b.rows[:, None], b.cols[None, :]] += 1
    assert int(hits.max()) == 1, "two blocks share an entry"
    assert torch.equal(hits > 0, flat)


# -- recovery --------------------------------------------------------------------------------
@pytest.mark.parametrize("partitioner", BOTH)
def test_planted_blocks_are_recovered(partitioner):
    for seed in (0, 1):
        m, truth = planted(seed)
        blocks = regroup_layer(m, 4, partitioner, seed=seed)
        assert as_lists(blocks) == truth          # rows and columns of every planted block
        out = regroup(Masks({"w": m}), 4, partitioner, seed=seed)
        assert as_lists(out.blocks["w"]) == truth
        check_exact_cover(out["w"], out.blocks["w"])


@pytest.mark.parametrize("partitioner", BOTH)
def test_planted_conv_blocks_through_masks(partitioner):
    # a conv layer: c_out=96, c_in*kh*kw = 200 = 8 x 5 x 5 (the blocks ignore kernel geometry)
    m, truth = planted(3, noise=0.02)
    masks = Masks({"conv.weight": m.view(96, 8, 5, 5), "conv.bias": torch.ones(96)})
    out = regroup(masks, 4, partitioner, seed=1)
    assert as_lists(out.blocks["conv.weight"]) == truth
    check_exact_cover(out["conv.weight"], out.blocks["conv.weight"])
    assert out["conv.weight"].shape == (96, 8, 5, 5)
    assert torch.equal(out["conv.bias"], masks["conv.bias"])      # 1-D companion untouched
    st = regroup_stats(out, masks)["conv.weight"]
    assert st["blocks"] == 4 and st["rows_covered"] == 96
    assert st["block_density"] == 1.0 and st["refilled"] == 0     # planted blocks are full
    assert st["retained"] == pytest.approx(4 * 24 * 40 / int(m.sum()))
    assert st["sparsity"] == pytest.approx(1 - 4 * 24 * 40 / m.numel())


def test_noise_does_not_become_blocks_and_fixed_t2_differs():
    m, truth = planted(5, noise=0.03)
    assert as_lists(regroup_layer(m, 4)) == truth
    # with a fixed, tiny column threshold the while loop also gathers the noise
    loose = regroup(Masks({"w": m}), 4, t2=1, b1=2, b2=2)
    assert len(loose.blocks["w"]) > 4
    check_exact_cover(loose["w"], loose.blocks["w"])


def second_pass_mask(seed=0):
    """Primary blocks (rows 0-31 | 32-63) x 30 columns each, and secondary blocks on an
    orthogonal row split ({0-15, 32-47} | {16-31, 48-63}) x 16 columns each: one pass can only
    take the primary blocks; the secondary ones need the while loop."""
    g = torch.Generator().manual_seed(seed)
    R, N = 64, 120
    m = torch.zeros(R, N, dtype=torch.bool)
    rows = torch.arange(R)
    prim = [rows[:32], rows[32:]]
    sec = [torch.cat([rows[:16], rows[32:48]]), torch.cat([rows[16:32], rows[48:]])]
    m[prim[0][:, None], torch.arange(0, 30)[None, :]] = True
    m[prim[1][:, None], torch.arange(30, 60)[None, :]] = True
    m[sec[0][:, None], torch.arange(60, 76)[None, :]] = True
    m[sec[1][:, None], torch.arange(76, 92)[None, :]] = True
    pr, pc = torch.randperm(R, generator=g), torch.randperm(N, generator=g)
    return m[pr][:, pc]


@pytest.mark.parametrize("partitioner", BOTH)
def test_while_loop_finds_a_second_pass_block(partitioner):
    m = second_pass_mask()
    one = regroup_layer(m, 2, partitioner, max_passes=1)
    assert sorted((b.rows.numel(), b.cols.numel()) for b in one) == [(32, 30), (32, 30)]
    full = regroup_layer(m, 2, partitioner)
    assert sorted((b.rows.numel(), b.cols.numel()) for b in full) == [(32, 16), (32, 16),
                                                                      (32, 30), (32, 30)]
    check_exact_cover(m, full)        # every nonzero is in exactly one block, nothing refilled


def test_fully_dense_layer_is_one_block_and_unchanged():
    m = torch.ones(24, 4, 3, 3, dtype=torch.bool)
    out = regroup(Masks({"w": m}))
    assert torch.equal(out["w"], m)
    (b,) = out.blocks["w"]
    assert b.rows.tolist() == list(range(24)) and b.cols.tolist() == list(range(36))


# -- granularity -----------------------------------------------------------------------------
def test_channel_granularity_gives_whole_channels_and_finds_channel_blocks():
    g = torch.Generator().manual_seed(0)
    c_out, c_in, k = 64, 24, 9
    m = torch.zeros(c_out, c_in, 3, 3, dtype=torch.bool)
    pr, pc = torch.randperm(c_out, generator=g), torch.randperm(c_in, generator=g)
    truth = []
    for b in range(2):
        r, ch = pr[b * 32:(b + 1) * 32], pc[b * 8:(b + 1) * 8]
        # each row uses every planted channel, but only some kernel positions of it
        m[r[:, None], ch[None, :]] = torch.rand(32, 8, 3, 3, generator=g) < 0.3
        m[r[:, None], ch[None, :], 1, 1] = True
        cols = sorted((c * k + torch.arange(k)).tolist() for c in ch.tolist())
        truth.append((sorted(r.tolist()), sorted(sum(cols, []))))
    out = regroup(Masks({"w": m}), 2, granularity="channel")
    blocks = out.blocks["w"]
    for b in blocks:
        ch = b.cols.view(-1, k)
        assert torch.equal(ch, ch[:, :1] + torch.arange(k)) and bool((ch[:, 0] % k == 0).all())
    assert as_lists(blocks) == sorted(truth)
    check_exact_cover(out["w"], blocks)
    flat = regroup_layer(m.reshape(c_out, -1), 2, granularity="channel", kernel_numel=k)
    assert as_lists(flat) == sorted(truth)             # the 2-D view + kernel_numel agrees
    assert bool(out["w"][m].all())                       # every kept weight survives
    # element granularity on the same mask gives different (position-level) columns
    elem = regroup(Masks({"w": m}), 2, granularity="element").blocks["w"]
    assert as_lists(elem) != sorted(truth)


def test_linear_layer_granularities_agree():
    m, _ = planted(7)
    a = regroup(Masks({"fc.weight": m}), 4, granularity="element")
    b = regroup(Masks({"fc.weight": m}), 4, granularity="channel")
    assert as_lists(a.blocks["fc.weight"]) == as_lists(b.blocks["fc.weight"])


# -- values, determinism, whole models ---------------------------------------------------------
def test_deterministic_and_input_untouched():
    torch.manual_seed(0)
    model = ts.models.create("resnet20", 1, 10, (16, 16), width=0.5)
    masks = ts.prune.random_masks(model, 0.7, seed=3)
    before = {k: v.clone() for k, v in masks.items()}
    threads = torch.get_num_threads()
    a = regroup(masks, seed=5)
    assert torch.get_num_threads() == threads          # the one-thread section is undone
    b = regroup(masks, seed=5)
    assert a == b
    for n in a.blocks:
        assert as_lists(a.blocks[n]) == as_lists(b.blocks[n])
        check_exact_cover(a[n], a.blocks[n])
    assert all(torch.equal(masks[k], before[k]) for k in before)
    assert masks.blocks == {}
    # every layer got blocks; the small-layer policy did not wipe an 8-row layer
    assert set(a.blocks) == set(prunable_names(model))
    settings = regroup_settings(masks)
    assert settings["conv1.weight"]["t1"] == 1 and settings["conv1.weight"]["b1"] == 4
    stats = regroup_stats(a, masks)
    assert all(s["blocks"] >= 1 for s in stats.values())


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9])
def test_small_model_defaults_regroup_every_layer(sparsity):
    # ResNet-20 at width 0.5 on 1-channel input: 8-row layers, an 8 x 9 first conv, 1x1
    # shortcuts; global magnitude masks leave those layers at very different densities
    torch.manual_seed(0)
    model = ts.models.create("resnet20", 1, 10, (28, 28), width=0.5)
    masks = ts.prune.omp(model, sparsity)
    out = regroup(masks)
    assert set(out.blocks) == set(masks.weight_names)
    for n in masks.weight_names:
        check_exact_cover(out[n], out.blocks[n])
        assert int(out[n].sum()) > 0


def test_layers_argument_regroups_only_those():
    m1, _ = planted(0)
    m2 = torch.rand(96, 200, generator=torch.Generator().manual_seed(1)) < 0.3
    masks = Masks({"a.weight": m1, "b.weight": m2})
    out = regroup(masks, 4, layers=["a.weight"])
    assert set(out.blocks) == {"a.weight"}
    assert torch.equal(out["b.weight"], m2)


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"t1": 0}, "t1"), ({"t1": 2.5}, "t1"),
    ({"partitioner": "hmetis"}, "partitioner"), ({"granularity": "kernel"}, "granularity"),
    ({"width_ratio": 0}, "width_ratio"), ({"width_ratio": -1.0}, "width_ratio"), ({"width_ratio": float("nan")}, "width_ratio"),
    ({"t2": 0}, "t2"), ({"b1": 0}, "b1"), ({"b2": -3}, "b2"), ({"imbalance": 1.5}, "imbalance"),
    ({"max_passes": 0}, "max_passes"), ({"layers": ["nope.weight"]}, "nope.weight"),
])
def test_bad_arguments(kwargs, words):
    m, _ = planted(0)
    with pytest.raises(UsageError, match=words):
        regroup(Masks({"w": m}), **kwargs)


def test_bad_layers_name_the_layer():
    m, _ = planted(0)
    both = Masks({"ok.weight": m, "zero.weight": torch.zeros(32, 10, dtype=torch.bool)})
    with pytest.warns(UserWarning, match="all-zero mask.*zero.weight"):
        out = regroup(both)  # skipped, not a refusal of the whole model
    assert "zero.weight" not in out.blocks and not bool(out["zero.weight"].any())
    with pytest.raises(UsageError, match=r"'zero.weight'.*all zeros"):
        regroup(both, layers=["zero.weight"])
    small = torch.rand(8, 72, generator=torch.Generator().manual_seed(0)) < 0.5
    with pytest.raises(UsageError, match=r"'small.weight'.*t1=16.*8 non-empty rows"):
        regroup(Masks({"small.weight": small}), t1=16)
    with pytest.raises(UsageError, match="not binary"):
        regroup(Masks({"w": torch.full((4, 4), 2.0)}))
    with pytest.raises(UsageError, match="not binary"):
        regroup_layer(torch.full((4, 4), 0.5))
    # a permutation matrix: no column is shared by two rows, so no block can exist
    perm = Masks({"perm.weight": torch.eye(32, dtype=torch.bool)})
    with pytest.raises(UsageError, match=r"'perm.weight'.*no dense block.*lower b1, b2"):
        regroup(perm, layers=["perm.weight"])
    # without layers=: the layer passes through unstructured, with a warning naming it
    with pytest.warns(UserWarning, match="no dense block.*perm.weight"):
        out = regroup(perm)
    assert torch.equal(out["perm.weight"], perm["perm.weight"]) and "perm.weight" not in out.blocks


# -- the partitioners ------------------------------------------------------------------------
@pytest.mark.parametrize("partitioner", BOTH)
def test_partition_rows_balance_empty_rows_and_seed(partitioner):
    m, _ = planted(2)
    m[[5, 17]] = False                                  # empty rows are no vertices
    p = partition_rows(m, 4, partitioner, seed=0, imbalance=0.1)
    assert p.dtype == torch.int64 and p.shape == (96,)
    assert p[5] == -1 and p[17] == -1 and bool((p[m.any(dim=1)] >= 0).all())
    sizes = torch.bincount(p[p >= 0], minlength=4)
    assert int(sizes.max()) <= math.ceil(1.1 * 94 / 4)
    assert torch.equal(p, partition_rows(m, 4, partitioner, seed=0, imbalance=0.1))
    with pytest.raises(UsageError, match="95 parts"):
        partition_rows(m, 95, partitioner)


def test_metis_cuts_no_more_than_a_random_split():
    m, truth = planted(4, noise=0.05)
    p = partition_rows(m, 4)
    rnd = torch.arange(96) % 4
    assert connectivity(m, p) < connectivity(m, rnd[torch.randperm(96)])


@needs_kahypar
def test_kahypar_failure_is_an_exception_and_the_process_survives(tmp_path):
    m, _ = planted(0)
    # a preset without the coarsening options: KaHyPar prints and exits its process (255)
    broken = tmp_path / "broken.ini"
    broken.write_text("mode=direct\nobjective=km1\n")
    with pytest.raises(PartitionerError, match="exit status 255"):
        partition_rows(m, 4, "kahypar", kahypar_preset=broken)
    garbage = tmp_path / "garbage.ini"
    garbage.write_text("this is not a kahypar option\n")
    with pytest.raises(PartitionerError, match="exit status"):
        partition_rows(m, 4, "kahypar", kahypar_preset=garbage)
    with pytest.raises(UsageError, match="does not exist"):
        partition_rows(m, 4, "kahypar", kahypar_preset=tmp_path / "missing.ini")
    # still alive, and the shipped preset still works afterwards
    assert partition_rows(m, 4, "kahypar").max() == 3


def test_missing_kahypar_is_a_clear_usage_error(monkeypatch):
    monkeypatch.setattr(part_mod, "kahypar_available", lambda: False)
    m, _ = planted(0)
    with pytest.raises(UsageError, match=r"pip install ticketsmith\[kahypar\]"):
        regroup(Masks({"w": m}), 4, "kahypar")


def test_shipped_preset_is_package_data():
    assert part_mod.KAHYPAR_PRESET.is_file()
    assert part_mod.KAHYPAR_PRESET.suffix == ".ini"
    text = part_mod.KAHYPAR_PRESET.read_text()
    assert "objective=km1" in text and "mode=" in text


def test_block_type_is_the_masks_block():
    m, _ = planted(0)
    assert all(isinstance(b, Block) for b in regroup_layer(m, 4))

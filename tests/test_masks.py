import pytest
import torch
from torch import nn

import ticketsmith as ts
from ticketsmith.errors import ArtifactError, UsageError


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                         nn.ReLU(), nn.Linear(8, 3))


def test_prunable_names_head_and_first():
    m = small()
    assert ts.prunable_names(m) == ["0.weight", "3.weight"]
    assert ts.prunable_names(m, include_head=True) == ["0.weight", "3.weight", "5.weight"]
    assert ts.prunable_names(m, include_first=False) == ["3.weight"]
    with pytest.raises(UsageError, match="no prunable"):
        ts.prunable_names(nn.Sequential(nn.ReLU()))


def test_sparsity_accounting_ignores_companion_masks():
    m = small()
    masks = ts.Masks.ones(m)
    w = masks["0.weight"].clone()
    w[0] = False  # one whole output channel: 9 of 36 weights
    masks2 = masks.updated({"0.weight": w, "0.bias": torch.tensor([False, True, True, True])})
    assert masks["0.weight"].all(), "updated() must not modify the original"
    assert masks2.nonzeros() == masks.nonzeros() - 9
    assert masks2.numel() == masks.numel()
    assert masks2.layer_sparsity()["0.weight"] == pytest.approx(0.25)
    assert masks2.channel_sparsity()["0.weight"] == pytest.approx(0.25)
    assert "total" in masks2.report()


def test_a_companion_of_several_dimensions_counts_for_nothing_and_survives_a_file(tmp_path):
    """A position embedding's mask ([1, tokens, channels], refill's companion of dead stream
    channels) is no weight: sparsity, counts and pruning's layer list ignore it, through
    `updated` and save / load."""
    m = small()
    masks = ts.Masks.ones(m)
    pos = torch.ones(1, 5, 4, dtype=torch.bool)
    pos[..., 1] = False
    with_pos = masks.updated({"pos_embed": pos}, companions=["pos_embed"])
    assert with_pos.weight_names == masks.weight_names
    assert with_pos.numel() == masks.numel() and with_pos.sparsity() == masks.sparsity()
    w = masks["0.weight"].clone()
    w[0] = False
    again = with_pos.updated({"0.weight": w})
    assert again.companions == {"pos_embed"} and "pos_embed" not in again.weight_names
    again.save(tmp_path / "m.safetensors")
    back = ts.Masks.load(tmp_path / "m.safetensors")
    assert back == again and back.companions == {"pos_embed"}
    assert back != masks.updated({"0.weight": w, "pos_embed": pos})  # (counted as a weight)
    assert "pos_embed" in masks.updated({"pos_embed": pos}).weight_names


def test_check_rejects_wrong_shape_unknown_name_and_nonbinary():
    m = small()
    with pytest.raises(UsageError, match="0.weight.*shape"):
        ts.Masks({"0.weight": torch.ones(3, 3, dtype=torch.bool)}).check(m)
    with pytest.raises(UsageError, match="nope"):
        ts.Masks({"nope": torch.ones(3, dtype=torch.bool)}).check(m)
    with pytest.raises(UsageError, match="not binary"):
        ts.Masks({"0.weight": torch.full((4, 1, 3, 3), 0.5)})


def test_save_load_round_trip_with_blocks(tmp_path):
    m = small()
    masks = ts.prune.random_masks(m, 0.5, seed=1)
    blocks = {"3.weight": [ts.Block(torch.tensor([0, 2]), torch.tensor([1, 5, 7])),
                           ts.Block(torch.tensor([3]), torch.tensor([0]))]}
    masks = masks.updated(blocks=blocks)
    masks.save(tmp_path / "m.safetensors")
    back = ts.Masks.load(tmp_path / "m.safetensors")
    assert back == masks
    assert len(back.blocks["3.weight"]) == 2
    assert torch.equal(back.blocks["3.weight"][0].cols, torch.tensor([1, 5, 7]))


def test_corrupt_masks_file_is_refused(tmp_path):
    m = small()
    f = tmp_path / "m.safetensors"
    ts.Masks.ones(m).save(f)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the tensor data
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        ts.Masks.load(f)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError):
        ts.Masks.load(f)


def test_pruned_weights_stay_exactly_zero_under_momentum_and_weight_decay():
    m = small()
    masks = ts.prune.random_masks(m, 0.7, seed=3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    # momentum built up *before* the mask exists must not bring pruned weights back
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 1, 8, 8)).sum().backward()
        opt.step()
    hold = masks.hold(m, opt)
    params = dict(m.named_parameters())
    for _ in range(20):
        opt.zero_grad()
        loss = m(torch.randn(5, 1, 8, 8)).pow(2).sum()
        loss.backward()
        for k in masks.weight_names:
            assert (params[k].grad[~masks[k]] == 0).all()
        opt.step()
        for k in masks.weight_names:
            assert (params[k][~masks[k]] == 0).all()
            assert (opt.state[params[k]]["momentum_buffer"][~masks[k]] == 0).all()
    kept = params["3.weight"][masks["3.weight"]]
    assert (kept != 0).float().mean() > 0.99, "kept weights must still train"
    hold.remove()

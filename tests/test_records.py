"""One reader (issue 16): every record kind is validated on load against its schema, and a
tampered or foreign file is one ArtifactError naming the file and the field; executors check
their own configs; compact models work under autograd; the records in results/ all pass."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith import records
from ticketsmith.compact.condensed import CondensedLinear
from ticketsmith.errors import ArtifactError, UsageError
from ticketsmith.runs import RunConfig

RESULTS = Path(__file__).resolve().parents[1] / "results"


def write(tmp_path, obj, name="r.json") -> Path:
    f = tmp_path / name
    f.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return f


GOOD_ROUND = {"best_epoch": 3, "best_val_acc": 0.9, "test_acc": 0.89, "sparsity": 0.5}


@pytest.mark.parametrize("change,field", [
    ({"best_epoch": "three"}, "best_epoch"),
    ({"test_acc": [0.9]}, "test_acc"),
    ({"layer_sparsity": {"conv.weight": "half"}}, "layer_sparsity.conv.weight"),
    ({"channels_kept": {"conv.weight": [1, "x"]}}, "channels_kept.conv.weight.1"),
    ({"best_epoch": 3.5}, "best_epoch"),  # strict: no silent truncation
])
def test_a_round_record_with_a_wrong_type_names_the_file_and_field(tmp_path, change, field):
    f = write(tmp_path, {**GOOD_ROUND, **change})
    with pytest.raises(ArtifactError, match=rf"r\.json: field '{field}'"):
        records.read(f, "round")


def test_missing_keys_and_foreign_shapes_are_named(tmp_path):
    f = write(tmp_path, {k: v for k, v in GOOD_ROUND.items() if k != "test_acc"})
    with pytest.raises(ArtifactError, match="field 'test_acc' is missing"):
        records.read(f, "round")
    with pytest.raises(ArtifactError, match="the whole record: .* got a list"):
        records.read(write(tmp_path, [1, 2]), "round")
    with pytest.raises(ArtifactError, match="nested too deeply"):
        records.read(write(tmp_path, "[" * 50_000 + "]" * 50_000), "data")
    assert records.read(write(tmp_path, {**GOOD_ROUND, "new_field": {"x": 1}}), "round")["new_field"] == {"x": 1}


def test_a_config_record_is_checked_field_by_field(tmp_path):
    good = RunConfig(model="lenet5", dataset="digits").identity()
    assert RunConfig.read(write(tmp_path, good, "config.json")) == RunConfig(model="lenet5", dataset="digits")
    for change, message in [({"epochs": "30"}, "field 'epochs': input should be a valid integer"),
                            ({"sparsity": ["a"]}, "field 'sparsity.0'"),
                            ({"colour": 1}, "field 'colour' is not one ticketsmith knows"),
                            ({"channels_last": 1}, "field 'channels_last'")]:
        with pytest.raises(ArtifactError, match=message):
            RunConfig.read(write(tmp_path, {**good, **change}, "config.json"))
    del good["model"]
    with pytest.raises(ArtifactError, match="config.json: field 'model' is missing"):
        RunConfig.read(write(tmp_path, good, "config.json"))
    with pytest.raises(ArtifactError, match="not a run config"):
        RunConfig.read(write(tmp_path, [good], "config.json"))


def test_every_record_in_results_fits_its_schema():
    """The schemas describe what ticketsmith really wrote: every recorded run still reads."""
    kinds = [("round", "round.json"), ("bench", "bench.json"), ("data", "data.json"),
             ("history", "history.json")]
    seen = 0
    for kind, pattern in kinds:
        for f in RESULTS.rglob(pattern):
            records.read(f, kind)
            seen += 1
    for f in RESULTS.rglob("config.json"):
        RunConfig.read(f)
        seen += 1
    assert seen > 100


def small_condensed(tmp_path, monkeypatch):
    import ticketsmith.compact.condensed as condensed
    monkeypatch.setattr(condensed, "CONDENSED_MIN_WEIGHTS", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    masks = ts.Masks({"0.weight": torch.rand(32, 16).argsort(1) < 2, "2.weight": torch.ones(8, 32, dtype=torch.bool)})
    small = C.compact(model, masks, torch.randn(4, 16))
    assert any(isinstance(m, CondensedLinear) for m in small.modules())
    masks.apply(model)
    return model, small


def test_a_tampered_compact_spec_is_refused_naming_file_and_field(tmp_path, monkeypatch):
    model, small = small_condensed(tmp_path, monkeypatch)
    desc = C.save(small, tmp_path / "ticket")
    good = json.loads(desc.read_text())
    build = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))  # noqa: E731
    cases = [({**good, "tree": "flat"}, "field 'tree'"),
             ({**good, "layers": {"0": "executor"}}, "field 'layers.0'"),
             ({k: v for k, v in good.items() if k != "source"}, "field 'source' is missing")]
    layer = next(n for n, s in good["layers"].items() if s.get("type") == "executor")
    broken = json.loads(json.dumps(good))
    del broken["layers"][layer]["config"]
    cases.append((broken, f"layer '{layer}': field 'config' is missing"))
    for spec, message in cases:
        desc.write_text(json.dumps(spec))
        with pytest.raises(ArtifactError, match=message):
            C.load(tmp_path / "ticket", build=build)


def test_a_condensed_config_with_rows_out_of_range_is_refused(tmp_path, monkeypatch):
    _, small = small_condensed(tmp_path, monkeypatch)
    layer = next(m for m in small.modules() if isinstance(m, CondensedLinear))
    tensors = {k: v.clone() for k, v in layer.tensors().items()}
    CondensedLinear.from_config(layer.to_config(), tensors)  # as saved: fine
    for bad in (-1, layer.out_features):
        t = dict(tensors, active_rows=tensors["active_rows"].clone())
        t["active_rows"][0] = bad
        with pytest.raises(UsageError, match="active rows must be distinct"):
            CondensedLinear.from_config(layer.to_config(), t)


def test_compact_executors_work_under_autograd(tmp_path, monkeypatch):
    """Outside no_grad, with an input that wants a gradient: the same output and the same input
    gradient as the masked model, whatever kernel the executor runs (oneDNN's has no backward)."""
    model, small = small_condensed(tmp_path, monkeypatch)
    layer = next(m for m in small.modules() if isinstance(m, CondensedLinear))
    for kernel in layer.candidates():
        layer.use(kernel)
        for n in (1, 40):
            x = torch.randn(n, 16, requires_grad=True)
            x2 = x.detach().clone().requires_grad_()
            y, y2 = small(x), model(x2)
            torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-5)
            y.square().sum().backward()
            y2.square().sum().backward()
            torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    layer.values.requires_grad_(True)
    with pytest.raises(UsageError, match="weights are fixed"):
        small(torch.randn(2, 16))


def test_a_forgotten_no_grad_is_pointed_out_once(monkeypatch):
    """Called outside no_grad, a compact model's executors run their dense kernels (their biases
    require grad): the same output, but none of the speed, so say so, once, not once per layer."""
    import warnings

    import ticketsmith.compact.condensed as condensed
    monkeypatch.setattr(condensed, "CONDENSED_MIN_WEIGHTS", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    masks = ts.Masks({"0.weight": torch.rand(32, 16).argsort(1) < 2,
                      "2.weight": torch.rand(8, 32).argsort(1) < 4})
    small = C.compact(model, masks, torch.randn(4, 16))
    assert sum(isinstance(m, CondensedLinear) for m in small.modules()) == 2
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own default: each distinct warning once
        y = small(x)
        small(x)  # a second call warns no more
    ours = [w for w in seen if "inference_mode" in str(w.message)]
    assert len(ours) == 1 and "autograd is recording" in str(ours[0].message)
    with torch.inference_mode():
        torch.testing.assert_close(small(x), y.detach(), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing under inference_mode or no_grad
        with torch.inference_mode():
            small(x)
        with torch.no_grad():
            small(x)


def test_masks_on_the_meta_device_are_refused():
    with pytest.raises(UsageError, match="meta device"):
        ts.Masks({"w": torch.ones(3, 3, device="meta")})


def test_a_masks_file_with_tampered_metadata_or_block_names_is_refused(tmp_path):
    """The checksum covers the tensors, not the metadata or the names: those are checked too."""
    from ticketsmith.io import save_tensors
    m = torch.ones(4, 4, dtype=torch.bool)
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 1])
    cases = [({"mask/w": m}, {"kind": "ticketsmith.masks", "order": "w"}, "field 'order'"),
             ({"mask/w": m}, {"kind": "ticketsmith.masks", "order": ["v"]}, "no mask tensor for layer 'v'"),
             ({"mask/w": m, "block/w/x/rows": rows, "block/w/x/cols": cols},
              {"kind": "ticketsmith.masks", "order": ["w"]}, "block index must be an integer"),
             ({"mask/w": m, "block/w/0/rows": rows}, {"kind": "ticketsmith.masks", "order": ["w"]},
              "needs its rows and cols"),
             ({"mask/w": torch.full((4, 4), 2)}, {"kind": "ticketsmith.masks", "order": ["w"]}, "not binary")]
    for tensors, meta, message in cases:
        save_tensors(tmp_path / "m.safetensors", tensors, meta)
        with pytest.raises(ArtifactError, match=message):
            ts.Masks.load(tmp_path / "m.safetensors")
    save_tensors(tmp_path / "m.safetensors", {"mask/w": m, "block/w/0/rows": rows, "block/w/0/cols": cols},
                 {"kind": "ticketsmith.masks", "order": ["w"]})
    assert len(ts.Masks.load(tmp_path / "m.safetensors").blocks["w"]) == 1

"""A user's own model on the CLI: `ticketsmith run --model package.module:function`."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import ticketsmith as ts
from ticketsmith.cli import main

BUILDER = '''
import torch
from torch import nn


def build(in_channels, num_classes, image_size, hidden=8):
    """A user's network: it names the dataset's shape, so ticketsmith passes it."""
    h, w = image_size
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Flatten(), nn.Linear(hidden * h * w, 32), nn.ReLU(), nn.Linear(32, num_classes))


def plain(hidden=16):
    """No dataset arguments: it gets only the kwargs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def not_a_model():
    return 42


class Segmenter(nn.Module):
    """A segmentation model's output: a dict of per-pixel logits."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def segmenter(num_classes):
    return Segmenter(num_classes)


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models").mkdir()
    (tmp_path / "my_models" / "__init__.py").write_text("")
    (tmp_path / "my_models" / "nets.py").write_text(BUILDER)
    (tmp_path / "broken.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_builder_in_the_users_module_runs_end_to_end_and_resumes(user_module, capsys):
    out = user_module / "run"
    cmd = [sys.executable, "-m", "ticketsmith", "run", "--model", "my_models.nets:build",
           "--model-kwargs", '{"hidden": 4}', "--dataset", "digits", "--epochs", "1", "--rounds", "1",
           "--batch-size", "64", "--out", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=f"{user_module}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=user_module)
    assert p.returncode == 0, p.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "my_models.nets:build" and json.loads(config["model_kwargs"]) == {"hidden": 4}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["rounds"][1]["sparsity"] == pytest.approx(0.2, abs=0.01)
    weights = ts.io.load_tensors(out / "round_01" / "weights.safetensors")[0]
    assert weights["0.weight"].shape == (4, 1, 3, 3)  # built with the kwargs and the dataset's shape
    # resuming rebuilds the model the same way: the finished run is recognised, nothing retrains
    argv = cmd[3:]
    assert main(argv) == 0
    assert "training" not in capsys.readouterr().err
    # other kwargs are another run
    assert main([*argv[:4], '{"hidden": 5}', *argv[5:]]) == 2
    assert "model_kwargs" in capsys.readouterr().err


@pytest.mark.parametrize("spec, needle", [
    ("no_such_package.models:build", "cannot import no_such_package.models (ModuleNotFoundError"),
    ("broken:build", "cannot import broken (SyntaxError"),
    ("my_models.nets:missing", "has no attribute 'missing'"),
    ("my_models.nets:NOT_CALLABLE", "not a callable"),
    ("my_models.nets:not_a_model", "returned an object of type int, not an nn.Module"),
    ("my_models.nets:plain", "the builder raised TypeError"),  # given a kwarg it does not take
    ("my models:build", "not a builder path"),
])
def test_a_bad_builder_is_one_line_exit_2_nothing_written(user_module, capsys, spec, needle):
    out = user_module / "out"
    kwargs = ["--model-kwargs", '{"depth": 3}'] if spec.endswith(":plain") else []
    code = main(["run", "--model", spec, *kwargs, "--dataset", "digits", "--epochs", "1", "--rounds", "1",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_library_models_without_the_library_say_what_to_install(lib, capsys, tmp_path):
    try:
        importlib.import_module(f"{lib}.models" if lib == "torchvision" else lib)
    except Exception:  # noqa: BLE001 (not installed, or installed but broken: both refused)
        pass
    else:
        pytest.skip(f"{lib} imports here")
    code = main(["run", "--model", f"{lib}:resnet18", "--dataset", "digits", "--epochs", "1",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"pip install {lib}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_settings_that_do_not_apply_to_a_builder_or_a_zoo_model_are_refused(capsys, tmp_path):
    assert main(["run", "--model", "x.y:build", "--width", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "--width does not apply" in capsys.readouterr().err
    assert main(["run", "--model", "lenet5", "--model-kwargs", '{"a": 1}', "--out", str(tmp_path / "o")]) == 2
    assert "--model-kwargs does not apply" in capsys.readouterr().err
    assert main(["run", "--model", "x.y:build", "--model-kwargs", "[1, 2]", "--out", str(tmp_path / "o")]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_library_builders_get_the_datasets_shape(user_module):
    model = ts.models.build("my_models.nets:build", {"hidden": 2}, in_channels=3, num_classes=7,
                            image_size=(5, 5))
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 7)
    # a builder that names none of the dataset's arguments gets only its kwargs
    assert ts.models.build("my_models.nets:plain", {"hidden": 3})[1].out_features == 3
    # nothing swapped: no other dense baseline to time
    assert ts.models.original("my_models.nets:plain", {"hidden": 3}) is None


def test_torchvision_models_never_load_backbone_weights(monkeypatch):
    """torchvision's segmentation / detection builders load ImageNet weights into their backbone
    unless told `weights_backbone=None`, even with `weights=None`: built here, they are told;
    a builder without that argument does not get it."""
    import types

    from torch import nn

    import ticketsmith.models as M
    calls = []

    def segmentation(*, weights=None, weights_backbone="IMAGENET1K_V1", num_classes=21):
        calls.append(weights_backbone)
        return nn.Linear(2, num_classes)

    def classifier(*, weights=None, num_classes=1000):
        return nn.Linear(2, num_classes)

    builders = {"fcn": segmentation, "net": classifier}
    fake = types.SimpleNamespace(get_model_builder=lambda name: builders[name],
                                 get_model=lambda name, **kw: builders[name](**kw))
    monkeypatch.setattr(M, "_library", lambda lib, spec: fake)
    assert ts.models.build("torchvision:fcn", num_classes=4).out_features == 4
    assert calls == [None]
    assert ts.models.build("torchvision:net", num_classes=3).out_features == 3


@pytest.mark.parametrize("spec,kwargs,needle", [
    ("my_models.nets:segmenter", [], "returns dict"),
    ("my_models.nets:build", ["--model-kwargs", '{"in_channels": 3}'], "it raised RuntimeError"),
    ("my_models.nets:build", ["--model-kwargs", '{"num_classes": 3}'], "returns (2, 3)")])
def test_a_model_that_is_no_classifier_of_the_data_is_refused_before_anything_is_written(
        user_module, capsys, spec, kwargs, needle):
    """`ticketsmith run` trains classifiers: a model returning a dict (segmentation), one that
    does not take the dataset's images, or one with another number of classes, is refused in
    one line before the run directory exists."""
    out = user_module / "run"
    code = main(["run", "--model", spec, *kwargs, "--dataset", "digits", "--epochs", "1",
                 "--rounds", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

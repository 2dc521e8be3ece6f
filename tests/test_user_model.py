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

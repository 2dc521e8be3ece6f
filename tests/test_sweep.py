import json


from ticketsmith.cli import main
from ticketsmith.runs import Run, RunConfig


def test_sweep_regroup_settings_on_an_imp_run(tmp_path, capsys):
    run = tmp_path / "imp"
    Run(RunConfig(model="vgg11", width=0.25, dataset="digits", epochs=1, batch_size=128, rounds=1,
                  prune_fraction=0.6), run, progress=False).execute()
    argv = ["sweep", str(run), "--round", "1", "--vary", "b1=2,4", "--vary", "width_ratio=1.0,3.0",
            "--epochs", "1", "--pairs", "3", "--batch-size", "4", "--out", str(tmp_path / "sw"),
            "--no-progress", "--runtimes", "torch"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    rows = {r["setting"]: r for r in res["rows"]}
    assert set(rows) == {"default", "b1=2", "b1=4", "width_ratio=1.0", "width_ratio=3.0"}
    for r in rows.values():
        assert 0 <= r["test_acc"] <= 1 and r["blocks"] >= 1 and r["speedup"] > 0
        assert r["sparsity"] <= r["unstructured_sparsity"] + 1e-9  # blocks refill
    # the hyper-parameters matter: the settings give different block structures
    assert len({(r["blocks"], round(r["sparsity"], 6)) for r in rows.values()}) >= 3
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 5000
    assert "| b1=2 |" in capsys.readouterr().out
    # resumable: every setting is on disk, a second call retrains nothing
    assert main(argv) == 0


def test_sweep_bad_input(tmp_path, capsys):
    assert main(["sweep", str(tmp_path), "--round", "1", "--vary", "width_ratio=1", "--out", str(tmp_path / "o")]) == 2
    assert main(["sweep", str(tmp_path), "--round", "1", "--vary", "colour=1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a ticketsmith run" in err and "NAME=V1,V2" in err

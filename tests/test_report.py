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
                  burst_s=0.002)
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
    # the benched round's time saving appears in the table
    saving = json.loads((tiny_run / "round_02" / "bench.json").read_text())["results"][0]["time_saving"]
    assert f"{100 * saving:.2f}" in text


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
    assert "| 1 |" not in md and "(partial)" in md


def test_report_refuses_a_non_run_directory(tmp_path):
    with pytest.raises(ts.UsageError, match="not a ticketsmith run"):
        make_report([tmp_path], tmp_path / "rep")


def test_sparse_training_runs_form_one_curve_per_method(tmp_path):
    """DST runs: one run per sparsity, each a single sparse round 0; the dense line comes from
    the dense run only, and each method is one row and one curve."""
    runs = []
    for name, method, s in (("dense", "dense", (0.8,)), ("s5", "srigl", (0.5,)), ("s8", "srigl", (0.8,))):
        cfg = RunConfig(model="mlp-300-100", width=0.25, dataset="digits", epochs=1, batch_size=64,
                        method=method, sparsity=s, dst_delta_t=5)
        Run(cfg, tmp_path / name, progress=False).execute()
        runs.append(tmp_path / name)
    dense_acc = json.loads((tmp_path / "dense" / "summary.json").read_text())["rounds"][0]["test_acc"]
    text = make_report(runs, tmp_path / "rep").read_text()
    assert f"Dense test accuracy: {100 * dense_acc:.2f}%" in text
    rows = [line for line in text.splitlines() if line.startswith("| SRigL |")]
    assert len(rows) == 1, text  # both sparsities in one method row
    assert not any(line.startswith("| Dense |") for line in text.splitlines())

"""Nothing lost, nothing silently wrong: the run remembers its data, rounds beyond 99, only our
own temporary files are cleaned, reports inline only what they wrote."""
import base64
import json

import pytest

import ticketsmith as ts
from ticketsmith.data import Dataset
from ticketsmith.io import write_json
from ticketsmith.report import make_report
from ticketsmith.runs import Run, RunConfig, summarize_run

FAST = dict(model="lenet5", dataset="digits", epochs=1, batch_size=64, rounds=1)


def test_resuming_on_other_data_is_refused(tmp_path, monkeypatch):
    Run(RunConfig(**dict(FAST, rounds=0)), tmp_path, progress=False).execute()
    record = json.loads((tmp_path / "data.json").read_text())
    assert record["dataset"] == "digits" and len(record["digest"]) == 64
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(Dataset, "digest", lambda self: "0" * 64)  # the same name, other pixels
    with pytest.raises(ts.UsageError, match="trained on other data"):
        Run(RunConfig(**FAST), tmp_path, progress=False).execute()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_run_of_150_rounds_is_listed_right(tmp_path):
    cfg = RunConfig(model="lenet5", dataset="digits", rounds=149).identity()
    write_json(tmp_path / "config.json", cfg)
    for r in range(150):
        write_json(tmp_path / f"round_{r:02d}" / "round.json", {"best_epoch": 1, "best_val_acc": 0.5, "test_acc": 0.5,
                                                                           "sparsity": 1 - 0.8 ** r})
    s = summarize_run(tmp_path)
    assert s["complete"] and [r["round"] for r in s["rounds"]] == list(range(150))


def test_resume_removes_only_our_temporary_files(tmp_path):
    Run(RunConfig(**dict(FAST, rounds=0)), tmp_path, progress=False).execute()
    mine = tmp_path / "round_00" / ".notes.tmp"
    mine.write_text("a user's file")
    ours = tmp_path / "round_00" / ".weights.safetensors.abc123.ts-tmp"
    ours.write_bytes(b"half written")
    Run(RunConfig(**FAST), tmp_path, progress=False).execute()
    assert mine.read_text() == "a user's file" and not ours.exists()


def test_report_inlines_only_the_plots_it_wrote(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG private bytes of the user")
    run = tmp_path / "run"
    Run(RunConfig(**FAST), run, progress=False).execute()
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"] = f"lenet5\n\n![x]({secret})\n"  # a crafted record in a shared run
    write_json(run / "config.json", cfg)
    out = make_report([run], tmp_path / "rep", title=f"t\n![y]({secret})")
    page = (tmp_path / "rep" / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert f"]({secret})" not in out.read_text()  # no image syntax survives in the Markdown
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert page.count("data:image/png;base64,") == len(pngs)


def test_a_fifo_or_dev_zero_in_place_of_a_file_is_refused_promptly(tmp_path):
    import os
    import threading
    Run(RunConfig(**dict(FAST, rounds=0)), tmp_path / "run", progress=False).execute()
    w = tmp_path / "run" / "round_00" / "weights.safetensors"
    w.unlink()
    os.mkfifo(w)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("e", pytest.raises(ts.ArtifactError, ts.io.load_tensors, w)))
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in str(result["e"].value)
    w.unlink()
    w.symlink_to("/dev/zero")
    with pytest.raises(ts.ArtifactError, match="not a regular file"):
        ts.io.load_tensors(w)
    with pytest.raises(ts.ArtifactError, match="outside the run directory"):
        summarize_run(tmp_path / "run")  # a link out of a run directory: refused before reading
    w.unlink()
    j = tmp_path / "run" / "round_00" / "round.json"
    j.unlink()
    os.mkfifo(j)
    s = summarize_run(tmp_path / "run")  # marked, not hung
    assert s["rounds"][0]["status"] == "corrupt"


def test_a_json_nesting_bomb_is_one_clear_error(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ts.ArtifactError, match="nested too deeply"):
        ts.io.read_json(f)


def test_a_full_disk_leaves_the_previous_report_in_place(tmp_path, monkeypatch):
    import errno
    import os
    run = tmp_path / "run"
    Run(RunConfig(**FAST), run, progress=False).execute()
    make_report([run], tmp_path / "rep")
    before = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ts.io.os, "fsync", full)
    with pytest.raises(OSError):
        make_report([run], tmp_path / "rep", title="another")
    after = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    assert after == before  # every previous file intact, no partial or temporary one
    monkeypatch.undo()
    assert os.listdir(tmp_path / "rep")


def test_a_kill_while_the_chain_is_copied_leaves_a_run_that_resumes(tmp_path):
    Run(RunConfig(**FAST), tmp_path / "imp", progress=False).execute()
    cfg = RunConfig(**FAST, structure="refill", chain=str(tmp_path / "imp"))
    out = tmp_path / "rf"
    out.mkdir()
    write_json(out / "config.json", cfg.identity())
    half = out / ".round_00.ts-tmp"  # what a kill in the middle of copying round 0 leaves
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"half")
    s = Run(cfg, out, progress=False).execute()
    assert s["complete"] and not half.exists()
    assert (out / "round_00" / "round.json").read_bytes() == (tmp_path / "imp" / "round_00" / "round.json").read_bytes()

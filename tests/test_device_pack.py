"""scripts/device_pack.py: a GPU machine's runs come home through the device tool's limits (at
most 8 files of 16 MiB) with their records and masks intact, and a report reads them."""
import json
import lzma

import pytest

import ticketsmith as ts
from ticketsmith.report import make_report


@pytest.fixture(scope="module")
def pack_mod(load_script):
    return load_script("scripts/device_pack.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real (tiny) IMP run and a refill run on its chain, one epoch a round."""
    root = tmp_path_factory.mktemp("device") / "runs"
    base = dict(model="lenet5", dataset="digits", epochs=1, batch_size=64, rounds=2)
    ts.runs.Run(ts.runs.RunConfig(**base), root / "imp", progress=False).execute()
    cfg = ts.runs.RunConfig(**base, structure="refill", chain=str(root / "imp"))
    ts.runs.Run(cfg, root / "refill", progress=False).execute()
    (root.parent / "logs").mkdir()
    (root.parent / "logs" / "gpu.txt").write_text("a log line\n")
    return root


def test_pack_then_unpack_keeps_records_and_exact_masks(pack_mod, runs, tmp_path):
    out, home = tmp_path / "out", tmp_path / "home"
    pack_mod.pack(runs, out, [runs.parent / "logs" / "gpu.txt"])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["imp.tar.xz", "logs.tar.xz", "refill.tar.xz"]
    pack_mod.unpack(out, home)
    for run in ("imp", "refill"):
        for f in pack_mod.record_files(runs / run):
            assert (home / f.relative_to(runs)).read_bytes() == f.read_bytes(), f
        assert not list((home / run).rglob("*.safetensors"))  # no weights, no raw masks
        for r in (1, 2):
            packed = home / run / f"round_{r:02d}" / "masks.safetensors.xz"
            original = runs / run / f"round_{r:02d}" / "masks.safetensors"
            assert lzma.decompress(packed.read_bytes()) == original.read_bytes()
    summary = json.loads((home / "refill" / "summary.json").read_text())
    assert summary["complete"]
    make_report([home / "imp", home / "refill"], tmp_path / "report", title="t")
    assert "IMP-Refill" in (tmp_path / "report" / "verdicts.md").read_text()


def test_an_archive_over_the_limit_drops_the_earliest_masks_first(pack_mod, runs, tmp_path, monkeypatch):
    one = len(pack_mod.archive(runs / "imp", pack_mod.finished_masks(runs / "imp")[-1:]))
    monkeypatch.setattr(pack_mod, "LIMIT", one)  # room for the records and one mask
    notes = pack_mod.pack(runs, tmp_path / "out", [])
    assert any("imp: left out round_01's mask" in n for n in notes)
    pack_mod.unpack(tmp_path / "out", tmp_path / "home")
    assert not (tmp_path / "home" / "imp" / "round_01" / "masks.safetensors.xz").exists()
    assert (tmp_path / "home" / "imp" / "round_02" / "masks.safetensors.xz").exists()


def test_unpack_refuses_members_outside_a_run(pack_mod, tmp_path):
    import tarfile
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "evil.txt").write_text("x")
    with tarfile.open(src / "bad.tar.xz", "w:xz") as tar:
        tar.add(tmp_path / "evil.txt", arcname="../evil.txt")
    with pytest.raises(SystemExit, match="unexpected member"):
        pack_mod.unpack(src, tmp_path / "home")

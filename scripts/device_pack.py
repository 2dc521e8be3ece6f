"""Bring a lent GPU machine's protocol runs home through the device tool's narrow door.

The device tool returns at most 8 files of at most 16 MiB each from $OUT. A full-width VGG-16
round holds 60 MB of weights and a 15 MB mask, so only the records travel: every run's config,
summary, per-round records and metrics, and each finished round's mask compressed with xz (the
exact bytes of `masks.safetensors`, checksum included: an unstructured mask at 36-89% sparsity
packs to about 2-3 MB). Weights, rewind points and checkpoints stay on the device.

    python scripts/device_pack.py pack RUNS_DIR OUT_DIR [--logs FILE ...]   (on the device)
    python scripts/device_pack.py unpack IN_DIR DEST_DIR                     (here)

`pack` writes one RUN.tar.xz per run directory (a run whose archive would pass the limit drops
the masks of its earliest rounds first, and says so) and logs.tar.xz. `unpack` extracts them
into DEST_DIR (e.g. results/protocol/runs), keeping each mask as `masks.safetensors.xz`.
"""
from __future__ import annotations

import argparse
import io
import lzma
import sys
import tarfile
from pathlib import Path

LIMIT = 15 * 2**20  # under the tool's 16 MiB a file, with room for the tar headers
MAX_FILES = 8
SKIP_SUFFIXES = (".lock", ".tmp", ".ts-tmp")


def record_files(run: Path) -> list[Path]:
    """A run's records: everything but tensors (weights, rewind point, checkpoints, masks)."""
    return sorted(p for p in run.rglob("*") if p.is_file() and p.suffix != ".safetensors"
                  and not p.name.endswith(SKIP_SUFFIXES) and not p.name.startswith("."))


def finished_masks(run: Path) -> list[Path]:
    """The mask of every finished round (round.json written), earliest round first."""
    return sorted(p / "masks.safetensors" for p in run.glob("round_*")
                  if (p / "round.json").exists() and (p / "masks.safetensors").exists())


def archive(run: Path, masks: list[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for p in record_files(run) + masks:
            tar.add(p, arcname=str(p.relative_to(run.parent)))
    return buf.getvalue()


def pack(runs: Path, out: Path, logs: list[Path]) -> list[str]:
    dirs = sorted(p for p in runs.iterdir() if (p / "config.json").exists()) if runs.is_dir() else []
    if len(dirs) + 1 > MAX_FILES:
        raise SystemExit(f"{len(dirs)} runs: more than the {MAX_FILES - 1} archives the tool returns")
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    for run in dirs:
        masks = finished_masks(run)
        data = archive(run, masks)
        while len(data) > LIMIT and masks:
            notes.append(f"{run.name}: left out {masks[0].parent.name}'s mask (archive over "
                         f"{LIMIT / 2**20:.0f} MiB)")
            masks = masks[1:]
            data = archive(run, masks)
        if len(data) > LIMIT:
            raise SystemExit(f"{run.name}: its records alone are {len(data) / 2**20:.1f} MiB")
        (out / f"{run.name}.tar.xz").write_bytes(data)
        notes.append(f"{run.name}: {len(record_files(run))} record files, {len(masks)} masks, "
                     f"{len(data) / 2**20:.2f} MiB")
    with tarfile.open(out / "logs.tar.xz", mode="w:xz") as tar:
        for p in logs:
            if p.exists():
                tar.add(p, arcname=p.name)
    return notes


def unpack(src: Path, dest: Path) -> list[str]:
    notes = []
    dest.mkdir(parents=True, exist_ok=True)
    for a in sorted(src.glob("*.tar.xz")):
        if a.name == "logs.tar.xz":
            continue
        with tarfile.open(a, mode="r:xz") as tar:
            members = tar.getmembers()
            for m in members:  # only plain files inside one run directory
                parts = Path(m.name).parts
                if not m.isfile() or m.name.startswith("/") or ".." in parts or len(parts) < 2:
                    raise SystemExit(f"{a.name}: unexpected member {m.name!r}")
            tar.extractall(dest, filter="data")
        for f in dest.glob(f"{a.name[:-len('.tar.xz')]}/round_*/masks.safetensors"):
            f.with_name(f.name + ".xz").write_bytes(lzma.compress(f.read_bytes()))
            f.unlink()  # 15 MB raw at full width: kept compressed (the exact bytes)
        notes.append(f"{a.name}: {len(members)} files into {dest}")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("runs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--logs", type=Path, nargs="*", default=[])
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("dest", type=Path)
    args = ap.parse_args(argv)
    notes = pack(args.runs, args.out, args.logs) if args.cmd == "pack" else unpack(args.src, args.dest)
    print("\n".join(notes), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

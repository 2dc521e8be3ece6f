"""Atomic, verified files. Every artifact is written to a temporary file in the same folder,
flushed, fsynced and renamed over the target, so a crash leaves either the old file or the new
one, never half of one. Tensor files are safetensors whose metadata carries a SHA-256 of the
tensor bytes, checked on load: a truncated or altered file is refused, never read as valid."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import faults
from .errors import ArtifactError

_DIGEST = "ticketsmith.sha256"
# every temporary file or folder ticketsmith makes ends so; a crash may leave one behind, and the
# clean-up on resume removes exactly these (never a user's own ".tmp" file)
TMP_SUFFIX = ".ts-tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode(fd_or_path) -> None:
    """The mode an ordinary file gets (0666 less the umask: 0644 by default). mkstemp creates
    0600 files, which colleagues on a shared machine could not read."""
    mode = 0o666 & ~_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        file_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.reach("write")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# records and tensor files are read whole: anything larger is not one of ours
MAX_JSON_BYTES = 64 << 20
MAX_TENSOR_BYTES = 16 << 30


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A FIFO, a device or a socket
    (which would block or never end), or a larger file, is refused promptly: the file is opened
    without blocking and checked before anything is read."""
    import stat
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, not a file") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ArtifactError(f"{path}: is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path}: not a regular file (a pipe, device or socket); refused")
        if st.st_size > limit:
            raise ArtifactError(f"{path}: {st.st_size:,} bytes, more than any ticketsmith file "
                                f"of this kind ({limit:,}); refused")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ArtifactError(f"{path}: grew past {limit:,} bytes while being read; refused")
    return data


def refuse_outside_links(folder: str | os.PathLike) -> None:
    """Refuse a run directory holding a symbolic link that leads out of it: a shared run whose
    `round.json` or `masks.safetensors` points at another file of the reader's would be read
    (or reported) as the run's own. Links inside the folder, and the folder being a link
    itself, are fine."""
    root = Path(folder).resolve()
    for p in Path(folder).rglob("*"):
        if p.is_symlink():
            target = p.resolve()
            if target != root and root not in target.parents:
                raise ArtifactError(f"{p}: a link to {target}, outside the run directory; refused "
                                    "(a run directory holds its own files)")


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """A matplotlib figure as PNG, atomically (a full disk leaves the previous picture)."""
    import io as _io
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(read_regular(path, MAX_JSON_BYTES).decode())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not a text file") from None
    except RecursionError:  # a nesting bomb
        raise ArtifactError(f"{path}: JSON nested too deeply") from None


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and data, in sorted name order (deterministic
    across processes, unlike the serialized bytes, whose header order may vary)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> bytes:
    """Serialize tensors and JSON-able metadata as safetensors bytes with a checksum."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"json": json.dumps(dict(metadata or {}), sort_keys=True), _DIGEST: tensors_digest(tensors)}
    return st_save(tensors, metadata=meta)


def tensors_from_bytes(data: bytes, source: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse `tensors_to_bytes` output; raise ArtifactError if it is corrupt or not ours."""
    try:
        tensors = st_load(data)
        # load() does not return the header's metadata: read it from the header itself
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = header.get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError, OverflowError) as e:
        raise ArtifactError(f"{source}: not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None
    if _DIGEST not in meta:
        raise ArtifactError(f"{source}: no ticketsmith checksum in its metadata; not written by ticketsmith")
    if tensors_digest(tensors) != meta[_DIGEST]:
        raise ArtifactError(f"{source}: checksum mismatch, the file is corrupt")
    try:
        extra = json.loads(meta.get("json", "{}"))
    except json.JSONDecodeError:
        raise ArtifactError(f"{source}: corrupt metadata") from None
    return tensors, extra


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Write tensors (and JSON-able metadata) atomically as safetensors, with a checksum."""
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors`; raise ArtifactError if it is corrupt or not ours."""
    path = Path(path)
    return tensors_from_bytes(read_regular(path, MAX_TENSOR_BYTES), str(path))

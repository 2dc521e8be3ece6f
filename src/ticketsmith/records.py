"""One reader for every JSON record ticketsmith reads back: a schema per record kind (pydantic),
validated on load, so a tampered or foreign file is one clear error naming the file, the field
and what was expected, never a traceback further on. Files are read by `io.read_regular`
(regular files only, bounded sizes). Records gain fields over versions: the fields ticketsmith
reads are typed, others are kept as they are."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .errors import ArtifactError
from .io import read_json


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class RoundRecord(_Record):
    """round_NN/round.json: a finished round."""
    best_epoch: int
    best_val_acc: float
    test_acc: float
    final_test_acc: Optional[float] = None
    epochs: Optional[int] = None
    start_iteration: Optional[int] = None
    sparsity: float
    effective_sparsity: Optional[float] = None
    unstructured_sparsity: Optional[float] = None
    params: Optional[int] = None
    compact_params: Optional[int] = None
    train_seconds: Optional[float] = None
    seconds_per_epoch: Optional[float] = None
    layer_sparsity: Optional[dict[str, float]] = None
    channel_sparsity: Optional[dict[str, float]] = None
    channels_kept: Optional[dict[str, list[int]]] = None
    machine: Optional[dict[str, Any]] = None


class DataRecord(_Record):
    """data.json: the identity of the data a run was trained on."""
    dataset: str
    digest: str
    data_dir: str


class ChangeEvent(_Record):
    """One accepted change of a run's config (history.json)."""
    event: str


class Divergence(_Record):
    """diverged.json: where training diverged and with which learning rate."""
    round: str
    lr: float
    message: str


class BenchRow(_Record):
    batch_size: int
    speedup_median: Optional[float] = None
    speedup_min: Optional[float] = None
    speedup_max: Optional[float] = None


class LayerRow(BenchRow):
    layer: str


class BenchRecord(_Record):
    """round_NN/bench.json, written by `ticketsmith bench` on a run's round."""
    results: list[BenchRow] = []
    layers: list[LayerRow] = []
    effective_sparsity: Optional[float] = None
    ideal_speedup: Optional[float] = None
    compact: dict[str, Any] = {}


class SweepRow(_Record):
    """One setting of `ticketsmith sweep` (setting_*.json)."""
    setting: str
    param: str
    settings: dict[str, Any] = {}


class CompactSpec(_Record):
    """MODEL.json beside MODEL.safetensors, written by `ts.compact.save`."""
    kind: str
    version: int
    weights: str
    source: dict[str, Any]
    tree: list[tuple[str, str]]
    layers: dict[str, dict[str, Any]]
    executors: dict[str, Any] = {}
    compact: dict[str, Any] = {}
    float_dtypes: list[str] = []


class SearchRecord(_Record):
    """OUT/search.json of a `ts.TicketSearch`: its settings and the parameter shapes."""
    kind: str
    method: str
    rounds: int
    prune_fraction: float
    structure: str
    structure_settings: dict[str, Any] = {}
    parameters: dict[str, list[int]]


class SearchRound(_Record):
    """OUT/round_NN/round.json of a `ts.TicketSearch`: a finished round."""
    round: int
    start_step: int
    steps: int
    sparsity: float
    metrics: dict[str, Any] = {}


SCHEMAS: dict[str, TypeAdapter] = {
    "search": TypeAdapter(SearchRecord),
    "search-round": TypeAdapter(SearchRound),
    "round": TypeAdapter(RoundRecord),
    "data": TypeAdapter(DataRecord),
    "history": TypeAdapter(list[ChangeEvent]),
    "diverged": TypeAdapter(Divergence),
    "bench": TypeAdapter(BenchRecord),
    "sweep-row": TypeAdapter(SweepRow),
    "compact": TypeAdapter(CompactSpec),
}


def explain(e: ValidationError) -> str:
    """The first problem of a validation error, as 'field X: expected ..., got ...'."""
    err = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    got = err.get("input")
    shown = json.dumps(got)[:60] if isinstance(got, (str, int, float, bool, type(None))) else \
        {"list": "a list", "dict": "an object"}.get(type(got).__name__, type(got).__name__)
    if err["type"] == "missing":
        return f"field '{where}' is missing"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"field '{where}' is not one ticketsmith knows"
    what = f"{err['msg'][0].lower() + err['msg'][1:]}, got {shown}"
    return f"field '{where}': {what}" if where else f"the whole record: {what}"


def validate(adapter: TypeAdapter, data: str | bytes, source: str | os.PathLike):
    """`data` (JSON text) checked against `adapter` in strict mode (no '30' for 30)."""
    try:
        return adapter.validate_json(data, strict=True)
    except ValidationError as e:
        if any(err["type"] in ("json_invalid", "recursion_loop") for err in e.errors()):
            raise ArtifactError(f"{source}: not valid JSON (or nested too deeply)") from None
        raise ArtifactError(f"{source}: {explain(e)}") from None


def read(path: str | os.PathLike, kind: str) -> Any:
    """The record at `path` as parsed JSON (dicts and lists, as written), once it is known to
    fit `kind` (one of SCHEMAS): every field ticketsmith reads has the type it expects."""
    path = Path(path)
    obj = read_json(path)  # one error for a file that is not JSON at all (or a nesting bomb)
    validate(SCHEMAS[kind], json.dumps(obj), path)
    return obj

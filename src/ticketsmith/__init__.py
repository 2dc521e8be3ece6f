"""ticketsmith: structural lottery tickets that run faster for real.

    import ticketsmith as ts
    ds = ts.data.load("fashion-mnist")
    model = ts.models.for_dataset("resnet20", ds)
    masks = ts.Masks.ones(model)
"""
from . import compact, data, deploy, dst, models, prune, structure
from .errors import ArtifactError, DataNotFoundError, DivergenceError, TicketsmithError, UsageError
from .masks import Block, Masks, MaskHold, prunable_names
from .runs import Run, RunConfig, summarize_run
from .search import Ticket, TicketSearch
from .structure import channel_companions, channel_groups, refill, regroup
from .train import Dist, Trainer, TrainConfig, evaluate

__version__ = "0.1.0"


def __getattr__(name: str):
    """`ts.bench`, `ts.report`, `ts.sweep` on first use: they load matplotlib / timing code
    that `import ticketsmith` should not pay for; `ts.lightning` (an optional extra) too."""
    if name in ("bench", "report", "sweep", "lightning"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ticketsmith' has no attribute {name!r}")


__all__ = ["compact", "data", "deploy", "dst", "models", "prune", "structure", "refill", "regroup", "channel_groups", "channel_companions", "Masks", "MaskHold", "Block", "prunable_names", "Run",
           "RunConfig", "TicketSearch", "Ticket", "summarize_run", "Trainer", "TrainConfig", "Dist", "evaluate",
           "TicketsmithError", "UsageError", "DataNotFoundError", "ArtifactError", "DivergenceError"]

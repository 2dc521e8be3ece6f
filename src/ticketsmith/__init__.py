"""ticketsmith: structural lottery tickets that run faster for real.

    import ticketsmith as ts
    ds = ts.data.load("fashion-mnist")
    model = ts.models.for_dataset("resnet20", ds)
    masks = ts.Masks.ones(model)
"""
from . import compact, data, dst, models, prune, structure
from .errors import ArtifactError, DataNotFoundError, DivergenceError, TicketsmithError, UsageError
from .masks import Block, Masks, MaskHold, prunable_names
from .runs import Run, RunConfig, summarize_run
from .structure import channel_companions, channel_groups, refill, regroup
from .train import Dist, Trainer, TrainConfig, evaluate

__version__ = "0.1.0"

__all__ = ["compact", "data", "dst", "models", "prune", "structure", "refill", "regroup", "channel_groups", "channel_companions", "Masks", "MaskHold", "Block", "prunable_names", "Run",
           "RunConfig", "summarize_run", "Trainer", "TrainConfig", "Dist", "evaluate",
           "TicketsmithError", "UsageError", "DataNotFoundError", "ArtifactError", "DivergenceError"]

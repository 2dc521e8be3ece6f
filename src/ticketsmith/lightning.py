"""PyTorch Lightning: one `TicketSearch` round per `trainer.fit` (the optional extra
`pip install "ticketsmith[lightning]"`).

    search = ts.TicketSearch(lit_model, None, out="search", rewind=100, rounds=5)
    for rnd in search:
        trainer = L.Trainer(max_epochs=E, callbacks=[TicketSearchCallback(search)])
        trainer.fit(lit_model, train_loader, val_loader)
        rnd.finish(val_acc=float(trainer.callback_metrics["val_acc"]))

The search is created without an optimizer: Lightning makes one in every `fit`
(`configure_optimizers`), and the callback hands it to the search when training starts
(`TicketSearch.use_optimizer`), so the search counts its steps (the rewind point) and holds the
round's masks through it. Each round's optimizer is new, as `ticketsmith run` makes one.
"""
from __future__ import annotations

from typing import Any

from .errors import UsageError
from .search import TicketSearch

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise UsageError("ticketsmith.lightning needs PyTorch Lightning: "
                         "pip install \"ticketsmith[lightning]\"") from None


class TicketSearchCallback(pl.Callback):
    """Connects a `TicketSearch` to a Lightning `Trainer`: call `trainer.fit` inside
    `for rnd in search:` with this callback; the LightningModule is (or contains) `search.model`."""

    def __init__(self, search: TicketSearch):
        if not isinstance(search, TicketSearch):
            raise UsageError(f"TicketSearchCallback takes a TicketSearch, got {type(search).__name__}")
        self.search = search

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.search.round is None:
            raise UsageError("no round of the search is in progress: call trainer.fit inside "
                             "`for rnd in search:` (before rnd.finish)")
        if pl_module is not self.search.model and not any(m is self.search.model for m in pl_module.modules()):
            raise UsageError("the LightningModule being fitted is not the search's model (nor contains it)")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise UsageError(f"a ticket search trains with one optimizer; configure_optimizers gave "
                             f"{len(trainer.optimizers)}")
        self.search.use_optimizer(trainer.optimizers[0])


__all__ = ["TicketSearchCallback"]

"""The Lightning callback: a TicketSearch round per trainer.fit (skipped without Lightning)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning.pytorch")

import ticketsmith as ts  # noqa: E402
from ticketsmith.io import load_tensors  # noqa: E402
from ticketsmith.lightning import TicketSearchCallback  # noqa: E402


class LitNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_each_fit_is_a_round_with_the_masks_held_and_the_rewind_point_counted(tmp_path):
    ds = ts.data.load("digits")
    data = torch.utils.data.TensorDataset(ds.normalize(ds.train.x), ds.train.y)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = LitNet()
    search = ts.TicketSearch(model, None, out=tmp_path / "s", rounds=2, rewind=3, prune_fraction=0.5)
    for rnd in search:
        trainer = L.Trainer(max_epochs=1, callbacks=[TicketSearchCallback(search)], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", devices=1)
        trainer.fit(model, loader)
        assert search.optimizer is trainer.optimizers[0]  # Lightning's own, handed over by the callback
        if rnd.masks is not None:  # pruned weights stayed exactly zero through Lightning's steps
            params = dict(model.named_parameters())
            assert all((params[k][~rnd.masks[k]] == 0).all() for k in rnd.masks.weight_names)
            assert rnd.start_step == 3
        rnd.finish(train_loss=float(trainer.callback_metrics.get("train_loss", 0.0)))
    assert load_tensors(tmp_path / "s" / "rewind.safetensors")[1]["iteration"] == 3
    records = search.records()
    assert [r["steps"] for r in records] == [len(loader)] * 3  # every optimizer step counted
    assert records[2]["sparsity"] == pytest.approx(0.75, abs=0.01)


def test_fit_outside_a_round_is_refused(tmp_path):
    model = LitNet()
    search = ts.TicketSearch(model, None, out=tmp_path / "s", rounds=1, rewind=0)
    trainer = L.Trainer(max_epochs=1, callbacks=[TicketSearchCallback(search)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ts.UsageError, match="inside `for rnd in search:`"):
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))

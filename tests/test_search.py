"""TicketSearch: IMP rounds driven from the user's own loop, the round engine of `ticketsmith run`."""
import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith.io import load_tensors
from ticketsmith.runs import Run, RunConfig

# lenet5 on digits: 20 steps an epoch at batch 64; rewind 30% of them is step 6
QUICK = dict(model="lenet5", dataset="digits", epochs=1, batch_size=64, rounds=2, rewind="30%")


def trainer_search(cfg: RunConfig, out, **kw):
    """A TicketSearch on the zoo model of `cfg`, each round trained by the built-in Trainer."""
    ds = ts.data.load(cfg.dataset)
    torch.manual_seed(cfg.seed)
    model = ts.models.for_dataset(cfg.model, ds)
    trainer = ts.Trainer(model, ds, cfg.train_config(), progress=False)
    x, y = ds.normalize(ds.train.x[:256]), ds.train.y[:256]  # the run's structure batch
    search = ts.TicketSearch(model, trainer.optimizer, out=out, rounds=cfg.rounds, rewind=cfg.rewind,
                             steps_per_round=trainer.total_iters,
                             structure=None if cfg.structure == "none" else cfg.structure,
                             data=(x, y), example_inputs=x[:1], **kw)
    return search, trainer


@pytest.mark.parametrize("structure", ["none", "refill"])
def test_trainer_driven_search_reproduces_ticketsmith_run_round_by_round(tmp_path, structure):
    extra = {"structure": structure, "structure_every_round": True} if structure != "none" else {}
    cfg = RunConfig(**QUICK, **extra)
    Run(cfg, tmp_path / "run", progress=False).execute()
    search, trainer = trainer_search(cfg, tmp_path / "search")
    seen = []
    for rnd in search:
        result = trainer.fit(None, rnd.start_step)  # the masks are held by the search
        rnd.finish(val_acc=result.best_val_acc, test_acc=result.test_acc_at_best)
        seen.append(rnd.index)
    assert seen == [0, 1, 2]
    rewind_run, meta_run = load_tensors(tmp_path / "run" / "rewind.safetensors")
    rewind_search, meta_search = load_tensors(tmp_path / "search" / "rewind.safetensors")
    assert meta_run["iteration"] == meta_search["iteration"] == 6
    assert all(torch.equal(rewind_run[k], rewind_search[k]) for k in rewind_run)
    for r in (1, 2):
        run_masks = ts.Masks.load(tmp_path / "run" / f"round_{r:02d}" / "masks.safetensors")
        search_masks = ts.Masks.load(tmp_path / "search" / f"round_{r:02d}" / "masks.safetensors")
        assert run_masks == search_masks and run_masks.digest() == search_masks.digest(), r
        a, _ = load_tensors(tmp_path / "run" / f"round_{r:02d}" / "weights.safetensors")
        b, _ = load_tensors(tmp_path / "search" / f"round_{r:02d}" / "weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), r
        run_rec = json.loads((tmp_path / "run" / f"round_{r:02d}" / "round.json").read_text())
        rec = search.records()[r]
        assert rec["sparsity"] == run_rec["sparsity"] and rec["channels_kept"] == run_rec["channels_kept"]
        assert rec["metrics"]["val_acc"] == run_rec["best_val_acc"]
        assert rec["start_step"] == 6 and rec["steps"] == 20 - 6
    if structure == "none":
        assert search.records()[2]["sparsity"] == pytest.approx(1 - 0.8 ** 2, abs=0.01)
    ticket = search.best()
    assert ticket.round in (1, 2) and ticket.record["metrics"]["val_acc"] == max(
        r["metrics"]["val_acc"] for r in search.records()[1:])
    # a ticket loads into the architecture; its pruned weights are zero
    torch.manual_seed(5)
    fresh = ticket.load_into(ts.models.for_dataset("lenet5", ts.data.load("digits")))
    params = dict(fresh.named_parameters())
    assert all((params[k][~ticket.masks[k]] == 0).all() for k in ticket.masks.weight_names)


def tiny(seed=0, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def my_loop(model, opt, ds, epochs=1, start=0):
    """A plain user loop: no ticketsmith inside."""
    model.train()
    for epoch in range(epochs):
        for x, y in ts.data.batches(ds, ds.train, 64, train=True, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def make(tmp_path, seed=0, **kw):
    model = tiny(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    settings = dict(out=tmp_path / "s", rounds=3, rewind=5, prune_fraction=0.5)
    settings.update(kw)
    return ts.TicketSearch(model, opt, **settings)


def test_a_dropped_search_resumes_at_its_first_unfinished_round_with_identical_masks(tmp_path):
    ds = ts.data.load("digits")
    ref = make(tmp_path, out=tmp_path / "ref")
    for rnd in ref:
        my_loop(ref.model, ref.optimizer, ds)
        rnd.finish(val_acc=ts.evaluate(ref.model, ds, ds.val)[1])
    ref.close()

    cut = make(tmp_path)
    for rnd in cut:
        my_loop(cut.model, cut.optimizer, ds)
        rnd.finish(val_acc=ts.evaluate(cut.model, ds, ds.val)[1])
        if rnd.index == 1:
            break  # the loop is killed after two rounds
    del cut, rnd
    gc.collect()
    again = make(tmp_path, seed=123)  # another init: the state comes from the directory
    assert again.next_round() == 2
    it = iter(again)
    rnd = next(it)
    assert rnd.index == 2
    want = ts.Masks.load(tmp_path / "ref" / "round_02" / "masks.safetensors")
    assert rnd.masks == want
    params = dict(again.model.named_parameters())
    assert all((params[k][~want[k]] == 0).all() for k in want.weight_names)  # rewound and masked
    my_loop(again.model, again.optimizer, ds)  # killed again, mid-round: round 2 starts over
    again2 = make(tmp_path, seed=7)  # takes the directory over in this process
    with pytest.raises(ts.UsageError, match="closed"):
        next(it)
    for rnd in again2:
        assert rnd.index >= 2
        if rnd.index == 2:
            assert rnd.masks == want
        my_loop(again2.model, again2.optimizer, ds)
        rnd.finish(val_acc=ts.evaluate(again2.model, ds, ds.val)[1])
    for r in range(4):
        a, _ = load_tensors(tmp_path / "ref" / f"round_{r:02d}" / "weights.safetensors")
        b, _ = load_tensors(tmp_path / "s" / f"round_{r:02d}" / "weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), r
    assert again2.summary()["complete"]
    assert again2.records()[3]["sparsity"] == pytest.approx(1 - 0.5 ** 3, abs=0.01)
    with pytest.raises(ts.UsageError, match="other settings.*prune_fraction"):
        make(tmp_path, prune_fraction=0.3)


def test_masks_are_held_in_the_users_loop_and_the_optimizer_starts_afresh(tmp_path):
    ds = ts.data.load("digits")
    search = make(tmp_path, rounds=1)
    for rnd in search:
        my_loop(search.model, search.optimizer, ds)
        if rnd.index == 1:
            params = dict(search.model.named_parameters())
            for k in rnd.masks.weight_names:
                assert (params[k][~rnd.masks[k]] == 0).all()
                assert (search.optimizer.state[params[k]]["momentum_buffer"][~rnd.masks[k]] == 0).all()
            assert rnd.steps == 20 and rnd.start_step == 5
        else:
            search.optimizer.param_groups[0]["lr"] = 0.5  # a user's schedule, within round 0
        rnd.finish()
    assert search.optimizer.param_groups[0]["lr"] == 0.05  # reset at round 1
    assert search.records()[1]["steps"] == 20


def test_rewind_needs_a_point_round_zero_reaches(tmp_path):
    with pytest.raises(ts.UsageError, match="steps_per_round"):
        make(tmp_path, rewind="5%")
    with pytest.raises(ts.UsageError, match="not before the end"):
        make(tmp_path, rewind="100", steps_per_round=50)
    ds = ts.data.load("digits")
    search = make(tmp_path, rewind=1000)
    rnd = next(iter(search))
    my_loop(search.model, search.optimizer, ds)
    with pytest.raises(ts.UsageError, match="round 0 ended after 20 optimizer steps without a rewind point"):
        rnd.finish()
    search.close()
    manual = make(tmp_path, out=tmp_path / "m", rewind=None, rounds=1)
    for rnd in manual:
        if rnd.index == 0:
            with pytest.raises(ts.UsageError, match="without a rewind point.*capture_rewind"):
                rnd.finish()
            my_loop(manual.model, manual.optimizer, ds)
            manual.capture_rewind()
        rnd.finish()
    assert load_tensors(tmp_path / "m" / "rewind.safetensors")[1]["iteration"] == 20
    assert manual.records()[1]["start_step"] == 20


def test_a_model_whose_parameters_change_shape_is_refused_by_name(tmp_path):
    search = make(tmp_path, rounds=1)
    rnd = next(iter(search))
    search.model[3] = nn.Linear(32, 16)
    with pytest.raises(ts.UsageError, match=r"parameter '3.weight': shape \(16, 32\) now, shape \(32, 32\)"):
        rnd.finish()
    search.close()
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 10))
    with pytest.raises(ts.UsageError, match="parameter '3.weight'.*in"):
        ts.TicketSearch(other, torch.optim.SGD(other.parameters(), lr=0.1), out=tmp_path / "s", rounds=1,
                        rewind=5, prune_fraction=0.5)


def test_regroup_and_refill_settings_pass_through(tmp_path):
    ds = ts.data.load("digits")
    x = ds.normalize(ds.train.x[:8])
    search = make(tmp_path, rounds=1, structure="regroup", example_inputs=x,
                  structure_settings={"b1": 4, "b2": 4, "t1": 2})
    for rnd in search:
        my_loop(search.model, search.optimizer, ds)
        rnd.finish()
    masks = search.ticket(1).masks
    assert masks.blocks and all(len(b) >= 1 for b in masks.blocks.values())
    assert search.records()[1]["blocks"]
    with pytest.raises(ts.UsageError, match="refill has no setting 'b1'"):
        make(tmp_path, out=tmp_path / "bad", structure="refill", structure_settings={"b1": 4})
    with pytest.raises(ts.UsageError, match="ts.dst.SRigL"):
        make(tmp_path, out=tmp_path / "bad", method="srigl")


def test_another_process_cannot_use_a_search_directory_in_use(tmp_path):
    search = make(tmp_path, rounds=1)
    code = ("import torch, ticketsmith as ts\n"
            "m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),"
            " torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))\n"
            f"ts.TicketSearch(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), out={str(tmp_path / 's')!r},"
            " rounds=1, rewind=5, prune_fraction=0.5)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "in use by another ticketsmith process" in p.stderr
    search.close()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


KILLED_LOOP = '''
import os, signal, sys
import torch
from torch import nn
from torch.nn import functional as F
import ticketsmith as ts

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
ds = ts.data.load("digits")
search = ts.TicketSearch(model, opt, out=sys.argv[1], rounds=3, rewind=5, prune_fraction=0.5)
for rnd in search:
    for i, (x, y) in enumerate(ts.data.batches(ds, ds.train, 64, train=True, epoch=0)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if rnd.index == 2 and i == 7:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-round, holding the directory
    rnd.finish()
'''


def test_a_killed_process_resumes_at_its_first_unfinished_round_with_its_saved_mask(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(KILLED_LOOP)
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == -9, p.stderr
    saved = ts.Masks.load(tmp_path / "s" / "round_02" / "masks.safetensors")
    # the mask round 1's finish decided: magnitude pruning of round 1's weights under its mask
    trained = tiny()
    trained.load_state_dict(load_tensors(tmp_path / "s" / "round_01" / "weights.safetensors")[0])
    want = ts.runs.imp_step(trained, ts.Masks.load(tmp_path / "s" / "round_01" / "masks.safetensors"), 0.5)
    assert saved == want
    search = make(tmp_path, seed=99)  # the kernel dropped the dead process's lock
    assert search.next_round() == 2
    rewind, meta = load_tensors(tmp_path / "s" / "rewind.safetensors")
    ds = ts.data.load("digits")
    for rnd in search:
        if rnd.index == 2:
            assert rnd.masks == saved and rnd.start_step == meta["iteration"] == 5
            state = search.model.state_dict()  # the rewind point under the saved mask
            assert all(torch.equal(state[k], rewind[k] * saved[k] if k in saved else rewind[k]) for k in state)
        my_loop(search.model, search.optimizer, ds)
        rnd.finish()
    assert search.summary()["complete"] and [r["round"] for r in search.records()] == [0, 1, 2, 3]

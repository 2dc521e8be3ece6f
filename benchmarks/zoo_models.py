"""Real torchvision / timm models through refill channel tickets and compaction (issue 18).

Each model in its own child process (bounded memory and time: a runaway is reported as such),
random init with non-trivial BatchNorm statistics, eval mode: a refill ticket of a 50% global
magnitude mask, `ts.compact` on one example, then the compact model against the masked model on
inputs other than the example (another batch, batch 1, another spatial size where the model
takes one), a `save` / `load(build=)` round trip, parameters and MACs before / after, and the
time and peak memory of refill + compaction. Outcome per model: exact (with how many layers
were kept dense and why), refused (one clear error), crashed, wrong, out of memory / time.

torchvision does not import beside the CPU torch wheel of the project's venv: run this from a
venv with `pip install torch==2.14.1 torchvision==0.29.1 timm -e .` (see the record).

    python benchmarks/zoo_models.py [--only NAME ... --why TEXT]  -> benchmarks/results/zoo_models.{json,md}

nn.MultiheadAttention is swapped for ticketsmith's QKVAttention first (`prunable_attention`),
as `ticketsmith run --model` builds a model, so attention heads are refilled and removed.
A name ending in ":reparameterized" is the model after timm's `reparameterize_model` (its
deploy form: each block's train-time branches fused into one conv).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "zoo_models"
# A model with train-time branches (RepVGG, MobileOne, FastViT) in its deploy form: timm's
# `reparameterize_model` fuses each block's branches into one conv before the ticket is drawn
REPARAM = ":reparameterized"
MODELS = [("torchvision", n, s) for n, s in [
    ("resnet18", 96), ("resnet50", 96), ("vgg11_bn", 64), ("mobilenet_v2", 96),
    ("mobilenet_v3_small", 96), ("efficientnet_b0", 96), ("shufflenet_v2_x0_5", 96),
    ("squeezenet1_0", 96), ("densenet121", 96), ("regnet_y_400mf", 96), ("resnext50_32x4d", 96),
    ("mnasnet0_5", 96), ("efficientnet_v2_s", 96),
    ("googlenet", 96), ("convnext_tiny", 96), ("vit_b_16", 224), ("swin_t", 224),
    ("mobilenet_v3_large", 96), ("regnet_x_400mf", 96), ("wide_resnet50_2", 96),
    ("shufflenet_v2_x1_0", 96), ("mnasnet1_0", 96), ("maxvit_t", 224), ("swin_v2_t", 96),
    ("convnext_small", 96), ("inception_v3", 96), ("resnext101_32x8d", 96),
    ("lraspp_mobilenet_v3_large", 96), ("deeplabv3_mobilenet_v3_large", 96), ("fcn_resnet50", 96)]] + \
    [("timm", n, s) for n, s in [
        ("resnet18", 96), ("mobilenetv3_small_050", 96), ("tf_efficientnet_b0", 96),
        ("convnext_atto", 96), ("convnextv2_atto", 96), ("regnetx_002", 96), ("vit_tiny_patch16_224", 224),
        ("ghostnet_100", 96), ("dpn68", 96), ("mobileone_s0", 96), ("levit_128s", 224),
        ("efficientformer_l1", 224), ("efficientnet_b0", 96), ("resnext26ts", 96),
        ("regnety_002", 96), ("repvgg_a0", 96), ("cspresnet50", 96), ("inception_v3", 96),
        ("xception41", 96), ("mobilevitv2_050", 96), ("deit_tiny_patch16_224", 224),
        ("edgenext_xx_small", 96), ("poolformer_s12", 96), ("coatnet_0_rw_224", 224),
        ("maxvit_tiny_tf_224", 224), ("res2net50_26w_4s", 96), ("resnest14d", 96),
        ("selecsls42b", 96), ("lcnet_050", 96), ("mixnet_s", 96), ("fbnetv3_b", 96),
        ("hardcorenas_a", 96), ("tinynet_e", 96), ("gernet_s", 96), ("vovnet39a", 96),
        ("nfnet_l0", 96), ("resnetv2_50x1_bit", 96), ("fastvit_t8", 96), ("convmixer_768_32", 96),
        ("eva02_tiny_patch14_224", 224), ("swin_tiny_patch4_window7_224", 224), ("pvt_v2_b0", 96),
        ("twins_pcpvt_small", 96), ("crossvit_tiny_240", 96), ("xcit_nano_12_p16_224", 224),
        ("cait_xxs24_224", 224), ("tnt_s_patch16_224", 224), ("visformer_tiny", 224),
        ("swinv2_tiny_window8_256", 256), ("beit_base_patch16_224", 224), ("twins_svt_small", 96),
        ("maxvit_rmlp_nano_rw_256", 256), ("tiny_vit_5m_224", 224),
        ("nextvit_small", 96), ("gcvit_xxtiny", 224), ("hiera_tiny_224", 224),
        ("efficientvit_m0", 224), ("mvitv2_tiny", 224), ("davit_tiny", 224), ("dla34", 96),
        ("hrnet_w18_small", 96), ("halonet26t", 256), ("botnet26t_256", 256),
        ("lambda_resnet26t", 256), ("focalnet_tiny_srf", 96), ("convformer_s18", 96),
        ("caformer_s18", 96), ("mobileone_s0" + REPARAM, 96), ("repvgg_a0" + REPARAM, 96),
        ("fastvit_t8" + REPARAM, 96)]]
MEMORY_LIMIT = 8 << 30   # bytes of resident memory per child (watched; the CUDA build of torch
                         # reserves far more address space than it uses, so no RLIMIT_AS)
TIME_LIMIT = 600         # seconds per child


def build(lib: str, name: str):
    """As `ticketsmith run --model LIB:NAME` builds it (nn.MultiheadAttention swapped)."""
    import ticketsmith as ts
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    if name.endswith(REPARAM):
        from timm.utils.model import reparameterize_model
        return reparameterize_model(ts.models.build(f"{lib}:{name[:-len(REPARAM)]}", kw, num_classes=10))
    return ts.models.build(f"{lib}:{name}", kw, num_classes=10)


def _outputs(out) -> list:
    """A model's output tensors: a segmentation model returns a dict ("out", "aux")."""
    return list(out.values()) if isinstance(out, dict) else [out]


def one(lib: str, name: str, size: int) -> dict:
    """The whole check for one model (runs in the child)."""
    import tempfile
    import warnings

    import torch
    from torch import nn

    import ticketsmith as ts
    from ticketsmith.bench import count_macs
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build(lib, name).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm made non-trivial: a kept channel's statistics matter
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(1, 3, size, size)
    names = ts.prunable_names(model)
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().abs().flatten() for n in names])
    k = int(0.5 * flat.numel())
    threshold = flat.kthvalue(k).values if flat.numel() < 1 << 24 else flat.sort().values[k - 1]
    unstructured = ts.Masks({n: params[n].detach().abs() > threshold for n in names})
    rec: dict = {"lib": lib, "model": name, "input": size}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = ts.refill(model, unstructured, example_inputs=x)
        rec["refill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        small = ts.compact(model, masks, x)
        rec["compact_s"] = time.perf_counter() - t0
    rec["warnings"] = sorted({str(w.message).split(":")[0][:100] for w in caught})[:6]
    rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    masked = build(lib, name).eval()
    masked.load_state_dict(model.state_dict())
    masks.apply(masked)
    errs = {}
    others = {"batch 3": torch.randn(3, 3, size, size), "batch 1": torch.randn(1, 3, size, size)}
    if size < 224:  # fixed-size transformers (224 px and up) take only their size
        others[f"{size + 16}px"] = torch.randn(2, 3, size + 16, size + 16)
    with torch.no_grad():
        for what, xi in others.items():
            try:
                ref = masked(xi)
            except RuntimeError:  # the model itself takes no such size (DLA, HRNet at 112 px)
                rec.setdefault("sizes_the_model_refuses", []).append(what)
                continue
            errs[what] = max(float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
                             for a, b in zip(_outputs(ref), _outputs(small(xi))))
    rec["rel_err"] = errs
    rec["params"] = [sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())]
    rec["macs"] = [count_macs(model, x)[0], count_macs(small, x)[0]]
    rows = ts.compact.describe(small)
    dense = [r for r in rows if "kept dense" in r["reason"]]
    rec["kept_dense"] = len(dense)
    rec["kept_dense_reasons"] = sorted({r["reason"].split(": ", 1)[-1][:90] for r in dense})[:4]
    rec["groups_left_whole"] = len(small.ticketsmith_compact.get("skipped_groups", {}))
    with tempfile.TemporaryDirectory() as d:
        ts.compact.save(small, d)
        again = ts.compact.load(d, build=lambda: build(lib, name))
        with torch.no_grad():
            xi = others["batch 3"]
            rec["load_equal"] = all(torch.equal(a, b) for a, b in zip(_outputs(again(xi)),
                                                                      _outputs(small(xi))))
    rec["status"] = "exact" if max(errs.values()) < 1e-4 and rec["load_equal"] else "WRONG"
    return rec


def child_main(lib: str, name: str, size: int) -> None:
    from ticketsmith.errors import TicketsmithError
    try:
        rec = one(lib, name, size)
    except TicketsmithError as e:
        rec = {"lib": lib, "model": name, "status": "refused", "error": str(e).splitlines()[0][:200]}
    except Exception as e:  # noqa: BLE001 - a crash is the finding
        rec = {"lib": lib, "model": name, "status": "CRASH", "error": f"{type(e).__name__}: {str(e)[:200]}"}
    print("RESULT " + json.dumps(rec))


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) << 10 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def run_child(lib: str, name: str, size: int) -> dict:
    """One model in a child process, killed past MEMORY_LIMIT resident or TIME_LIMIT seconds."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, __file__, "--child", lib, name, str(size)], stdout=out,
                             stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        t0, why = time.monotonic(), None
        while p.poll() is None:
            if rss(p.pid) > MEMORY_LIMIT:
                why = f"out of memory (> {MEMORY_LIMIT >> 30} GiB resident)"
            elif time.monotonic() - t0 > TIME_LIMIT:
                why = f"out of time (> {TIME_LIMIT} s)"
            if why:
                p.kill()
                p.wait()
                return {"lib": lib, "model": name, "status": why}
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        line = next((ln for ln in out.read().splitlines() if ln.startswith("RESULT ")), None)
        return json.loads(line[7:]) if line else {
            "lib": lib, "model": name, "status": f"CRASH (exit {p.returncode})", "error": err.read()[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--why", default="", help="with --only: why those models are rerun (recorded)")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child[0], args.child[1], int(args.child[2]))
    import torch
    import torchvision
    results = []
    for lib, name, size in MODELS:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        rec = run_child(lib, name, size)
        rec["wall_s"] = time.perf_counter() - t0
        print(json.dumps(rec), flush=True)
        results.append(rec)
    command = "python benchmarks/zoo_models.py"
    if args.only and OUT.with_suffix(".json").exists():  # rerun of some models: the others stay
        old = json.loads(OUT.with_suffix(".json").read_text())
        before = old["results"]
        command = f"{old['command']}; then --only {' '.join(args.only)}" + (
            f" ({args.why})" if args.why else "")
        fresh = {(r["lib"], r["model"]) for r in results}
        order = [(lib, name) for lib, name, _ in MODELS]
        results = sorted([r for r in before if (r["lib"], r["model"]) not in fresh] + results,
                         key=lambda r: order.index((r["lib"], r["model"])))
    record = {"command": command,
              "torch": torch.__version__, "torchvision": torchvision.__version__,
              "threads": 1, "results": results}
    try:
        import timm
        record["timm"] = timm.__version__
    except ImportError:
        pass
    OUT.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = ["# Real torchvision / timm models: refill channel tickets (50%) and compaction", "",
             f"Command: `{record['command']}` (torch {record['torch']}, torchvision "
             f"{record['torchvision']}, timm {record.get('timm', '-')}; 1 thread per model, beside a "
             "training lane: times are upper bounds; MACs include the attention products).", "",
             "| model | status | params before -> after | MACs before -> after | max rel. err (other inputs) "
             "| layers kept dense | groups left whole | refill + compact s | peak MB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "params" in r:
            lines.append(
                f"| {r['lib']}:{r['model']} | {r['status']} | {r['params'][0]:,} -> {r['params'][1]:,} "
                f"({r['params'][1] / r['params'][0]:.2f}) | {r['macs'][0]:,} -> {r['macs'][1]:,} "
                f"({r['macs'][1] / r['macs'][0]:.2f}) | {max(r['rel_err'].values()):.1e} | {r['kept_dense']} "
                f"| {r['groups_left_whole']} | {r['refill_s'] + r['compact_s']:.0f} | {r['peak_rss_mb']:.0f} "
                f"| {'; '.join(r['kept_dense_reasons'])[:120]}"
                + (f" (the model itself takes no {', '.join(r['sizes_the_model_refuses'])})"
                   if r.get("sizes_the_model_refuses") else "") + " |")
        else:
            lines.append(f"| {r['lib']}:{r['model']} | {r['status']} | - | - | - | - | - | - | - "
                         f"| {r.get('error', '')[:160]} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

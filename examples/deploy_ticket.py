"""Deploy a ticket: compact a channel ticket of a zoo ResNet, save it (safetensors + JSON, no
pickle), load it back, and run it in the fastest runtime for batch 1 (ts.deploy times eager
PyTorch, ONNX Runtime and OpenVINO here and keeps the fastest; add "torch.compile" to the
candidates, or leave them out for every runtime installed, at the cost of a compile).

    python examples/deploy_ticket.py [--out ticket_out] [--sparsity 0.7]
"""
import argparse
from pathlib import Path

import torch

import ticketsmith as ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ticket_out")
    ap.add_argument("--sparsity", type=float, default=0.7)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ts.models.create("resnet20", 1, 10, (28, 28), width=0.5)  # ... trained ...
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    masks = ts.refill(model, ts.prune.omp(model, args.sparsity), coupling="shared", example_inputs=x[:1])
    small = ts.compact(model, masks, x)
    out = Path(args.out)
    ts.compact.save(small, out / "ticket")
    again = ts.compact.load(out / "ticket")
    fast = ts.deploy(again, x, "auto", batch_size=1, threads=1, out=out / "deployed",
                     candidates=("torch", "onnxruntime", "openvino"))
    other = torch.randn(3, 1, 28, 28)
    masked = ts.models.create("resnet20", 1, 10, (28, 28), width=0.5)
    masked.load_state_dict(model.state_dict())
    masks.apply(masked)
    masked.eval()
    with torch.no_grad():
        ref = masked(other)
    got = fast(other)
    eff = ts.compact.effective(model, masks, x)
    times = ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in fast.why.items() if isinstance(v, dict) and "median_ms" in v)
    print(f"ticket: {eff['compact_params']:,} of {eff['params']:,} parameters "
          f"(effective sparsity {eff['effective_sparsity']:.0%}); runs in {fast.runtime} ({times}); "
          f"vs the masked model on new inputs: max difference {(got - ref).abs().max().item():.2e}")
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    main()

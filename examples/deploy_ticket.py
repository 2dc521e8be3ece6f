"""Deploy a ticket: compact a channel ticket of a zoo ResNet, save it (safetensors + JSON, no
pickle), load it back, export it to ONNX and run it under ONNX Runtime.

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
    onnx = ts.compact.export_onnx(again, x, out / "ticket.onnx")
    other = torch.randn(3, 1, 28, 28)
    masked = ts.models.create("resnet20", 1, 10, (28, 28), width=0.5)
    masked.load_state_dict(model.state_dict())
    masks.apply(masked)
    masked.eval()
    with torch.no_grad():
        ref = masked(other)
    got = ts.compact.run_onnx(onnx, other)[0]
    eff = ts.compact.effective(model, masks, x)
    print(f"ticket: {eff['compact_params']:,} of {eff['params']:,} parameters "
          f"(effective sparsity {eff['effective_sparsity']:.0%}); ONNX Runtime vs masked model on new "
          f"inputs: max difference {(got - ref).abs().max().item():.2e}")
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    main()

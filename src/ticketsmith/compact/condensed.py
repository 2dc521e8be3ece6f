"""The condensed linear layer of SRigL (constant fan-in): every active output neuron keeps the
same number k of inputs, so the weight is stored as values [active, k] and input indices
[active, k], and y[:, a] = bias[a] + sum_j values[a, j] * x[:, indices[a, j]].

Which CPU kernel is fastest depends on the batch (docs/BENCHMARKS.md and
benchmarks/results/condensed_linear.md): a CSR product with int32 indices at small batch
(memory-bound: it reads a tenth of the dense weight), `F.embedding_bag` with per-sample weights
at large batch (each output neuron is a weighted bag of input columns). Both are candidates of
one module, with the folded dense layer and the naive gather.

Both condensed kernels work on the transposed input x^T [in, N] and produce y^T [active, N]. A
layer whose output goes, through elementwise operations only (ReLU, GELU, dropout), to another
condensed layer hands it over in that layout (`transposed_out`, set by `ts.compact` through
`CondensedLinear.link`): it returns the transpose of a contiguous [out, N] tensor, which elementwise
operations keep, and which the next layer reads as its x^T without a copy. In an nn.Sequential
such a run of layers goes tile by tile through all of them (`CondensedSequential`). Profiled on a
4-layer MLP of 768 <-> 3072 layers at 90% and batch 256 (benchmarks/condensed_mlp.py, beside
another job), the two transposing copies per layer took ~15% of the time and the bias add and ReLU
on the transposed result another ~20%; the hand-off ran ~1.3x faster, the tiled run ~1.14x more.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError
from .absorb import _ELEMENTWISE, _Graph, _elementwise, _only_first_is_node
from .blocks import Executor, _check_config, _mkldnn_ok

__all__ = ["CondensedLinear", "CondensedSequential", "constant_fan_in"]

# Batch size from which embedding_bag is the default over the int32 CSR product: measured on
# 3072->768 and 768->3072 at 90% sparsity (benchmarks/results/condensed_linear.md), CSR was ~10%
# faster at batch 16, embedding_bag 1.5-2.5x faster at batch 32; the crossover lies between.
EMBEDDING_BAG_FROM_BATCH = 24
# Density above which the folded dense layer is the default.
DENSE_ABOVE_DENSITY = 0.2
# Smallest dense weight (in x out entries) whose condensed form beats the dense layer: 3072x768
# (2.4M) ran 1.4-2x faster condensed at 90%, while MLP-300-100's 784x300 (235k) at 90-99% ran
# 0.74-0.98x at 2 threads (results/runs/mlp-srigl-*/round_00/bench.md): a dense product that
# small takes ~0.1 ms, less than the condensed kernels' fixed cost.
CONDENSED_MIN_WEIGHTS = 1 << 20
# Batch tile of the embedding_bag kernel, and the most bytes of x^T one call may read from
# (see `CondensedLinear._embedding_bag`).
BAG_TILE = 64
L2_TILE_BYTES = 1536 * 1024


def constant_fan_in(mask: torch.Tensor) -> int | None:
    """The fan-in k shared by every nonzero row of a 2-D mask (0 if all rows are empty), or
    None if the nonzero rows keep different numbers of inputs."""
    counts = mask.reshape(mask.shape[0], -1).count_nonzero(dim=1)
    nz = counts[counts > 0]
    if nz.numel() == 0:
        return 0
    k = int(nz[0])
    return k if bool((nz == k).all()) else None


class CondensedLinear(Executor):
    """A Linear layer with a constant fan-in mask, stored condensed (values and indices per
    active neuron). Rows with no kept input (ablated neurons) output their bias only.

    Kernels: "csr" (int32-index CSR times the input), "embedding_bag" (weighted bags of input
    columns), "gather" (index, multiply, sum), "dense" (F.linear with the folded weight) and,
    on CPU with float32, "dense-mkldnn" (oneDNN linear). ONNX export writes the folded dense layer
    (onnxruntime has no sparse product), or the gather form when "gather" is in use.

    `transposed_out`: the condensed kernels return their output as the transpose of a contiguous
    [out, N] tensor (strides (1, N)), the layout in which the next condensed layer reads its
    input without a copy; set by `link` only where the output goes to such a layer.
    """

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor,
                 indices: torch.Tensor, active_rows: torch.Tensor, bias: torch.Tensor | None,
                 name: str | None = None):
        super().__init__(name)
        self.in_features, self.out_features = int(in_features), int(out_features)
        if values.dim() != 2 or tuple(indices.shape) != tuple(values.shape) \
                or tuple(active_rows.shape) != (values.shape[0],):
            raise UsageError(f"{self._where()}: values {tuple(values.shape)}, indices "
                             f"{tuple(indices.shape)} and active rows {tuple(active_rows.shape)} "
                             "do not fit together")
        self.fan_in = int(values.shape[1])
        self.register_parameter("values", nn.Parameter(values.detach().clone(), requires_grad=False))
        self.register_buffer("indices", indices.detach().to(torch.int64).clone())
        self.register_buffer("active_rows", active_rows.detach().to(torch.int64).clone())
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().clone(), requires_grad=False))
        # batch tile of the embedding_bag kernel: 64 rows measured best for 3072 and for 768
        # inputs (1.2-1.6x faster than one call over batch 256); fewer where the x^T tile
        # would not fit in L2_TILE_BYTES
        fit = L2_TILE_BYTES // (4 * max(1, self.in_features))
        self.bag_tile = min(BAG_TILE, max(16, 1 << max(0, fit.bit_length() - 1)))
        a = int(active_rows.numel())
        self.n_active = a
        # every row active, in order: the kernels' output is the layer's output
        self._all_rows = a == self.out_features and bool(
            (active_rows.cpu() == torch.arange(a)).all())
        self.transposed_out = False
        self.executor = self._default(1)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, name: str | None = None
                    ) -> "CondensedLinear":
        """The condensed form of `linear` with its weight restricted to `mask` (True = kept),
        which must keep the same number of inputs in every nonzero row."""
        where = f"CondensedLinear({name})" if name else "CondensedLinear"
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"{where}: expected an nn.Linear, got {type(linear).__name__}")
        if not isinstance(mask, torch.Tensor):
            raise UsageError(f"{where}: mask must be a tensor, got {type(mask).__name__}")
        w = linear.weight.detach().to("cpu")
        if tuple(mask.shape) != tuple(w.shape):
            raise UsageError(f"{where}: mask has shape {tuple(mask.shape)}, the weight has shape "
                             f"{tuple(w.shape)}")
        mask = mask.detach().to("cpu")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise UsageError(f"{where}: mask is not binary (values other than 0 and 1)")
            mask = mask != 0
        k = constant_fan_in(mask)
        if k is None:
            counts = mask.sum(1)
            nz = counts[counts > 0]
            raise UsageError(f"{where}: mask does not have a constant fan-in: its nonzero rows keep "
                             f"between {int(nz.min())} and {int(nz.max())} inputs; a condensed "
                             "layer needs the same number in every active row")
        active = mask.any(dim=1).nonzero().flatten()
        if k == 0:
            indices = torch.zeros(0, 0, dtype=torch.int64)
        else:
            # nonzero() lists positions row by row in increasing column order
            indices = mask[active].nonzero()[:, 1].reshape(active.numel(), k)
        values = torch.gather(w[active], 1, indices) if k else torch.zeros(0, 0, dtype=w.dtype)
        mod = cls(w.shape[1], w.shape[0], values, indices, active,
                  None if linear.bias is None else linear.bias.detach().to("cpu"), name)
        return mod.to(linear.weight.device)

    @classmethod
    def link(cls, model: nn.Module) -> dict[str, str]:
        """Set `transposed_out` on each condensed layer of `model` whose output goes, through
        elementwise operations only (one reader each), to one condensed layer and nowhere else;
        clear it on the others; then `chain` the nn.Sequentials. Returns {producer: consumer}
        by layer name. The graph is traced with torch.fx (executors as leaves); a model it cannot
        trace keeps the plain layout, which is always correct: the hand-off only saves copies."""
        layers = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
        links: dict[str, str] = {}
        try:
            g = _Graph(model) if len(layers) > 1 else None
        except Exception:  # noqa: BLE001 - any tracing failure: the plain layout stays
            g = None
        for node in g.graph.nodes if g is not None else ():
            # a layer called twice could hand one of its outputs to something else
            if node.op != "call_module" or node.target not in layers or g.calls[node.target] != 1:
                continue
            cur = node
            while len(cur.users) == 1:
                user = next(iter(cur.users))
                if not (_only_first_is_node(user) and user.args[0] is cur):
                    break
                if user.op == "call_module" and user.target in layers:
                    links[node.target] = user.target
                    break
                if not _elementwise(g, user):  # elementwise ops keep the strides they are given
                    break
                cur = user
        for name, m in layers.items():
            m.transposed_out = name in links
        cls.chain(model)
        return links

    @classmethod
    def chain(cls, model: nn.Module) -> list[str]:
        """Make each nn.Sequential of `model` holding a run of condensed layers that hand over
        to one another (`transposed_out`; elementwise modules between) a `CondensedSequential`
        (the same children, run tile by tile), and a chained one without such a run a plain
        nn.Sequential again. Returns the names of the chained containers. The flags are
        saved with the layers, so `ts.compact.load` rebuilds the chains with this."""
        from . import _set_module

        chained = []
        for name, seq in list(model.named_modules()):
            if type(seq) not in (nn.Sequential, CondensedSequential):
                continue
            runs = _runs(list(seq))
            want = CondensedSequential if runs else nn.Sequential
            if type(seq) is not want:
                if name:
                    new = want(OrderedDict(seq.named_children()))
                    _set_module(model, name, new)
                    seq = new
                else:  # the model itself cannot be replaced in place; its class can
                    seq.__class__ = want
            if runs:
                seq.runs = runs
                chained.append(name)
        return chained

    # -- kernels -----------------------------------------------------------------------------
    def _kernels(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        if self.n_active == 0:
            return {"dense": self._run(self._dense)}
        k = {"csr": self._run(self._csr, condensed=True),
             "embedding_bag": self._run(self._embedding_bag, condensed=True),
             "gather": self._run(self._gather, condensed=True),
             "dense": self._run(self._dense)}
        if _mkldnn_ok(self.values):
            k["dense-mkldnn"] = self._run(self._dense_mkldnn)
        return k

    def _default(self, batch_size: int) -> str:
        """CSR below EMBEDDING_BAG_FROM_BATCH rows of input, embedding_bag from there on (both
        measured against the dense paths at 10% density); the folded dense layer when the
        weight keeps more than DENSE_ABOVE_DENSITY of its entries (768->3072: CSR broke even with
        oneDNN at about 25% density at batch 1, embedding_bag at about 18% at batch 256). Layers
        under CONDENSED_MIN_WEIGHTS stay dense whatever their density."""
        if self.n_active == 0:
            return "dense"
        small = self.out_features * self.in_features < CONDENSED_MIN_WEIGHTS
        if small or self.n_active * self.fan_in > DENSE_ABOVE_DENSITY * self.out_features * self.in_features:
            return "dense-mkldnn" if batch_size >= 32 and "dense-mkldnn" in self._kernels() else "dense"
        return "csr" if batch_size < EMBEDDING_BAG_FROM_BATCH else "embedding_bag"

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], condensed: bool = False
             ) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 2:
                return self._place(fn(x), x) if condensed else fn(x)
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features)
            y = self._place(fn(x2), x2) if condensed else fn(x2)
            return y.reshape(lead + (self.out_features,))
        if fn == self._csr:
            def run_csr(x: torch.Tensor) -> torch.Tensor:
                # one input row, every row active: one sparse addmv gives the whole output
                # (a module overhead of a few microseconds matters next to a ~40 us product)
                if x.dim() == 2 and x.shape[0] == 1 and self._all_rows and self.bias is not None:
                    return torch.addmv(self.bias, self._csr_weight(), x[0]).unsqueeze(0)
                return run(x)
            return run_csr
        return run

    def _place(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Active neurons' sums [N, active] (a fresh tensor, usually the transpose of a
        contiguous [active, N] one) -> the layer's output [N, out] with the bias, contiguous, or
        with `transposed_out` the transpose of a contiguous [out, N] tensor."""
        if self.transposed_out:
            yt = y.t()
            return self._place_t(yt if yt.is_contiguous() else yt.contiguous()).t()
        n = y.shape[0]
        if self._all_rows:
            if self.bias is None:
                return y.contiguous()
            out = x.new_empty((n, self.out_features))
            return torch.add(y, self.bias, out=out)  # also makes a transposed y contiguous
        if self.bias is None:
            out = x.new_zeros((n, self.out_features))
        else:
            out = self.bias.unsqueeze(0).expand(n, self.out_features).clone(
                memory_format=torch.contiguous_format)  # a copy: index_add_ writes into it
        return out.index_add_(1, self.active_rows, y)

    def _place_t(self, yt: torch.Tensor) -> torch.Tensor:
        """Transposed sums [active, N] (fresh, contiguous: the bias is added in place) -> the
        transposed output [out, N], contiguous."""
        if self._all_rows:
            return yt if self.bias is None else yt.add_(self.bias.unsqueeze(1))
        n = yt.shape[1]
        out = (yt.new_zeros((self.out_features, n)) if self.bias is None else
               self.bias.unsqueeze(1).expand(self.out_features, n).clone(
                   memory_format=torch.contiguous_format))
        return out.index_add_(0, self.active_rows, yt)

    def _forward_t(self, xt: torch.Tensor) -> torch.Tensor:
        """The layer on a transposed input tile [in, T] (contiguous) -> [out, T]: the
        embedding_bag kernel without any transposition (`CondensedSequential`)."""
        return self._place_t(F.embedding_bag(self.indices, xt, per_sample_weights=self.values,
                                             mode="sum"))

    def dense_weight(self) -> torch.Tensor:
        """The folded dense weight [out_features, in_features]."""
        def build():
            w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype,
                            device=self.values.device)
            if self.n_active:
                w[self.active_rows.unsqueeze(1), self.indices] = self.values.detach()
            return w
        return self._cached("dense", build)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def _dense_mkldnn(self, x: torch.Tensor) -> torch.Tensor:
        w = self._cached("mkldnn", lambda: self.dense_weight().to_mkldnn())
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, self.bias, "none", [], "")

    def _csr_weight(self) -> torch.Tensor:
        def build():
            a, k = self.values.shape
            dev = self.values.device
            crow = torch.arange(0, a * k + 1, k, dtype=torch.int32, device=dev)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                return torch.sparse_csr_tensor(crow, self.indices.to(torch.int32).flatten(),
                                               self.values.detach().flatten(),
                                               (a, self.in_features))
        return self._cached("csr", build)

    def _csr(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # sparse matrix-vector product: 2-3x faster than the [I, 1] matmul
            return torch.mv(self._csr_weight(), x[0]).unsqueeze(0)
        return (self._csr_weight() @ x.t()).t()

    def _embedding_bag(self, x: torch.Tensor) -> torch.Tensor:
        # Each active neuron is a bag of rows of x^T weighted by its values. The batch is cut into
        # tiles so that the x^T tile the bags read from stays in the core's L2 cache. An input
        # handed over transposed (x^T contiguous) needs no transposing copy: its tiles are plain
        # strided copies (embedding_bag needs a contiguous table).
        n, tile = x.shape[0], self.bag_tile
        if n <= tile:
            return F.embedding_bag(self.indices, x.t().contiguous(), per_sample_weights=self.values,
                                   mode="sum").t()
        out = x.new_empty((self.n_active, n))
        for i in range(0, n, tile):
            out[:, i:i + tile] = F.embedding_bag(self.indices, x[i:i + tile].t().contiguous(),
                                                 per_sample_weights=self.values, mode="sum")
        return out.t()

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._cached("flat", lambda: self.indices.flatten())
        g = x.index_select(1, flat).view(x.shape[0], self.n_active, self.fan_in)
        return (g * self.values).sum(-1)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        # ONNX has no sparse product: measured under onnxruntime (3072->768, 90%), the gathered
        # form ran 10x (batch 1) to 20x (batch 256) slower than the dense MatMul, so the export
        # is dense unless the gather kernel was chosen explicitly (a file 3-4x smaller).
        if self.executor != "gather" or self.n_active == 0:
            y = self._dense(x)
        else:
            y = self._gather(x)
            if not self._all_rows:  # scatter as a gather: inactive rows read a zero column
                pos = torch.full((self.out_features,), self.n_active, dtype=torch.int64)
                pos[self.active_rows.cpu()] = torch.arange(self.n_active)
                y = torch.cat([y, torch.zeros_like(y[:, :1])], 1).index_select(1, pos.to(y.device))
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(lead + (self.out_features,))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(f"{self._where()}: expected an input [..., {self.in_features}], got {shape}")

    def macs_per_sample(self) -> int:
        """Multiply-adds per input row (active neurons x fan-in)."""
        return self.n_active * self.fan_in

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fan_in={self.fan_in}, active={self.n_active}, executor={self.executor!r}"
                + (", transposed_out=True" if self.transposed_out else ""))

    # -- save / load -------------------------------------------------------------------------
    def to_config(self) -> dict:
        """JSON-able description; with `tensors()` it rebuilds the module (`from_config`)."""
        return {"kind": "CondensedLinear", "in_features": self.in_features,
                "out_features": self.out_features, "fan_in": self.fan_in,
                "active": self.n_active, "bias": self.bias is not None,
                "executor": self.executor, "name": self.layer_name,
                "transposed_out": self.transposed_out}

    def tensors(self) -> dict[str, torch.Tensor]:
        """values [active, k], indices [active, k], active_rows [active] and bias, by name."""
        t = {"values": self.values.detach(), "indices": self.indices,
             "active_rows": self.active_rows}
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "CondensedLinear":
        """Rebuild a module saved with `to_config()` and `tensors()`."""
        need = ["values", "indices", "active_rows"]
        _check_config(cls, config, tensors, need + (["bias"] if config.get("bias") else []))
        try:
            mod = cls(int(config["in_features"]), int(config["out_features"]), tensors["values"],
                      tensors["indices"], tensors["active_rows"],
                      tensors.get("bias") if config.get("bias") else None, config.get("name"))
        except KeyError as e:
            raise UsageError(f"CondensedLinear.from_config: config lacks {e}") from None
        if mod.fan_in != int(config.get("fan_in", mod.fan_in)):
            raise UsageError(f"CondensedLinear.from_config: tensors have fan-in {mod.fan_in}, "
                             f"the config says {config['fan_in']}")
        idx = mod.indices
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= mod.in_features):
            raise UsageError("CondensedLinear.from_config: indices out of range")
        rows = mod.active_rows
        # a negative or repeated row would index another neuron: another function, silently
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= mod.out_features
                             or rows.unique().numel() != rows.numel()):
            raise UsageError(f"CondensedLinear.from_config: active rows must be distinct and in "
                             f"[0, {mod.out_features}), got {rows.tolist()[:8]}")
        transposed = config.get("transposed_out", False)
        if not isinstance(transposed, bool):
            raise UsageError("CondensedLinear.from_config: transposed_out must be true or false, "
                             f"got {transposed!r}")
        mod.transposed_out = transposed
        mod.use(config.get("executor", mod.executor))
        return mod


def _runs(children: list[nn.Module]) -> list[tuple[int, int]]:
    """[start, stop) positions of the runs of `children` that chain: a condensed layer handing
    over (`transposed_out`), elementwise modules, the next condensed layer, and so on."""
    runs, i = [], 0
    while i < len(children):
        last = i
        while isinstance(children[last], CondensedLinear) and children[last].transposed_out:
            j = last + 1
            while j < len(children) and type(children[j]) in _ELEMENTWISE:
                j += 1
            if j == len(children) or not isinstance(children[j], CondensedLinear):
                break
            last = j
        if last > i:
            runs.append((i, last + 1))
        i = last + 1
    return runs


class CondensedSequential(nn.Sequential):
    """An nn.Sequential (the same children under the same names) whose runs of condensed
    layers that hand over to one another (`runs`: [start, stop) positions) go tile by tile when
    every layer of the run uses the embedding_bag kernel: each 64-column tile of x^T passes
    through the whole run (bias and elementwise modules applied to the tile) before the next,
    so nothing is transposed between layers and a tile's intermediates stay in cache. Built by
    `CondensedLinear.chain`; on a 4-layer 768 <-> 3072 MLP at 90%, batch 256, it ran ~1.14x
    faster than the layers handing over one by one (benchmarks/condensed_mlp.py, a quick run on
    a shared machine).
    Elsewhere (another kernel, ONNX export, autograd, fx tracing, inputs that are not 2-D,
    forward hooks on the run's modules) it runs its children one by one like an nn.Sequential."""

    runs: list[tuple[int, int]] = []

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or torch.onnx.is_in_onnx_export():
            return super().forward(x)  # also what torch.fx traces: the children, one by one
        children = list(self)
        done = 0
        for start, stop in self.runs:
            for m in children[done:start]:
                x = m(x)
            x = _tiled(children[start:stop], x)
            done = stop
        for m in children[done:]:
            x = m(x)
        return x

    def extra_repr(self) -> str:
        return f"runs={self.runs}"


def _hooked(m: nn.Module) -> bool:
    g = nn.modules.module
    return bool(m._forward_hooks or m._forward_pre_hooks or g._global_forward_hooks
                or g._global_forward_pre_hooks)


def _tiled(run: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    layers = [m for m in run if isinstance(m, CondensedLinear)]
    if (x.dim() != 2 or any(m.executor != "embedding_bag" for m in layers)
            or any(not isinstance(m, CondensedLinear) and type(m) not in _ELEMENTWISE or _hooked(m)
                   for m in run)
            or torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for m in run for p in m.parameters()))):
        # another kernel, a child replaced since the chain was built, forward hooks (they must
        # see each layer's input and output) or autograd (the layers' own rule): one by one
        for m in run:
            x = m(x)
        return x
    layers[0]._check_input(x)
    n, tile, last = x.shape[0], min(m.bag_tile for m in layers), layers[-1]
    # the run's output in the layout its last layer hands over in
    out = x.new_empty((last.out_features, n) if last.transposed_out else (n, last.out_features))
    for i in range(0, n, tile):
        h = x[i:i + tile].t().contiguous()
        for m in run:
            h = m._forward_t(h) if isinstance(m, CondensedLinear) else m(h)
        if last.transposed_out:
            out[:, i:i + tile] = h
        else:
            out[i:i + tile] = h.t()
    return out.t() if last.transposed_out else out

"""The `ticketsmith` command: parse arguments, call the library, print.

Usage errors (unknown names, values out of range, missing data, a run directory made by another
config) print one line and exit with status 2; a corrupt file or a diverged training exits
with status 1, also without a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import typing
from pathlib import Path

from .errors import DivergenceError, TicketsmithError, UsageError

PROG = "ticketsmith"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field: --field-name, typed by the field's default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kw = {"help": f.metadata.get("help", ""), "dest": f.name, "default": f.default}
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if type(None) in typing.get_args(hint) and len(args) == 1:  # "X | None": a default decided later
            hint = args[0]
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kw["type"] = _floats
            kw["metavar"] = "X[,Y...]"
        else:
            kw["type"] = {int: int, float: float}.get(hint, str)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
                kw["metavar"] = f.name.upper()
                kw["help"] += f"; one of: {', '.join(f.metadata['choices'])}"
        if "default" in kw and kw.get("action") is None and f.default is not None:
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            kw["help"] += f" (default: {str(default).replace('%', '%%')})"
        parser.add_argument(flag, **kw)


def default_out(cfg) -> Path:
    identity = cfg.identity()
    if not identity.get("model_kwargs"):  # the name runs had before the field existed: they resume
        identity.pop("model_kwargs", None)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    model = cfg.model.replace(":", "-").replace("/", "-")  # a builder path, as a folder name
    return Path("runs") / f"{model}_{cfg.dataset}_{cfg.method}_{digest}"


def cmd_run(args) -> int:
    from .runs import Run, RunConfig, format_summary
    from .train import Dist
    cfg = RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)})
    cfg.validate()  # before joining a process group: bad input fails fast on every rank
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here (torch "
                             f"{torch.__version__}); use --device cpu or auto")
    out = Path(args.out) if args.out else default_out(cfg)
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    if args.progress:
        import torch
        print(f"{PROG} run: {torch.get_num_threads()} CPU thread(s), OpenMP waiting "
              f"{os.environ.get('OMP_WAIT_POLICY', 'default').lower()}", file=sys.stderr)
    dist = Dist.from_env(None if args.backend == "auto" else args.backend, args.device)
    if dist.device.startswith("cuda"):
        import torch
        # every batch has the same shape: let cuDNN time its conv algorithms once and keep the
        # fastest (runs on a GPU are reported apart; bit-reproducibility is not promised there)
        torch.backends.cudnn.benchmark = True
    try:
        summary = Run(cfg, out, data_dir=args.data_dir, progress=args.progress, dist=dist).execute()
    finally:
        if dist.world_size > 1:
            import torch.distributed as tdist
            tdist.destroy_process_group()
    if dist.is_main:
        print(format_summary(summary))
        print(f"run directory: {out}")
    return 0


def cmd_summary(args) -> int:
    from .runs import format_summary, summarize_run
    for d in args.run_dirs:
        summary = summarize_run(d)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"expected positive integers, got {text!r}")
    return vals


def _runtimes(text: str) -> list[str] | None:
    from .deploy import RUNTIMES, available
    if text == "all":
        return None
    names = [{"ort": "onnxruntime"}.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    for n in names:
        if n not in RUNTIMES:
            raise UsageError(f"--runtimes: unknown runtime {n!r}; choose from {', '.join(RUNTIMES)}")
        reason = available(n)
        if reason:
            raise UsageError(reason)
    if not names:
        raise UsageError("--runtimes: give at least one runtime")
    return names


def cmd_bench(args) -> int:
    import torch

    from . import bench, models
    from .io import write_json
    from .masks import Masks
    kw = dict(batch_sizes=_ints(args.batch_sizes), threads=_ints(args.threads) if args.threads else None,
              pairs=args.pairs, layerwise=args.layerwise, autotune=args.autotune,
              runtimes=_runtimes(args.runtimes),
              progress=lambda msg: print(f"  timing {msg}", file=sys.stderr))
    if args.pairs < 3:
        raise UsageError(f"--pairs must be at least 3, got {args.pairs}")
    jobs = []  # (label, dense, ticket, masks, input shape, output folder)
    if args.run_dir:
        from .runs import Run, RunConfig, round_dir
        run_dir = Path(args.run_dir)
        if not (run_dir / "config.json").exists():
            raise UsageError(f"{run_dir} is not a ticketsmith run directory (no config.json)")
        run = Run(RunConfig.read(run_dir), run_dir,
                  data_dir=args.data_dir, progress=False)
        done = sorted(int(p.parent.name[6:]) for p in run_dir.glob("round_*/round.json")
                      if p.parent.name[6:].isdigit())
        rounds = _ints(args.rounds) if args.rounds else [r for r in done if
                                                         (round_dir(run_dir, r) / "masks.safetensors").exists()]
        if not rounds:
            raise UsageError(f"{run_dir}: no finished sparse round to bench")
        dense = run.new_model()
        kw["original"] = run.original_model()  # the user's modules may be the faster baseline
        if (round_dir(run_dir, 0) / "weights.safetensors").exists() and run.cfg.method not in ("srigl", "rigl", "set"):
            dense = run.trained(round_dir(run_dir, 0))
        shape = (run.ds.in_channels, *run.ds.image_size)
        for r in rounds:
            d = round_dir(run_dir, r)
            if r not in done or not (d / "masks.safetensors").exists():
                raise UsageError(f"{run_dir}: round {r} is not a finished sparse round (finished: {done})")
            jobs.append((f"{run_dir.name} round {r}", dense, run.trained(d), Masks.load(d / "masks.safetensors"),
                         shape, d))
    else:
        if not (args.model and args.masks and args.input_shape):
            raise UsageError("give a RUN_DIR, or --model, --masks and --input-shape")
        shape = tuple(_ints(args.input_shape))
        if len(shape) != 3:
            raise UsageError(f"--input-shape is C,H,W of one input (3 numbers), got {args.input_shape!r}")
        if args.num_classes < 1:
            raise UsageError(f"--num-classes must be at least 1, got {args.num_classes}")
        if not Path(args.masks).is_file():
            raise UsageError(f"--masks {args.masks}: no such file")
        masks = Masks.load(args.masks)
        torch.manual_seed(0)
        model = models.create(args.model, shape[0], args.num_classes, tuple(shape[1:]), args.width)
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *shape))
        except RuntimeError as e:
            raise UsageError(f"--model {args.model} does not take inputs of shape {shape} "
                             f"({str(e).splitlines()[0][:120]})") from None
        masks.check(model)
        jobs.append((f"{args.model} with {args.masks}", model, model, masks, shape,
                     Path(args.out) if args.out else Path(args.masks).parent))
    for label, dense, ticket, masks, shape, folder in jobs:
        print(f"bench {label}: sparsity {masks.sparsity():.2%}", file=sys.stderr)
        result = bench.bench_ticket(dense, ticket, masks, shape, **kw)
        result["label"] = label
        write_json(folder / "bench.json", result)
        from .io import write_text
        write_text(folder / "bench.md", bench.to_markdown(result, f"Bench: {label}"))
        for r in result["results"]:
            print(f"{label}: {r['backend']} batch {r['batch_size']} threads {r['threads']}: "
                  f"{r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}), "
                  f"ideal {result['ideal_speedup']:.2f}x, time saving {r['time_saving']:.1%}")
        print(f"written: {folder / 'bench.json'}, {folder / 'bench.md'}")
    return 0


def cmd_export(args) -> int:
    import torch

    from . import compact as tscompact
    from .deploy import deploy
    from .io import write_json
    from .masks import Masks
    from .runs import Run, RunConfig, round_dir
    runtime = {"ort": "onnxruntime"}.get(args.runtime, args.runtime)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if args.precision == "int8" and args.calibration_size < 1:
        raise UsageError(f"--calibration-size must be at least 1, got {args.calibration_size}")
    if runtime != "auto":
        from .deploy import available, check_precision
        reason = available(runtime)
        if reason:
            raise UsageError(reason)
        check_precision(runtime, args.precision)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").exists():
        raise UsageError(f"{run_dir} is not a ticketsmith run directory (no config.json)")
    run = Run(RunConfig.read(run_dir), run_dir,
              data_dir=args.data_dir, progress=False)
    d = round_dir(run_dir, args.round)
    if not (d / "round.json").exists() or not (d / "masks.safetensors").exists():
        raise UsageError(f"{run_dir}: round {args.round} is not a finished sparse round")
    masks = Masks.load(d / "masks.safetensors")
    ticket = run.trained(d)
    shape = (run.ds.in_channels, *run.ds.image_size)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    small = tscompact.compact(ticket, masks, example)
    calibration = None
    if args.precision == "int8":  # real training images, normalized as training does
        from .deploy import calibration_images
        calibration = calibration_images(run.ds, args.calibration_size)
    dep = deploy(small, example, runtime, threads=args.threads, batch_size=args.batch_size, out=out,
                 precision=args.precision, calibration=calibration)
    if dep.runtime in ("torch", "torch.compile"):
        tscompact.save(small, out / "ticket")  # eager / compiled: the compact model is the artifact
        artifact = out / "ticket"
    else:
        artifact = dep.artifact
    record = {"run": str(run_dir), "round": args.round, "runtime": dep.runtime, "threads": dep.threads,
              "batch_size": args.batch_size, "artifact": str(artifact), "details": dep.details,
              "why": dep.why, "check_rel_err": dep.check_rel_err, "input_shape": list(shape),
              "precision": dep.precision}
    if dep.precision != "fp32":  # what the lower precision costs in accuracy, next to what it gains
        from .deploy import precision_cost
        record.update(precision_cost(dep, small, example, run.ds, batch_size=args.batch_size,
                                     threads=args.threads))
    from .bench import machine
    record["machine"] = machine()
    write_json(out / "deploy.json", record)
    print(f"export: {dep.runtime} {dep.precision} artifact {artifact} (checked against the masked ticket: "
          f"max deviation {dep.check_rel_err:.1e} of the output scale); record {out / 'deploy.json'}")
    if dep.precision != "fp32":
        acc, speed = record["accuracy"], record["speed"]
        print(f"export: {run.ds.name} {acc['split']} accuracy ({acc['examples']} examples): fp32 "
              f"{100 * acc['fp32']:.2f}%, {dep.precision} {100 * acc[dep.precision]:.2f}% "
              f"(drop {acc['drop_points']:.2f} points); batch {speed['batch_size']}: fp32 "
              f"{speed['fp32_ms']:.3g} ms, {dep.precision} {speed[dep.precision + '_ms']:.3g} ms "
              f"({speed['speedup']:.2f}x, median of {speed['pairs']} paired ratios)")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import parse_values, sweep
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    values = parse_values(args.vary)
    rows = sweep(args.run_dir, args.round, values, args.out, epochs=args.epochs,
                 granularity=args.granularity, batch_size=args.batch_size, pairs=args.pairs,
                 data_dir=args.data_dir, progress=args.progress, runtimes=_runtimes(args.runtimes),
                 log=lambda m: print(m, file=sys.stderr))
    print(Path(args.out, "sweep.md").read_text())
    return 0 if rows else 1


def cmd_report(args) -> int:
    from .report import make_report
    path = make_report(args.run_dirs, args.out, layers=args.layers.split(",") if args.layers else None,
                       title=args.title, axis=args.sparsity_axis)
    print(f"report: {path} (and report.html, PNG plots) in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .runs import RunConfig
    from . import __version__
    p = Parser(prog=PROG, description="Find structural lottery tickets and make them fast.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    run = sub.add_parser("run", help="train a ticket (IMP, one-shot sources, dynamic sparse training)",
                         description="Train dense, prune, post-process and retrain; resumable: "
                                     "running the same command again continues where it stopped. "
                                     "Under torchrun (torchrun --nproc_per_node N -m ticketsmith run "
                                     "...) it trains data-parallel; --batch-size is the GLOBAL batch, "
                                     "split evenly across the processes.")
    add_dataclass_flags(run, RunConfig)
    run.add_argument("--out", help="run directory (default: runs/MODEL_DATASET_METHOD_HASH)")
    run.add_argument("--data-dir", help="folder holding the dataset's files (default: the "
                     "dataset's standard place, or $TICKETSMITH_DATA)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="show progress bars")
    run.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                     help="torch.distributed backend under torchrun (auto: nccl on GPUs, gloo on CPUs)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where to train (auto: the GPU of this process's LOCAL_RANK if any)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads of this process "
                     "(default: torch's, usually the number of cores; on a shared or busy machine "
                     "use 1 per job: oversubscribed threads train several times slower)")
    run.set_defaults(func=cmd_run)

    s = sub.add_parser("summary", help="print the per-round table of run directories")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--json", action="store_true", help="print summary.json instead of a table")
    s.set_defaults(func=cmd_summary)

    b = sub.add_parser("bench", help="time compact tickets against the fastest dense path",
                       description="Compact each ticket and time it against the dense model: "
                                   "interleaved A B A B bursts, median and min-max of the per-pair "
                                   "time ratios; dense and compact each run in their faster memory "
                                   "format (NCHW or channels_last). Writes bench.json and bench.md "
                                   "into each round's folder.")
    b.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory (all finished sparse rounds)")
    b.add_argument("--rounds", help="comma-separated rounds to bench (default: every finished sparse round)")
    b.add_argument("--model", help="without RUN_DIR: a zoo model name")
    b.add_argument("--masks", help="without RUN_DIR: a masks .safetensors file")
    b.add_argument("--input-shape", help="without RUN_DIR: C,H,W of one input (e.g. 3,32,32)")
    b.add_argument("--num-classes", type=int, default=10)
    b.add_argument("--width", type=float, default=1.0)
    b.add_argument("--out", help="without RUN_DIR: folder for bench.json / bench.md")
    b.add_argument("--batch-sizes", default="1,64", help="comma-separated (default: 1,64)")
    b.add_argument("--threads", help="comma-separated thread counts (default: torch's current)")
    b.add_argument("--pairs", type=int, default=20, help="timed A/B pairs per setting (default: 20)")
    b.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every conv/linear layer (the paper's Figure 7)")
    b.add_argument("--runtimes", default="all", help="comma-separated runtimes both models are "
                   "deployed in: torch, torch.compile, onnxruntime, openvino (default: all, every one "
                   "installed here); the fastest dense of any of them is the baseline")
    b.add_argument("--autotune", action="store_true", help="time each executor's kernels and keep the fastest")
    b.add_argument("--data-dir", help="the dataset folder of RUN_DIR's dataset, if not the default")
    b.set_defaults(func=cmd_bench)

    ex = sub.add_parser("export", help="a finished round's ticket, compacted, as an artifact of a runtime",
                        description="Compact one finished sparse round and write it for a runtime: "
                                    "ONNX (onnxruntime), OpenVINO IR (openvino) or the compact model "
                                    "(torch); auto times the available runtimes at --batch-size and "
                                    "keeps the fastest. Checked against the masked ticket on random "
                                    "inputs; writes deploy.json with the choice and why.")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--round", type=int, required=True, help="which finished sparse round")
    ex.add_argument("--runtime", choices=("auto", "torch", "torch.compile", "ort", "onnxruntime", "openvino"),
                    default="auto", help="ort = onnxruntime (default: auto)")
    ex.add_argument("--threads", type=int, default=None, help="the runtime's intra-op threads")
    ex.add_argument("--batch-size", type=int, default=1, help="the batch size auto times, and "
                    "the speed of a reduced precision is measured at (default: 1)")
    ex.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                    help="bf16: openvino only; int8: static quantization (onnxruntime or openvino), "
                    "calibrated on --calibration-size training images; both also report test "
                    "accuracy and speed next to fp32 (default: fp32)")
    ex.add_argument("--calibration-size", type=int, default=256,
                    help="int8: training images to calibrate on (default: 256)")
    ex.add_argument("--out", required=True, help="folder for the artifact and deploy.json")
    ex.add_argument("--data-dir", help="the dataset folder of RUN_DIR's dataset, if not the default")
    ex.set_defaults(func=cmd_export)

    sw = sub.add_parser("sweep", help="Regroup's hyper-parameters on a finished IMP run: sparsity, "
                        "accuracy after retraining and speed per setting",
                        description="Regroup one round's mask of a finished unstructured IMP run for "
                                    "each setting (one hyper-parameter varied at a time, the others "
                                    "at their defaults); retrain each ticket from the run's rewind "
                                    "point for --epochs (0: no retraining) and time it; writes "
                                    "sweep.json, sweep.md and sweep.png. Resumable.")
    sw.add_argument("run_dir", metavar="IMP_RUN")
    sw.add_argument("--round", type=int, required=True, help="which IMP round's mask")
    sw.add_argument("--vary", action="append", default=[], metavar="NAME=V1,V2",
                    help="t1 (groups), width_ratio, t2, b1 or b2 and its values; repeatable")
    sw.add_argument("--epochs", type=int, default=0, help="retraining budget per setting (default 0)")
    sw.add_argument("--granularity", choices=("element", "channel"), default="element")
    sw.add_argument("--batch-size", type=int, default=64, help="batch size of the speed measurement")
    sw.add_argument("--pairs", type=int, default=10)
    sw.add_argument("--runtimes", default="all", help="runtimes the tickets and the dense model are "
                    "timed in (as bench's --runtimes; default: all installed)")
    sw.add_argument("--threads", type=int, default=None, help="CPU threads for retraining and "
                    "timing (default: torch's default, the cores)")
    sw.add_argument("--out", required=True)
    sw.add_argument("--data-dir")
    sw.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    sw.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="plots, report.md and report.html from run directories")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", required=True, help="folder for the PNGs and the report")
    rep.add_argument("--layers", help="comma-separated layer names for the mask pictures "
                     "(default: the largest layer and one from the middle)")
    rep.add_argument("--title", default="ticketsmith report")
    rep.add_argument("--sparsity-axis", choices=("auto", "effective", "mask"), default="auto",
                     help="x-axis of the plots: the effective sparsity (what the compact model keeps), "
                     "the mask's, or auto: effective where every point has it recorded (default)")
    rep.set_defaults(func=cmd_report)
    return p


def _passive_openmp(argv: list[str] | None) -> None:
    """`ticketsmith run` / `bench` / `sweep` from a shell: re-run with OMP_WAIT_POLICY=PASSIVE
    unless it is set (training on a busy 2-core machine was measured 6x faster with it).

    With OpenMP's default spinning policy a 2-thread call on a loaded 2-core machine waits a
    scheduler slice for its descheduled partner thread (a 40 us product took 7-8 ms, see
    docs/benchmarks.md). libgomp reads the variable when torch loads it, so it must be in the
    environment before the process starts. Never done for in-process calls (`main([...])`)."""
    timing = sys.argv[1:2] in (["bench"], ["sweep"], ["run"], ["export"])  # run: training on a busy machine too
    if argv is not None or "OMP_WAIT_POLICY" in os.environ or not timing:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    # what the user typed, for the records (after the exec sys.argv names __main__.py)
    os.environ.setdefault("TICKETSMITH_COMMAND", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    os.execv(sys.executable, [sys.executable, "-m", "ticketsmith", *sys.argv[1:]])


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill` stopping the job), raised where the program is, so that it
    stops as on Ctrl-C: clean-up runs, the lock is released, the run resumes on the same command."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    _passive_openmp(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return _dispatch(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _dispatch(args) -> int:
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"{PROG}: training diverged: {e}", file=sys.stderr)
        return 1
    except TicketsmithError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only folder: nothing was left half-written
        print(f"{PROG}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if args.command == "run":
            print(f"{PROG}: {how}; run the same command again to resume", file=sys.stderr)
        else:  # bench, sweep and report do not resume: say so instead of promising it
            print(f"{PROG}: {how}; {args.command} does not resume: rerunning it starts over "
                  "(files it already wrote stay)", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())

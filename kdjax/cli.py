"""The `kdjax` command: thin argument parsing over the Python API.

  kdjax fine-tune --config configs/finetune.py[:quick] [--config.KEY=VALUE ...] --workdir DIR
                  [--overwrite]
  kdjax distill   --config configs/RECIPE.py[:SETTING] [--config.KEY=VALUE ...] --workdir DIR
                  [--overwrite]
  kdjax eval      --model DIR [--config configs/finetune.py] [--config.KEY=VALUE ...]
  kdjax export    (--workdir DIR [--step N] | --model DIR) [--format hf|stablehlo] [--out DIR]
  kdjax bench     [--quick] [--json PATH] [--preset minilm|bert-base] [--dtype float32|bfloat16]
  kdjax report    RUN_DIR... [--out DIR] [--html]

Several processes (hosts): start the same command in each with KDJAX_COORDINATOR=host:port,
KDJAX_NUM_PROCESSES=N and KDJAX_PROCESS_ID=i (or JAX_COORDINATOR_ADDRESS, or KDJAX_DISTRIBUTED=1
on a TPU pod / SLURM / Open MPI) and one shared --workdir; process 0 writes logs and files.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import sys
import threading

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune.py")

_OVERWRITE_HELP = ("start over when the workdir holds a run of another config: move the old run "
                   "aside to WORKDIR.old-TIMESTAMP (it is never deleted)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    fine_tune = commands.add_parser("fine-tune", help="fine-tune a (teacher) model on a task")
    fine_tune.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
    fine_tune.add_argument("--workdir", required=True,
                           help="run directory: checkpoints, metrics, exported model; "
                                "an existing run there is resumed")
    fine_tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    fine_tune.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)

    distill = commands.add_parser(
        "distill", help="fine-tuned teacher -> student -> distillation -> evaluation -> saved "
                        "student (fine-tunes the teacher first when needed)")
    distill.add_argument("--config", required=True,
                         help="configs/RECIPE.py[:SETTING], e.g. configs/kd.py:tenth_size")
    distill.add_argument("--workdir", required=True,
                         help="run directory: teacher run(s), stage checkpoints, metrics, the "
                              "student in WORKDIR/model; an existing run there is resumed")
    distill.add_argument("--no-progress", action="store_true", help="no progress bar")
    distill.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)

    evaluate = commands.add_parser("eval", help="evaluate a saved model on a task's dev split")
    evaluate.add_argument("--model", required=True,
                          help="a Hugging Face model directory (e.g. WORKDIR/model)")
    evaluate.add_argument("--config", default=_DEFAULT_CONFIG,
                          help="config naming the task and batch sizes (default: %(default)s)")

    export = commands.add_parser(
        "export", help="write a fine-tuning run's checkpoint as a Hugging Face directory, or a "
                       "run's checkpoint or saved model as a StableHLO artifact; each export "
                       "checks itself against the model it came from")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a fine-tuning run directory (its checkpoints)")
    source.add_argument("--model", help="a saved model directory (WORKDIR/model of a fine-tune "
                                        "or distillation, BERT or BiLSTM); --format stablehlo")
    export.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    export.add_argument("--format", choices=("hf", "stablehlo"), default="hf",
                        help="hf: a Hugging Face directory (default); stablehlo: a serialized "
                             "jax.export artifact with tokenizer and label map")
    export.add_argument("--out", default=None,
                        help="default: WORKDIR/export-STEP (stablehlo: export-STEP-stablehlo; "
                             "with --model: MODEL-stablehlo)")
    export.add_argument("--no-check", action="store_true",
                        help="skip reloading the export and comparing its logits")

    report = commands.add_parser(
        "report", help="a Markdown (and HTML) report with a results table and figures from "
                       "finished run directories; reruns no model")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or folders holding them (a results folder)")
    report.add_argument("--out", default="report",
                        help="where report.md and its figures go (default: %(default)s)")
    report.add_argument("--html", action="store_true",
                        help="also write report.html, one page with the figures inlined")

    bench = commands.add_parser(
        "bench", help="distillation step speed: kdjax vs PyTorch, FLOP/s vs a matmul peak, "
                      "teacher cache, bucketing, memory, inference per student size")
    bench.add_argument("--quick", action="store_true",
                       help="fewer steps and repeats, a dev subset: a few minutes on a CPU")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results")
    bench.add_argument("--teacher", default="sentence-transformers/all-MiniLM-L6-v2",
                       help="teacher checkpoint (with --preset bert-base: its tokenizer only)")
    bench.add_argument("--preset", choices=("minilm", "bert-base"), default="minilm",
                       help="minilm: the teacher checkpoint -> half-depth student; bert-base: "
                            "random 12 x 768 teacher -> 6 x 768 student")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--seq-len", type=int, default=64)
    bench.add_argument("--steps", type=int, default=0, help="timed steps (20; quick 3)")
    bench.add_argument("--repeats", type=int, default=0, help="timed repeats (3; quick 2)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    bench.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    bench.add_argument("--bucket-batches", type=int, default=0,
                       help="SST-2 train batches in the bucketing comparison (24; quick 4)")
    bench.add_argument("--bucket-length", type=int, default=128,
                       help="the fixed padding that length buckets are compared with")
    bench.add_argument("--eval-batch-size", type=int, default=128)
    bench.add_argument("--dev-examples", type=int, default=0,
                       help="dev examples for inference throughput (0 = all; quick 256)")
    bench.add_argument("--matmul-size", type=int, default=0,
                       help="peak matmul size (0 = doubled until a call takes >= 50 ms)")
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (which saves first): stop as Ctrl-C does."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return _main(args, overrides)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return _main(args, overrides)


def _main(args: argparse.Namespace, overrides: list[str]) -> int:

    if args.command == "report":
        # Reads files only: no device, no multi-process setup.
        from kdjax import report as report_lib
        try:
            written = report_lib.write_report(args.runs, args.out, html_page=args.html)
        except report_lib.ReportError as e:
            print(f"kdjax report: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {written['markdown']} ({written['runs']} runs, "
              f"{len(written['figures'])} figures)"
              + (f" and {written['html']}" if written["html"] else ""))
        return 0

    # Imported after parsing so `kdjax --help` is instant.
    from kdjax import distributed

    try:
        # Before anything touches a device: joins a multi-process run when the environment
        # describes one.
        distributed.initialize_from_env()
    except distributed.DistributedSetupError as e:
        print(f"kdjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    from kdjax import config as config_lib, data, hf, train

    def load_config():
        config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
        if args.command != "distill":
            return config_lib.validate(config)
        from kdjax import methods  # The methods' own rules: distillation configs only.
        return methods.validate(config)

    def report(result: dict) -> None:
        if distributed.is_main_process():  # One copy of the results, not one per process.
            print(json.dumps(result, indent=2))

    try:
        if args.command == "fine-tune":
            config = load_config()
            result = train.fine_tune(config, args.workdir, progress=not args.no_progress,
                                     overwrite=args.overwrite)
            report({"dev": result, "model": str(pathlib.Path(args.workdir) / "model")})
        elif args.command == "distill":
            from kdjax import distill
            config = load_config()
            result = distill.distill(config, args.workdir, progress=not args.no_progress,
                                     overwrite=args.overwrite)
            report({"dev": result, "model": str(pathlib.Path(args.workdir) / "model")})
        elif args.command == "eval":
            config = load_config()
            report(train.evaluate_saved_model(args.model, config))
        elif args.command == "export":
            from kdjax import export as export_lib
            result = export_lib.export(workdir=args.workdir, model_dir=args.model,
                                       step=args.step, fmt=args.format, out=args.out,
                                       check=not args.no_check)
            if distributed.is_main_process():
                print(export_lib.describe(result))
        elif args.command == "bench":
            from kdjax import bench
            bench.main(args)
    except (config_lib.ConfigError, data.DataError, hf.CheckpointError, FileNotFoundError,
            train.TrainingDiverged, ValueError) as e:  # ExportError is a ValueError.
        # One line, whatever the message: a wrapped library message may span several.
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"kdjax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM: in training, after saving a checkpoint (train.TrainingInterrupted
        # says which); elsewhere nothing half-written is left (files are renamed into place).
        signum = getattr(e, "signum", signal.SIGINT)
        what = str(e) or (f"interrupted by {signal.Signals(signum).name}; run the same command "
                          "again to resume")
        print(f"kdjax {args.command}: {what}", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())

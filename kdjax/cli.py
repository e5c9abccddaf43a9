"""The `kdjax` command: thin argument parsing over the Python API.

  kdjax fine-tune --config configs/finetune.py[:quick] [--config.KEY=VALUE ...] --workdir DIR
  kdjax distill   --config configs/RECIPE.py[:SETTING] [--config.KEY=VALUE ...] --workdir DIR
  kdjax eval      --model DIR [--config configs/finetune.py] [--config.KEY=VALUE ...]
  kdjax export    --workdir DIR [--step N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune.py")


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

    distill = commands.add_parser(
        "distill", help="fine-tuned teacher -> student -> distillation -> evaluation -> saved "
                        "student (fine-tunes the teacher first when needed)")
    distill.add_argument("--config", required=True,
                         help="configs/RECIPE.py[:SETTING], e.g. configs/kd.py:tenth_size")
    distill.add_argument("--workdir", required=True,
                         help="run directory: teacher run(s), stage checkpoints, metrics, the "
                              "student in WORKDIR/model; an existing run there is resumed")
    distill.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("eval", help="evaluate a saved model on a task's dev split")
    evaluate.add_argument("--model", required=True,
                          help="a Hugging Face model directory (e.g. WORKDIR/model)")
    evaluate.add_argument("--config", default=_DEFAULT_CONFIG,
                          help="config naming the task and batch sizes (default: %(default)s)")

    export = commands.add_parser("export", help="write a run's checkpoint as a Hugging Face "
                                                "model directory")
    export.add_argument("--workdir", required=True)
    export.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    export.add_argument("--out", default=None, help="default: WORKDIR/export-STEP")
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)

    # Imported after parsing so `kdjax --help` is instant.
    from kdjax import config as config_lib, data, hf, train

    def load_config():
        return config_lib.validate(
            config_lib.apply_overrides(config_lib.load_config(args.config), overrides))

    try:
        if args.command == "fine-tune":
            config = load_config()
            result = train.fine_tune(config, args.workdir, progress=not args.no_progress)
            print(json.dumps({"dev": result, "model": str(pathlib.Path(args.workdir) / "model")},
                             indent=2))
        elif args.command == "distill":
            from kdjax import distill
            config = load_config()
            result = distill.distill(config, args.workdir, progress=not args.no_progress)
            print(json.dumps({"dev": result, "model": str(pathlib.Path(args.workdir) / "model")},
                             indent=2))
        elif args.command == "eval":
            config = load_config()
            print(json.dumps(train.evaluate_saved_model(args.model, config), indent=2))
        elif args.command == "export":
            model, label_names, config, step = train.load_run(args.workdir, args.step)
            out = args.out or pathlib.Path(args.workdir) / f"export-{step}"
            import transformers
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(hf.resolve_checkpoint(config.model.name)))
            hf.save_pretrained(model, out, label_names=label_names, tokenizer=tokenizer)
            print(f"wrote step {step} of {args.workdir} to {out}")
    except (config_lib.ConfigError, data.DataError, hf.CheckpointError, FileNotFoundError,
            train.TrainingDiverged, ValueError) as e:
        print(f"kdjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

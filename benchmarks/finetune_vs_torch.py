"""Fine-tuning speed and accuracy: kdjax against plain PyTorch + transformers, side by side.

Both fine-tune the packaged all-MiniLM-L6-v2 on SST-2 with the same recipe (1 epoch, batch 32,
AdamW lr 1e-4, 10 % warmup + linear decay, weight decay 0.01, clip 1.0, max length 64), one after
the other on the same machine, and report dev accuracy, training wall time and examples/s.
kdjax buckets by length (`configs/finetune.py`); the PyTorch run pads random batches per batch,
as a user would write it (`benchmarks/torch_finetune.py`).

  python -m benchmarks.finetune_vs_torch                       # full epoch each (~45 min, 2 CPUs)
  python -m benchmarks.finetune_vs_torch --torch-max-steps 600 # PyTorch throughput on 600 steps
  python -m benchmarks.finetune_vs_torch --json results/finetune_bench.json

Wall time for kdjax counts everything in its training loop, jit compilation included; data
loading/tokenisation and the final evaluation are reported separately for both.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_kdjax(workdir: pathlib.Path, overrides: list[str]) -> dict:
    from kdjax import config as config_lib, train

    config = config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py"))
    config = config_lib.validate(config_lib.apply_overrides(config, overrides))
    start = time.perf_counter()
    result = train.fine_tune(config, workdir, progress=True)
    result["total_seconds"] = time.perf_counter() - start
    return {"framework": "kdjax", "dev_accuracy": result["accuracy"], **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-max-steps", type=int, default=None,
                        help="stop the PyTorch run after N steps (its schedule still spans the "
                             "epoch); its throughput is then measured on those steps only")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--workdir", default=None, help="kdjax run directory (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("overrides", nargs="*", help="kdjax --config.KEY=VALUE overrides")
    args = parser.parse_args()

    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="kdjax-bench-"))
    results = {"kdjax": run_kdjax(workdir, args.overrides)}
    if not args.skip_torch:
        from benchmarks import torch_finetune
        results["pytorch"] = torch_finetune.run(max_steps=args.torch_max_steps)

    print("\nSST-2 fine-tune of all-MiniLM-L6-v2, 1 epoch, batch 32, same machine")
    print(f"{'':10s} {'dev acc':>8s} {'train s':>9s} {'train ex/s':>11s} {'steps':>6s}")
    for name, r in results.items():
        partial = " (stopped early)" if r.get("stopped_early") else ""
        print(f"{name:10s} {100 * r['dev_accuracy']:7.2f}% {r['train_seconds']:9.1f} "
              f"{r['train_examples_per_s']:11.1f} {r['steps']:6d}{partial}")
    if "pytorch" in results:
        torch_r, ours = results["pytorch"], results["kdjax"]
        speedup = ours["train_examples_per_s"] / torch_r["train_examples_per_s"]
        results["speedup_examples_per_s"] = speedup
        print(f"kdjax / PyTorch training throughput: {speedup:.2f}x")
        if torch_r.get("stopped_early"):
            est = torch_r["train_seconds"] * torch_r["total_steps"] / torch_r["steps"]
            results["pytorch_full_epoch_seconds_estimate"] = est
            print(f"PyTorch full epoch at the measured rate: ~{est:.0f} s")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

"""The SST-2 results table: `benchmarks.glue_results` with its default task (kept so that the
commands recorded in results/sst2.* still run)."""

from benchmarks.glue_results import main

if __name__ == "__main__":
    main()

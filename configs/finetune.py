"""Fine-tune a teacher: the first stage of every distillation run.

Default: the packaged all-MiniLM-L6-v2 on SST-2 (../shared/data/sst2 when present, else the
GLUE copy on the Hugging Face hub), 1 epoch, batch 32, AdamW lr 1e-4 with 10 % warmup and linear
decay, max length 64 with length bucketing.

  kdjax fine-tune --config configs/finetune.py --workdir runs/teacher
  kdjax fine-tune --config configs/finetune.py:quick --workdir runs/quick   # a few minutes on CPU
  kdjax fine-tune --config configs/finetune.py --config.data.task=mrpc --config.optim.lr=3e-5 ...
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.finetune_config()
    if arg == "quick":
        # A few minutes on 2 CPU cores: a 4,000-example seeded subset of SST-2 train.
        config.data.train_limit = 4000
        config.train.log_every = 25
        config.train.checkpoint_every = 0
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}; known: quick")
    return config

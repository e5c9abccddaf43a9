"""Fine-tune a teacher: the first stage of every distillation run.

Default: the packaged all-MiniLM-L6-v2 on SST-2 (../shared/data/sst2 when present, else the
GLUE copy on the Hugging Face hub), 1 epoch, batch 32, AdamW lr 1e-4 with 10 % warmup and linear
decay, max length 64 with length bucketing.

  kdjax fine-tune --config configs/finetune.py --workdir runs/teacher
  kdjax fine-tune --config configs/finetune.py:quick --workdir runs/quick   # a few minutes on CPU
  kdjax fine-tune --config configs/finetune.py --config.data.task=mrpc --config.optim.lr=3e-5 ...
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "sentence-transformers/all-MiniLM-L6-v2"  # A path or a hub name.
    config.model.dtype = "float32"  # Computation dtype; parameters stay float32.

    config.data = ml_collections.ConfigDict()
    config.data.task = "sst2"  # A GLUE task name, or any name when files are given.
    config.data.train_file = ""  # Local .tsv/.csv/.jsonl; empty = the GLUE task.
    config.data.dev_file = ""
    config.data.text_columns = ("sentence",)  # One column, or two for sentence pairs.
    config.data.label_column = "label"
    config.data.max_length = 64
    config.data.buckets = ()  # Padded lengths jit compiles for; () = multiples of 16.
    config.data.batch_size = 32
    config.data.eval_batch_size = 128
    config.data.train_limit = 0  # Train on a seeded random subset of this size (0 = all).
    config.data.subset_seed = 0
    config.data.dev_limit = 0

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 1e-4
    config.optim.warmup_ratio = 0.1
    config.optim.weight_decay = 0.01
    config.optim.grad_clip = 1.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 1.0
    config.train.max_steps = 0  # 0 = run for `epochs`.
    config.train.stop_after_steps = 0  # End this invocation after N steps (resume later); 0 = off.
    config.train.seed = 0
    config.train.log_every = 50
    config.train.checkpoint_every = 500  # 0 = only at the end.
    config.train.keep_checkpoints = 2
    config.train.num_devices = 0  # 0 = every device.
    config.train.tensorboard = False

    if arg == "quick":
        # A few minutes on 2 CPU cores: a 4,000-example seeded subset of SST-2 train.
        config.data.train_limit = 4000
        config.train.log_every = 25
        config.train.checkpoint_every = 0
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}; known: quick")
    return config

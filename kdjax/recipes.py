"""Config builders shared by the files in configs/: the fine-tuning sections, the distillation
sections, and the three experimental settings of the SST-2 results table.

A recipe file (configs/kd.py, ...) starts from `distill_config(setting)` and sets its loss
weights; `arg` after the colon picks the setting: `configs/kd.py:tenth_size`.
"""

from __future__ import annotations

import ml_collections

# The experimental settings of results/sst2.md (see the README). Student sizes are for the
# 6-layer, 384-wide, 12-head all-MiniLM-L6-v2 teacher.
SETTINGS = {
    # 3 layers x 384, initialised from the fine-tuned teacher's layers; full SST-2 train.
    "half_depth": dict(layers=3, hidden=0, heads=0, intermediate=0, init="teacher",
                       train_limit=0, unlabelled_rest=False, lr=1e-4),
    # 3 layers x 168 (12 heads of 14, FFN 672): 9.6 % of the teacher's non-embedding
    # parameters, random init; 3 divides 6, so TinyBERT's uniform layer map applies. A random
    # init needs a higher learning rate than a copied one: at 1e-4 and 300 steps the control
    # stayed at 56 % dev accuracy, at 5e-4 it reached 78 %.
    "tenth_size": dict(layers=3, hidden=168, heads=12, intermediate=672, init="random",
                       train_limit=0, unlabelled_rest=False, lr=5e-4),
    # The half_depth student with 1,000 labelled examples (teacher too); the other training
    # sentences, labels removed, are the transfer set the teacher labels.
    "few_labels": dict(layers=3, hidden=0, heads=0, intermediate=0, init="teacher",
                       train_limit=1000, unlabelled_rest=True, lr=1e-4),
}


def finetune_config() -> ml_collections.ConfigDict:
    """model / data / optim / train: everything `kdjax fine-tune` reads."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "sentence-transformers/all-MiniLM-L6-v2"  # A path or a hub name.
    config.model.dtype = "float32"  # Computation dtype; parameters stay float32.

    config.data = data_config()
    config.optim = optim_config()

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 1.0
    config.train.max_steps = 0  # 0 = run for `epochs`.
    config.train.stop_after_steps = 0  # End this invocation after N steps (resume later); 0 = off.
    config.train.seed = 0
    config.train.log_every = 50
    config.train.checkpoint_every = 500  # 0 = only at the end.
    config.train.keep_checkpoints = 2
    config.train.num_devices = 0  # 0 = every device.
    # FSDP: parameters and optimizer state split over the devices by a shape rule
    # (kdjax.sharding.state_shardings) instead of replicated: the same updates, and each device
    # holds 1/N of every large array.
    config.train.fsdp = False
    # Micro-batches per update: the batch is split k ways, gradients accumulated, one update
    # (data.batch_size must be a multiple of k x the devices).
    config.train.grad_accum_steps = 1
    config.train.tensorboard = False
    return config


def data_config() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.task = "sst2"  # A GLUE task name, or any name when files are given.
    data.train_file = ""  # Local .tsv/.csv/.jsonl; empty = the GLUE task.
    data.dev_file = ""
    data.text_columns = ("sentence",)  # One column, or two for sentence pairs.
    data.label_column = "label"
    data.max_length = 64
    data.buckets = ()  # Padded lengths jit compiles for; () = the default ladder.
    data.batch_size = 32
    data.eval_batch_size = 128
    data.train_limit = 0  # Train on a seeded random subset of this size (0 = all).
    data.subset_seed = 0
    data.dev_limit = 0
    return data


def optim_config(lr: float = 1e-4) -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict()
    optim.lr = lr
    optim.warmup_ratio = 0.1
    optim.weight_decay = 0.01
    optim.grad_clip = 1.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    return optim


def loss_config(**weights) -> ml_collections.ConfigDict:
    """A stage's loss terms (weights; 0 = off) and their settings. See `kdjax.distill.LossSpec`."""
    loss = ml_collections.ConfigDict()
    loss.ce = 0.0  # Hard-label cross-entropy (labelled examples only).
    loss.soft = 0.0  # Hinton: T^2 * KL(teacher || student) on task logits.
    loss.soft_ce = 0.0  # TinyBERT prediction loss: soft cross-entropy, no T^2.
    loss.logit_mse = 0.0  # Distilled BiLSTM: MSE on logits.
    loss.embedding = 0.0  # TinyBERT: MSE on embedding outputs (projected when widths differ).
    loss.hidden = 0.0  # TinyBERT: MSE on mapped hidden states.
    loss.attention = 0.0  # TinyBERT: MSE on mapped pre-softmax attention scores.
    loss.attention_kl = 0.0  # KL between mapped attention distributions.
    loss.cosine = 0.0  # DistilBERT: 1 - cos on last-layer hidden states.
    loss.pkd = 0.0  # Patient KD: normalised [CLS] distance on mapped intermediate layers.
    loss.mlm = 0.0  # DistilBERT: masked-LM cross-entropy on dynamically masked input.
    # KDABert: lambda_adv on the student's adversarial loss against per-layer discriminators
    # (config.discriminator, kdjax/adversarial.py); 0 for the first `adversarial_warmup` of the
    # stage, then a linear ramp to full over the next `adversarial_ramp` (0 = at once).
    loss.adversarial = 0.0
    loss.adversarial_warmup = 0.1
    loss.adversarial_ramp = 0.1
    loss.temperature = 1.0
    loss.temperature_end = 0.0  # With a temperature schedule: the final T (0 = same as T).
    loss.temperature_schedule = "constant"  # constant | linear_warmup | linear_decay
    loss.weight_schedule = "constant"  # For every teacher term: constant | linear_warmup | ...
    loss.schedule_warmup_ratio = 0.1  # linear_warmup: fraction of the stage to reach full.
    loss.layer_map = "uniform"  # uniform (TinyBERT) | skip | last (PKD) | explicit
    loss.layer_map_explicit = ()  # explicit: teacher layer (1-based) for student layers 1..M.
    loss.hard_labels_from_teacher = False  # CE on unlabelled examples uses the teacher argmax.
    loss.mlm_probability = 0.15
    for name, value in weights.items():
        if name not in loss:
            raise ValueError(f"unknown loss setting {name!r}")
        loss[name] = float(value) if isinstance(loss[name], float) else value
    return loss


def stage_config(*, epochs: float = 1.0, lr: float = 0.0, teacher: str = "finetuned",
                 data: str = "train", **weights) -> ml_collections.ConfigDict:
    """One distillation stage: its losses, length, learning rate, teacher and data.

    Args:
      epochs: passes over the stage's data (train.max_steps, when set, overrides it).
      lr: peak learning rate; 0 = optim.lr.
      teacher: "finetuned" (the task teacher) or "pretrained" (teacher.name as loaded, for
        TinyBERT's general distillation).
      data: "train" (the labelled set, plus the unlabelled rest when data.unlabelled_rest) or
        "unlabelled" (data.unlabelled_file, else every training sentence with labels removed).
    """
    stage = ml_collections.ConfigDict()
    stage.epochs = epochs
    stage.lr = lr
    stage.teacher = teacher
    stage.data = data
    stage.loss = loss_config(**weights)
    return stage


def pkd_config(setting: str | None, layer_map: str) -> ml_collections.ConfigDict:
    """Patient KD (Sun et al. 2019): (1 - alpha) CE + alpha T^2 KL + beta L_PT, with alpha = 0.5,
    T = 5, beta = 100 from the paper's grid; the student starts from the teacher's first layers
    (where widths allow). `layer_map`: skip (PKD-Skip) or last (PKD-Last)."""
    config = distill_config(setting)
    config.recipe = f"pkd_{layer_map}"
    config.student.init_layers = "first"
    alpha = 0.5
    config.distill.loss.ce = 1 - alpha
    config.distill.loss.soft = alpha
    config.distill.loss.temperature = 5.0
    config.distill.loss.pkd = 100.0
    config.distill.loss.layer_map = layer_map
    return config


def distill_config(setting: str | None = "half_depth") -> ml_collections.ConfigDict:
    """The sections of a distillation run; a recipe then sets `config.distill.loss`."""
    setting = setting or "half_depth"
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    spec = SETTINGS[setting]
    config = ml_collections.ConfigDict()
    config.setting = setting
    config.recipe = ""
    # Which run function trains the student: bert (this module's staged distillation of a BERT
    # student), or a recipe with its own student/step (see kdjax.distill._METHOD_RUNNERS).
    config.method = "bert"

    config.teacher = ml_collections.ConfigDict()
    # A checkpoint already fine-tuned on the task (with its label map) is used as it is; a
    # pretrained one is fine-tuned first into WORKDIR/teacher (or teacher-seedN), once.
    config.teacher.name = "sentence-transformers/all-MiniLM-L6-v2"
    config.teacher.seeds = (0,)  # Several seeds: an ensemble whose soft targets are averaged.
    config.teacher.extra = ()  # More fine-tuned teacher directories for the ensemble.
    config.teacher.epochs = 1.0 if not spec["train_limit"] else 10.0
    config.teacher.optim = optim_config(1e-4)
    config.teacher.dtype = "float32"
    # Teacher-output cache (kdjax/teacher_cache.py): for stages whose inputs are fixed (no mlm,
    # adversarial or attention term), the teachers' logits are computed once, stored on disk
    # and read back instead of running the teachers in every step.
    config.teacher.cache = True
    config.teacher.cache_hidden = False  # Also the hidden layers the stage's terms read.
    config.teacher.cache_dir = ""  # "" = WORKDIR/cache.
    config.teacher.cache_max_gb = 8.0  # Refuse to build a larger cache (GB = 1e9 bytes).

    config.student = ml_collections.ConfigDict()
    config.student.layers = spec["layers"]
    config.student.hidden = spec["hidden"]  # 0 = the teacher's.
    config.student.heads = spec["heads"]  # 0 = the teacher's.
    config.student.intermediate = spec["intermediate"]  # 0 = the teacher's (or 4x hidden).
    config.student.init = spec["init"]  # teacher | random
    # Which teacher layers a teacher-initialised student copies: spread (DistilBERT: evenly,
    # first and last kept), first (Patient KD), or explicit (init_layers_explicit, 0-based).
    config.student.init_layers = "spread"
    config.student.init_layers_explicit = ()
    # The MLM head for an `mlm` loss: from the teacher, or "random" when the teacher has none.
    config.student.mlm_head_init = "teacher"
    # A learned projection (student width -> teacher width) for the embedding/hidden/pkd terms
    # when widths differ; off, such a mismatch is refused.
    config.student.projection = True
    config.student.dtype = "float32"

    config.data = data_config()
    config.data.train_limit = spec["train_limit"]
    config.data.unlabelled_rest = spec["unlabelled_rest"]
    config.data.unlabelled_file = ""  # One sentence per line: the "unlabelled" stages' corpus.

    config.optim = optim_config(spec["lr"])

    config.train = ml_collections.ConfigDict()
    config.train.max_steps = 0  # Per stage; 0 = from the stage's epochs.
    config.train.stop_after_steps = 0
    config.train.seed = 0
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 1
    config.train.num_devices = 0
    # FSDP: parameters and optimizer state split over the devices by a shape rule
    # (kdjax.sharding.state_shardings) instead of replicated: the same updates, and each device
    # holds 1/N of every large array.
    config.train.fsdp = False
    # Micro-batches per update: the batch is split k ways, gradients accumulated, one update
    # (data.batch_size must be a multiple of k x the devices).
    config.train.grad_accum_steps = 1
    config.train.tensorboard = False

    config.stages = ("distill",)
    config.distill = stage_config()
    return config


def bilstm_config(augment: str = "tang", *, teacher_terms: bool = True,
                  ) -> ml_collections.ConfigDict:
    """Distilled BiLSTM (Tang et al. 2019; kdjax/bilstm.py): the distillation sections with a
    BiLSTM `student`, Adadelta `optim`, an `augment` section and one `distill` stage.

    Args:
      augment: the transfer set's generator: tang (masking, POS-guided replacement, n-grams),
        tinybert (embedding-neighbour replacement) or none.
      teacher_terms: alpha CE + (1 - alpha) logit MSE with alpha = 0.5 (hard labels of augmented
        examples from the teacher's argmax); False: CE on the labelled examples only.
    """
    config = distill_config(None)
    config.setting = "bilstm"
    config.method = "bilstm"
    config.recipe = "bilstm"

    config.student = ml_collections.ConfigDict()
    config.student.layers = 1  # One BiLSTM layer (reported as student_layers).
    config.student.hidden = 150  # LSTM width per direction (Tang et al., SST-2).
    config.student.mlp = 200  # ReLU hidden layer of the classifier.
    config.student.dropout = 0.1
    # Embedding table: teacher = a copy of the fine-tuned teacher's 384-d word-piece embeddings
    # (Tang's 300-d word2vec is not available offline); random = learned from scratch.
    config.student.init = "teacher"
    config.student.train_embedding = True

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adadelta"
    config.optim.lr = 1.0
    config.optim.rho = 0.95
    config.optim.eps = 1e-6
    config.optim.grad_clip = 0.0  # 0 = off (Tang et al. do not clip).

    config.data.batch_size = 50

    config.augment = ml_collections.ConfigDict()
    config.augment.method = augment  # tang | tinybert | none
    # Copies per example before duplicates are dropped: Tang's n_iter, TinyBERT's N_a (20 both).
    config.augment.n_iter = 20
    # Cap on new examples (0 = none). SST-2 x 20 would be ~1.3 M examples for the teacher to
    # label and the student to train on; 200k keeps a 2-core CPU run in hours, not days.
    config.augment.max_examples = 200_000
    config.augment.seed = 0
    config.augment.p_mask = 0.1  # Tang: [MASK] a word.
    config.augment.p_pos = 0.1  # Tang: replace a word by one of the same POS tag.
    config.augment.p_ng = 0.25  # Tang: keep only a random n-gram of the copy.
    config.augment.max_ngram = 5
    config.augment.p_t = 0.4  # TinyBERT: replace a candidate word.
    config.augment.k = 15  # TinyBERT: candidates per word.
    config.augment.pair_sides = "random"  # Pairs: first | second | both | random.

    alpha = 0.5
    weights = (dict(ce=alpha, logit_mse=1 - alpha, hard_labels_from_teacher=True)
               if teacher_terms else dict(ce=1.0))
    # Sized for a 2-core CPU: 2 passes over ~267k transfer examples, 5 over SST-2's 67k.
    config.distill = stage_config(epochs=2.0 if teacher_terms else 5.0, **weights)
    return config

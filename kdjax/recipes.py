"""Config builders shared by the files in configs/: the fine-tuning sections, the distillation
sections, and the three experimental settings of the SST-2 results table.

A recipe file (configs/kd.py, ...) starts from `distill_config(setting)` and sets its loss
weights; `arg` after the colon picks the setting: `configs/kd.py:tenth_size`.
"""

from __future__ import annotations

import ml_collections

from kdjax import methods
from kdjax import config as config_lib
from kdjax.config import data_config, finetune_config, optim_config  # noqa: F401
from kdjax.methods import bilstm, kdabert, newsbert

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


def loss_config(**weights) -> ml_collections.ConfigDict:
    """A stage's `loss` section: every method's settings (term weights, 0 = off; see each module
    of kdjax/methods/) and the settings they share, with `weights` set."""
    loss = ml_collections.ConfigDict(methods.loss_section_defaults())
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


def kd_config(setting: str | None = None) -> ml_collections.ConfigDict:
    """Hinton KD (configs/kd.py): alpha T^2 KL + (1 - alpha) CE, alpha = 0.5, T = 2."""
    alpha = 0.5
    config = distill_config(setting, stages={"distill": stage_config(
        soft=alpha, ce=1 - alpha, temperature=2.0)})
    config.recipe = "kd"
    return config


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


def _teacher_section(spec: dict, *, fine_tuned: bool = True) -> ml_collections.ConfigDict:
    teacher = ml_collections.ConfigDict()
    # A checkpoint already fine-tuned on the task (with its label map) is used as it is; a
    # pretrained one is fine-tuned first into WORKDIR/teacher (or teacher-seedN), once.
    teacher.name = "sentence-transformers/all-MiniLM-L6-v2"
    teacher.seeds = (0,)  # Several seeds: an ensemble whose soft targets are averaged.
    teacher.extra = ()  # More fine-tuned teacher directories for the ensemble.
    if fine_tuned:
        teacher.epochs = 1.0 if not spec["train_limit"] else 10.0
        teacher.optim = optim_config(1e-4)
        # With data.holdout_fraction > 0: stop the teacher's fine-tuning after this many
        # held-out evaluations without improvement (teacher.epochs is then the cap); 0 = never.
        teacher.patience = 0
    teacher.dtype = "float32"
    # Teacher-output cache (kdjax/teacher_cache.py): for stages whose inputs are fixed (no mlm,
    # adversarial or attention term), the teachers' logits are computed once, stored on disk
    # and read back instead of running the teachers in every step.
    teacher.cache = True
    teacher.cache_hidden = False  # Also the hidden layers the stage's terms read.
    teacher.cache_dir = ""  # "" = WORKDIR/cache.
    teacher.cache_max_gb = 8.0  # Refuse to build a larger cache (GB = 1e9 bytes).
    return teacher


def _bert_student_section(spec: dict, *, distilled: bool = True) -> ml_collections.ConfigDict:
    student = ml_collections.ConfigDict()
    student.layers = spec["layers"]
    student.hidden = spec["hidden"]  # 0 = the teacher's.
    student.heads = spec["heads"]  # 0 = the teacher's.
    student.intermediate = spec["intermediate"]  # 0 = the teacher's (or 4x hidden).
    student.init = spec["init"]  # teacher | random
    # Which teacher layers a teacher-initialised student copies: spread (DistilBERT: evenly,
    # first and last kept), first (Patient KD), or explicit (init_layers_explicit, 0-based).
    student.init_layers = "spread"
    student.init_layers_explicit = ()
    if distilled:
        # The MLM head for an `mlm` loss: from the teacher, or "random" when it has none.
        student.mlm_head_init = "teacher"
        # A learned projection (student width -> teacher width) for the embedding/hidden/pkd
        # terms when widths differ; off, such a mismatch is refused.
        student.projection = True
    student.dtype = "float32"
    return student


def _train_section() -> ml_collections.ConfigDict:
    train = ml_collections.ConfigDict()
    train.max_steps = 0  # Per stage; 0 = from the stage's epochs.
    train.stop_after_steps = 0
    train.seed = 0
    train.log_every = 50
    train.checkpoint_every = 500
    # Two, so that a damaged latest checkpoint falls back to the one before it.
    train.keep_checkpoints = 2
    # Held-out evaluations (data.holdout_fraction > 0) of the last stage; 0 = 10 per stage.
    train.holdout_every = 0
    train.patience = 0  # Held-out evaluations without improvement before stopping; 0 = never.
    train.num_devices = 0
    # FSDP: parameters and optimizer state split over the devices by a shape rule
    # (kdjax.sharding.state_shardings) instead of replicated: the same updates, and each device
    # holds 1/N of every large array.
    train.fsdp = False
    # Micro-batches per update: the batch is split k ways, gradients accumulated, one update
    # (data.batch_size must be a multiple of k x the devices).
    train.grad_accum_steps = 1
    train.tensorboard = False
    return train


def _run_config(setting: str | None, *, method: str = "bert", fine_tuned_teacher: bool = True,
                student: ml_collections.ConfigDict | None = None,
                optim: ml_collections.ConfigDict | None = None,
                stages: dict | None = None) -> ml_collections.ConfigDict:
    """The sections of a distillation run in a setting: the teacher, the student (a BERT of the
    setting's size unless given), data, optimizer, training and the stages (name -> section)."""
    setting = setting or "half_depth"
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    spec = SETTINGS[setting]
    config = ml_collections.ConfigDict()
    config.setting = setting
    config.recipe = ""
    # Which run trains the student: bert (the engine's staged distillation of a BERT student),
    # or a method with its own student and run (kdjax/methods/: bilstm, newsbert).
    config.method = method
    config.teacher = _teacher_section(spec, fine_tuned=fine_tuned_teacher)
    config.student = student if student is not None else _bert_student_section(spec)
    config.data = data_config()
    config.data.train_limit = spec["train_limit"]
    config.data.unlabelled_rest = spec["unlabelled_rest"]
    config.data.unlabelled_file = ""  # One sentence per line: the "unlabelled" stages' corpus.
    config.optim = optim if optim is not None else optim_config(spec["lr"])
    config.train = _train_section()
    # Augmented transfer examples (kdjax/augment.py) for the task stages; none by default.
    config.augment = config_lib.augment_config("none")
    if stages is not None:
        config.stages = tuple(stages)
        for name, section in stages.items():
            config[name] = section
    return config


def distill_config(setting: str | None = "half_depth", *,
                   stages: dict | None = None) -> ml_collections.ConfigDict:
    """The sections of a staged BERT distillation run; a recipe then sets the loss weights of
    its stages (by default one stage, `distill`)."""
    return _run_config(setting, stages=stages or {"distill": stage_config()})


def bilstm_config(augment: str = "tang", *, teacher_terms: bool = True,
                  ) -> ml_collections.ConfigDict:
    """Distilled BiLSTM (Tang et al. 2019; kdjax/methods/bilstm.py): the distillation sections with a
    BiLSTM `student`, Adadelta `optim`, an `augment` section and one `distill` stage.

    Args:
      augment: the transfer set's generator: tang (masking, POS-guided replacement, n-grams),
        tinybert (embedding-neighbour replacement) or none.
      teacher_terms: alpha CE + (1 - alpha) logit MSE with alpha = 0.5 (hard labels of augmented
        examples from the teacher's argmax); False: CE on the labelled examples only.
    """
    alpha = 0.5
    weights = (dict(ce=alpha, logit_mse=1 - alpha, hard_labels_from_teacher=True)
               if teacher_terms else dict(ce=1.0))
    # Sized for a 2-core CPU: 2 passes over ~267k transfer examples, 5 over SST-2's 67k.
    stage = stage_config(epochs=2.0 if teacher_terms else 5.0, **weights)
    config = _run_config(None, method="bilstm", student=bilstm.student_section(),
                         optim=bilstm.optim_section(), stages={"distill": stage})
    config.setting = "bilstm"
    config.recipe = "bilstm"
    config.data.batch_size = 50
    config.augment = config_lib.augment_config(augment)
    return config


def kdabert_config(arg: str | None = None, *, hidden_mse: float = 0.0,
                   ) -> ml_collections.ConfigDict:
    """configs/kdabert.py (`hidden_mse` = 0) and configs/kdabert_mse.py (`hidden_mse` = 1).

    Student loss `0.5 T^2 KL (T = 2) + 0.5 CE + gamma * sum_l MSE(h_s W_h, h_t) + lambda_adv *
    sum_l L_G`: KD and CE as configs/kd.py, gamma = `hidden_mse`, lambda_adv = 0.1 (0 for the
    first 10 % of the stage, ramped in over the next 10 %), TinyBERT's uniform layer map.

    lambda_adv is gated by the student's progress (kdjax/methods/kdabert.py): 0 until the
    student's running task loss has fallen 20 % below its start, and backed off to 0 as the
    discriminators' running accuracy nears 90 %. Without the gate, in tenth_size a
    discriminator that wins outright before the student leaves its plateau held the student
    at chance (50.9 % on SST-2, results/sst2.md); with it, the student equals kd
    (results/sst2_kdabert_gate.md). The gate only ever lowers lambda_adv: while it is closed the
    student trains exactly as kd (plus the hidden-state MSE of kdabert_mse).

    Args:
      arg: `SETTING[,LOSS]`: a `SETTINGS` name (default tenth_size) and the discriminator loss
        (bce, the default; hinge; wgan_gp), which picks the discriminator section's defaults
        (`kdjax.methods.kdabert.discriminator_config`).
      hidden_mse: gamma, the weight of the hidden-state MSE.
    """
    setting, _, loss = (arg or "").partition(",")
    alpha = 0.5
    stage = stage_config(soft=alpha, ce=1 - alpha, temperature=2.0, layer_map="uniform",
                         hidden=float(hidden_mse), adversarial=0.1, adversarial_warmup=0.1,
                         adversarial_ramp=0.1, adversarial_after_loss_drop=0.2,
                         adversarial_max_d_accuracy=0.9)
    config = distill_config(setting or "tenth_size", stages={"distill": stage})
    config.recipe = "kdabert_mse" if hidden_mse else "kdabert"
    config.discriminator = kdabert.discriminator_config(loss or "bce")
    return config


def newsbert_config(setting: str | None = None) -> ml_collections.ConfigDict:
    """configs/newsbert.py: one joint teacher-student run (`kdjax.methods.newsbert`) instead of a
    teacher fine-tune and distillation stages, so the config has neither: no `stages`, no
    teacher epochs or optimizer (one `optim` trains teacher, student and head), no projection or
    MLM head. The student copies the teacher's first layers, as in the paper."""
    spec = SETTINGS[setting or "half_depth"] if (setting or "half_depth") in SETTINGS else None
    if spec is None:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    config = _run_config(setting, method="newsbert", fine_tuned_teacher=False,
                         student=_bert_student_section(spec, distilled=False))
    config.recipe = "newsbert"
    config.student.init_layers = "first"
    config.newsbert = newsbert.section(labelled_repeats=10 if config.data.unlabelled_rest else 1)
    return config

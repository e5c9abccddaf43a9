"""Distilled BiLSTM (Tang et al. 2019): the run behind `kdjax distill` for `config.method =
"bilstm"`.

fine-tuned teacher (`kdjax.engine.teachers.prepare_teachers`) -> augmented transfer set (`kdjax.augment`:
Tang's rules or TinyBERT's replacement; cached in the workdir) -> the teacher labels the whole
transfer set once (batched, jitted, cached on disk; never inside the training step) -> the
BiLSTM student trains on `alpha CE + (1 - alpha) logit MSE` with Adadelta through
`train.train_loop` -> dev evaluation, throughputs, `model/` and eval.json.

The loss is the engine's `combined_loss` with the stage's LossSpec (ce, logit_mse,
hard_labels_from_teacher): augmented examples carry label -1 and take the teacher's argmax as
their hard label. A loss without teacher terms (configs/bilstm_baseline.py) skips augmentation
and labelling and trains on the labelled examples alone.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import augment as augment_lib
from kdjax import config as config_lib, data, hf, sharding, teacher_cache, train
from kdjax import metrics as metrics_lib
from kdjax.engine import run as engine_run
from kdjax.engine.loss import LossSpec, combined_loss
from kdjax.engine.method import StudentRun
from kdjax.engine.step import student_step_metrics
from kdjax.models.bert import BertClassifier
# load_bilstm is re-exported: `from kdjax.bilstm import load_bilstm` loads a run's model/.
from kdjax.models.bilstm import (BiLSTMClassifier, BiLSTMConfig, load_bilstm,  # noqa: F401
                                 non_embedding_params, save_bilstm)



# ------------------------------------------------------------------------------------------------
# Student, optimizer and step


def build_student(config: ml_collections.ConfigDict, teacher: BertClassifier, num_labels: int,
                  tokenizer, label_names: list[str], *, pair: bool) -> BiLSTMClassifier:
    """The BiLSTM of `config.student`; with `student.init=teacher` its embedding table is a copy
    of the teacher's word-piece embeddings (the offline stand-in for Tang's word2vec)."""
    cfg = config.student
    bilstm_config = BiLSTMConfig(
        vocab_size=teacher.config.vocab_size, embedding_dim=teacher.config.hidden_size,
        hidden_size=cfg.hidden, mlp_size=cfg.mlp, num_labels=num_labels, pair=pair,
        dropout=cfg.dropout,
        skip_token_ids=tuple(sorted({tokenizer.pad_token_id, tokenizer.cls_token_id,
                                     tokenizer.sep_token_id} - {None})),
        label_names=tuple(label_names))
    student = BiLSTMClassifier(bilstm_config, rngs=nnx.Rngs(config.train.seed))
    if cfg.init == "teacher":
        # A real copy: the student's buffers are donated to each step.
        student.embed.embedding[...] = jnp.array(
            teacher.bert.embeddings.word_embeddings.embedding[...], copy=True)
    print(f"student: BiLSTM {cfg.hidden} x 2 directions, MLP {cfg.mlp}, embeddings "
          f"{bilstm_config.vocab_size} x {bilstm_config.embedding_dim} "
          f"({'from the teacher' if cfg.init == 'teacher' else 'random'}"
          f"{'' if cfg.train_embedding else ', frozen'}), "
          f"{non_embedding_params(student):,} non-embedding parameters", flush=True)
    return student


def make_optimizer(optim_config: ml_collections.ConfigDict, *,
                   train_embedding: bool = True) -> optax.GradientTransformation:
    """Tang et al.'s Adadelta (lr 1.0, rho 0.95) with optional global-norm clipping; with
    `train_embedding=False` the embedding table gets no updates (and no optimizer state)."""
    tx = optax.adadelta(optim_config.lr, rho=optim_config.rho, eps=optim_config.eps)
    if optim_config.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), tx)
    if train_embedding:
        return tx

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if any(getattr(k, "key", None) == "embed" for k in path)
            else "trained", params)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def bilstm_step(state: train.TrainState, batch: dict, dropout_base_key: jax.Array, *,
                spec: LossSpec, grad_accum_steps: int = 1,
                layout: sharding.Layout | None = None,
                ) -> tuple[train.TrainState, dict]:
    """One student update on a (global) batch.

    The teacher never runs here: its logits for the batch arrive in `batch["teacher_logits"]`
    ([B, K, C], K teachers), read from the transfer set's one-off labelling.

    Args:
      state: the BiLSTM's TrainState (donated by the jitted version).
      batch: input_ids, attention_mask, token_type_ids [B, L]; labels (-1 = augmented),
        weights [B]; teacher_logits [B, K, C] when the loss uses the teacher.
      dropout_base_key: the run's key; the step's key is folded from it and the step.
      spec: the static loss (ce, logit_mse, hard_labels_from_teacher).
      grad_accum_steps: micro-batches per update (`train.accumulate_gradients`).

    Returns:
      (new state, metric sums).
    """
    dropout_key = jax.random.fold_in(dropout_base_key, state.step)

    def micro_step(params, batch, dropout_key):
        teacher_out = None
        if spec.uses_teacher:
            teacher_out = {"logits": jnp.moveaxis(batch["teacher_logits"], 1, 0)}  # [K, B, C]

        def loss_fn(params):
            model = nnx.merge(state.graphdef, params)
            out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                        dropout_key=dropout_key)
            loss, metrics = combined_loss(spec, out, teacher_out, batch, state.step)
            return loss, (metrics, out.logits)

        (loss, (metrics, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, student_step_metrics(metrics, loss, logits, batch, grads)

    grads, metrics = train.accumulate_gradients(micro_step, state.params, batch,
                                                grad_accum_steps, dropout_key, layout)
    return train.apply_gradients(state, grads), metrics


# ------------------------------------------------------------------------------------------------
# The transfer set and its labels (both cached: kdjax/teacher_cache.py, WORKDIR/cache)


def teacher_logits(teacher_dirs: list[pathlib.Path], teachers: list[BertClassifier],
                   split: data.EncodedSplit, *, batch_size: int, buckets, mesh: Mesh,
                   cache_dir: pathlib.Path, teacher_dtype: str = "float32",
                   ) -> tuple[np.ndarray, dict]:
    """Every teacher's logits for every example of `split`: [N, K, C], computed once.

    Batched, jitted, sharded inference; stored by the shared teacher-output cache
    (`teacher_cache.load_or_compute`, keyed by the teachers' weights and the split's token
    arrays) in `cache_dir` and read back by later calls instead of running the teachers again.

    Returns:
      (logits, info) with info = {seconds, examples_per_s, cached, path}; seconds and
      examples_per_s are those of the run that computed them.
    """
    cache = teacher_cache.load_or_compute(teacher_dirs, teachers, split, mesh=mesh,
                                          cache_dir=cache_dir, batch_size=batch_size,
                                          buckets=buckets, teacher_dtype=teacher_dtype,
                                          description="the transfer set")
    return cache.logits, _labelling_info(cache)


def _labelling_info(cache: teacher_cache.TeacherCache) -> dict:
    return {"seconds": cache.manifest["seconds"],
            "examples_per_s": cache.manifest["examples_per_s"],
            "cached": not cache.computed, "path": str(cache.directory)}


# ------------------------------------------------------------------------------------------------
# The run


def check_config(config: ml_collections.ConfigDict, methods=()) -> None:
    """Cross-field checks `config.validate` cannot express, before any work starts: with the
    loss `methods`, also the terms a BiLSTM cannot learn from (`check_terms`).

    Raises:
      config_lib.ConfigError: naming the key.
    """
    if config.student.hidden < 1:
        raise config_lib.ConfigError(f"config key 'student.hidden' must be >= 1 for the BiLSTM "
                                     f"(its LSTM width), got {config.student.hidden}")
    if config.optim.get("name") != "adadelta":
        raise config_lib.ConfigError(f"config key 'optim.name' must be 'adadelta' for "
                                     f"method=bilstm, got {config.optim.get('name')!r}")
    cfg = config.augment
    if cfg.p_mask + cfg.p_pos > 1:
        raise config_lib.ConfigError(
            f"config keys 'augment.p_mask' + 'augment.p_pos' must be <= 1, got "
            f"{cfg.p_mask} + {cfg.p_pos}")
    if len(config.stages) != 1:
        raise config_lib.ConfigError(f"config key 'stages' must name one stage for "
                                     f"method=bilstm, got {tuple(config.stages)}")
    stage = config[config.stages[0]]
    check_terms(LossSpec.from_config(stage.loss, methods=methods, student_layers=1,
                                     teacher_layers=1), config.stages[0])
    if stage.teacher != "finetuned":
        raise config_lib.ConfigError(f"config key '{config.stages[0]}.teacher' must be "
                                     "'finetuned' for method=bilstm")


def check_terms(spec: LossSpec, stage_name: str) -> None:
    """Refuses terms that read what a BiLSTM does not have (hidden states, attention, Q/K/V,
    an MLM head): only terms on logits can teach it.

    Raises:
      config_lib.ConfigError: naming the term's config key.
    """
    for method in spec.methods:
        needs = method.needs(spec)
        if (needs.student_hidden or needs.student_attention or needs.student_qkv
                or needs.student_mlm_head or method.changes_update):
            terms = [t for t in method.TERMS if getattr(method, t)]
            raise config_lib.ConfigError(
                f"config key '{stage_name}.loss.{terms[0]}' needs BERT hidden states, "
                "attention or an MLM head, which the BiLSTM student does not have; use ce, "
                "logit_mse, soft or soft_ce")


def _finish(config, workdir: pathlib.Path, student: BiLSTMClassifier, teachers, inputs, mesh,
            log, train_seconds: float, stages: dict, measure_throughput: bool,
            extra: dict) -> dict:
    """Dev evaluation, teacher agreement and throughputs (the keys of every distillation run);
    saves the student to model/ and eval.json."""
    result = engine_run.evaluate_student(
        config, student, teachers, inputs, mesh, measure_throughput=measure_throughput,
        student_layers=1, student_hidden=student.config.hidden_size,
        student_non_embedding_params=non_embedding_params(student),
        train_seconds=train_seconds, stages=stages,
        logits_path=workdir / metrics_lib.DEV_LOGITS_FILE)
    result.update(extra)
    if measure_throughput:
        result["speedup"] = result["student_examples_per_s"] / result["teacher_examples_per_s"]
    save_bilstm(student, workdir / "model", tokenizer=inputs.tokenizer,
                extra={"kdjax_config": config_lib.to_dict(config), "dev": result})
    engine_run.write_result(workdir, log, result)
    return result

# ------------------------------------------------------------------------------------------------
# Config sections (kdjax.recipes.bilstm_config)


def _trained_model(state):
    return state.model()


class BiLSTMRun(StudentRun):
    """Fine-tuned teacher -> augmented transfer set -> teacher labels -> BiLSTM -> evaluation.

    Resumable like the staged BERT run: the teacher run, the augmented set, the teacher's labels
    and the stage's checkpoints are reused. Writes to the workdir: teacher-seedN/, cache/
    (augmented-HASH.npz, teacher-outputs-KEY/), stages/NAME/checkpoints (Orbax),
    metrics.jsonl, config.json, labels.json, model/ (`load_bilstm`) and eval.json, whose keys
    are `kdjax.engine.run.evaluate_student`'s (student_layers=1, student_hidden=LSTM width)
    plus augmented_examples, augmented_examples_per_s, transfer_examples and
    teacher_labelling_seconds.
    """

    NAME = "bilstm"

    def start(self) -> None:
        run, config = self.run, self.run.config
        check_config(config, run.methods)
        stage = config[config.stages[0]]
        self.spec = spec = LossSpec.from_config(stage.loss, methods=run.methods,
                                                student_layers=1, teacher_layers=1)
        teacher_dirs, inputs = engine_run.start_task(config, run.workdir, progress=run.progress)
        self.inputs = inputs
        self.teachers = teachers = [hf.load_pretrained(str(d), dtype=config.teacher.dtype)[0]
                                    for d in teacher_dirs]
        engine_run.write_run_files(config, run.workdir, inputs.task.label_names)

        # The transfer set: the labelled examples (plus the unlabelled rest of a few-labels
        # run), then the augmented copies; without a teacher term, the labelled examples alone.
        split = inputs.train
        self.extra = extra = {"augmented_examples": 0, "augmented_examples_per_s": None,
                              "transfer_examples": 0, "teacher_labelling_seconds": 0.0}
        if spec.uses_teacher:
            if config.data.unlabelled_rest and len(inputs.unlabelled_rest):
                split = data.concatenate([split, inputs.unlabelled_rest])
            if config.augment.method != "none":
                # The labelled examples train.prepare_task kept (held-out slice excluded).
                source = inputs.train_examples
                augmented, info = augment_lib.augmented_split(
                    config, source, inputs.tokenizer, teachers[0], run.workdir / "cache",
                    inputs.max_length, progress=run.progress)
                extra.update(augmented_examples=info["augmented_examples"],
                             augmented_examples_per_s=info["augmented_examples_per_s"])
                split = data.concatenate([split, augmented])
        extra["transfer_examples"] = len(split)

        self.batcher = data.Batcher(split, config.data.batch_size, buckets=inputs.buckets,
                                    shuffle=True, seed=config.train.seed)
        if spec.uses_teacher:
            # The step never runs the teacher, so its logits are always cached (teacher.cache
            # cannot turn that off here); teacher.cache_dir picks where.
            cache = teacher_cache.load_or_compute(
                teacher_dirs, teachers, split, mesh=run.mesh,
                cache_dir=teacher_cache.cache_directory(config, run.workdir),
                batch_size=config.data.eval_batch_size, buckets=inputs.buckets,
                teacher_dtype=config.teacher.dtype, max_gb=config.teacher.cache_max_gb,
                description="the transfer set", progress=run.progress)
            extra["teacher_labelling_seconds"] = _labelling_info(cache)["seconds"]
            self.batcher = teacher_cache.CachedTeacherBatcher(self.batcher, cache)
        self.student = build_student(config, teachers[0], inputs.task.num_labels,
                                     inputs.tokenizer, inputs.class_names,
                                     pair=inputs.task.is_pair)

    def stage_names(self) -> tuple[str, ...]:
        return (self.run.config.stages[0],)

    def init_stage(self, name: str) -> engine_run.Stage:
        run, config, batcher = self.run, self.run.config, self.batcher
        stage = config[name]
        total_steps = config.train.max_steps or max(
            1, math.ceil(stage.epochs * batcher.num_batches))
        optim_config = ml_collections.ConfigDict(config.optim.to_dict())
        optim_config.lr = stage.lr or config.optim.lr
        tx = make_optimizer(optim_config, train_embedding=config.student.train_embedding)
        fsdp = config.train.get("fsdp", False)
        state = sharding.place_state(train.TrainState.create(self.student, tx), run.mesh,
                                     fsdp=fsdp)
        step_fn = train.make_train_step(
            run.mesh, functools.partial(bilstm_step, spec=self.spec), fsdp=fsdp,
            grad_accum_steps=config.train.get("grad_accum_steps", 1))
        print(f"stage {name}: {total_steps} steps over {len(batcher.split):,} examples "
              f"({len(self.inputs.train):,} labelled), terms {self.spec.term_names}", flush=True)
        return engine_run.Stage(name=name, state=state, loop_step=step_fn,
                                total_steps=total_steps, batcher=batcher, spec=self.spec,
                                lr_at=optax.constant_schedule(optim_config.lr),
                                optim_config=optim_config,
                                selection=train.holdout_selection(
                                    config, self.inputs.holdout, engine_run.classifier_score(
                                        config, self.inputs, run.mesh, _trained_model)))

    def end_stage(self, name: str, state) -> None:
        self.student = state.model()

    def finish(self) -> dict:
        run = self.run
        return _finish(run.config, run.workdir, self.student, self.teachers, self.inputs,
                       run.mesh, run.log, run.train_seconds, run.stages, run.measure_throughput,
                       self.extra)



def student_section() -> ml_collections.ConfigDict:
    """The BiLSTM student's `student` section."""
    section = ml_collections.ConfigDict()
    section.layers = 1  # One BiLSTM layer (reported as student_layers).
    section.hidden = 150  # LSTM width per direction (Tang et al., SST-2).
    section.mlp = 200  # ReLU hidden layer of the classifier.
    section.dropout = 0.1
    # Embedding table: teacher = a copy of the fine-tuned teacher's 384-d word-piece embeddings
    # (Tang's 300-d word2vec is not available offline); random = learned from scratch.
    section.init = "teacher"
    section.train_embedding = True
    return section


def optim_section() -> ml_collections.ConfigDict:
    """Tang et al.'s Adadelta `optim` section."""
    section = ml_collections.ConfigDict()
    section.name = "adadelta"
    section.lr = 1.0
    section.rho = 0.95
    section.eps = 1e-6
    section.grad_clip = 0.0  # 0 = off (Tang et al. do not clip).
    return section


# The distilled BiLSTM's student and optimizer (configs/bilstm*.py).
CONFIG_RULES = (
    ("student.mlp", lambda v: v >= 1, "must be >= 1"),
    ("student.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.rho", lambda v: 0 < v < 1, "must be in (0, 1)"),
)

RUN = BiLSTMRun

"""NewsBERT (Wu et al. 2021): teacher and student trained jointly, with momentum distillation.

Unlike the other recipes, the teacher is not fine-tuned first and then frozen: it starts from the
pretrained checkpoint `config.teacher.name` and learns the task in the same steps as the student.
Both are BERT classifiers that share one pooling layer and one classifier (`NewsBertPair`); the
student starts from the teacher's first layers. One step (`newsbert_step`):

1. teacher forward (with dropout: the teacher is training) -> teacher loss `CE(y_t, y)`;
2. student forward -> student loss `MSE(E_t, E_s) + sum_i MSE(H_t[iK], H_s[i]) +
   MSE(pool_t, pool_s) + CE(softmax(y_t / t), y_s / t) + CE(y_s, y)`, every teacher value under
   stop_gradient (the engine's `combined_loss` with a pooled-output term);
3. one gradient of the weighted sum over the joint parameters: teacher parameters get the
   teacher loss's gradient only (the stop_gradient), student parameters the student loss's,
   and the shared pooler/classifier the sum of both;
4. momentum distillation (`momentum_mix`): student layer k's gradient becomes
   `beta * mean(teacher gradients of block k) + (1 - beta) * its own`, block k being the K
   teacher layers (k-1)K+1 .. kK (K = teacher layers / student layers); embeddings unmixed;
5. one AdamW update of everything.

The teacher's single forward pass serves both its own loss and the student's targets (METHODS.md:
compute it once per batch), so the targets carry the teacher's training-time dropout.

`NewsBertRun` is its student and update for the engine's one run (`config.method = "newsbert"`,
see configs/newsbert.py): it writes the usual distillation workdir (config.json, labels.json, metrics.jsonl, stages/joint/checkpoints,
model/ = the student, eval.json) plus teacher_model/, the jointly fine-tuned teacher.

Reference: Wu et al. 2021, NewsBERT: Distilling Pre-trained Language Model for Intelligent News
Application (Findings of EMNLP 2021); METHODS.md section 7.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import data, hf, losses, optim, sharding, train
from kdjax.engine import run as engine_run
from kdjax.engine.loss import LossSpec, combined_loss
from kdjax.engine.method import DistillError, StudentRun
from kdjax.engine.students import build_student, student_config
from kdjax.methods.kd import KD
from kdjax.methods.tinybert import TinyBERT
from kdjax.models.bert import BertClassifier, BertConfig, BertOutput

# Loss terms of the student (weights in the config's `newsbert` section).
STUDENT_TERMS = ("embedding", "hidden", "pooled", "soft_ce", "ce")


# ------------------------------------------------------------------------------------------------
# The joint model


class SharedHead(nnx.Module):
    """The pooling layer and classifier both models use: one set of parameters."""

    def __init__(self, pooler: nnx.Module, classifier: nnx.Module):
        self.pooler = pooler
        self.classifier = classifier


class NewsBertPair(nnx.Module):
    """Teacher and student classifiers whose pooler and classifier are the same NNX objects.

    NNX splits a shared object once, so `nnx.split(pair, nnx.Param)` holds the shared parameters
    once, under `shared` (the traversal visits attributes in sorted order, and `shared` comes
    before `student` and `teacher`); merging restores the sharing. `teacher` and `student` stay
    complete `BertClassifier`s: each runs, evaluates and exports on its own.
    """

    def __init__(self, teacher: BertClassifier, student: BertClassifier):
        if teacher.num_labels != student.num_labels:
            raise DistillError(f"teacher and student must have the same labels to share a "
                               f"classifier ({teacher.num_labels} vs {student.num_labels})")
        check_architecture(student.config, teacher.config)
        student.bert.pooler = teacher.bert.pooler
        student.classifier = teacher.classifier
        self.shared = SharedHead(teacher.bert.pooler, teacher.classifier)
        self.teacher = teacher
        self.student = student


def check_architecture(student: BertConfig, teacher: BertConfig) -> int:
    """The block size K = teacher layers / student layers, after refusing what cannot work.

    Raises:
      DistillError: different widths (no shared pooler, no gradient mixing without projections)
        or a student depth that does not divide the teacher's.
    """
    for field, what in (("hidden_size", "student.hidden"),
                        ("intermediate_size", "student.intermediate"),
                        ("num_attention_heads", "student.heads"),
                        ("vocab_size", "the vocabulary")):
        s, t = getattr(student, field), getattr(teacher, field)
        if s != t:
            raise DistillError(
                f"newsbert needs the student as wide as the teacher: {field} is {s} for the "
                f"student and {t} for the teacher ({what}). The shared pooler/classifier and the "
                "momentum mixing of layer gradients need equal shapes (no projections are "
                "implemented); use the half_depth or few_labels setting, or set "
                f"{what}=0")
    n, m = teacher.num_hidden_layers, student.num_hidden_layers
    if not 1 <= m <= n or n % m:
        raise DistillError(f"newsbert needs student.layers to divide the teacher's {n} layers "
                           f"(got {m}): student layer k learns from the block of K = {n}/M "
                           "teacher layers (k-1)K+1..kK")
    return n // m


# ------------------------------------------------------------------------------------------------
# Momentum distillation


def momentum_mix(grads_student_layers: Sequence, grads_teacher_layers: Sequence, beta: float,
                 block: int) -> list:
    """NewsBERT's momentum distillation on raw per-layer gradients.

    `g_s_k <- beta * mean_{j in block k} g_t_j + (1 - beta) * g_s_k`, block k (0-based) being
    teacher layers k*K .. k*K + K - 1.

    Args:
      grads_student_layers: M per-layer gradient pytrees (student layer order).
      grads_teacher_layers: M * K per-layer gradient pytrees of the same structure.
      beta: weight of the teacher's block gradient, in [0, 1] (0 = plain student gradients).
      block: K, teacher layers per student layer.

    Returns:
      A list of M mixed gradient pytrees.

    Raises:
      DistillError: the teacher does not have M * K layers.
    """
    m, n = len(grads_student_layers), len(grads_teacher_layers)
    if n != m * block:
        raise DistillError(f"momentum_mix: {n} teacher layers for {m} student layers with "
                           f"block size {block}; need {m * block}")
    mixed = []
    for k, student_grad in enumerate(grads_student_layers):
        teacher_block = grads_teacher_layers[k * block:(k + 1) * block]
        mixed.append(jax.tree.map(
            lambda s, *ts: beta * (sum(ts) / block) + (1.0 - beta) * s,
            student_grad, *teacher_block))
    return mixed


def mix_student_layer_grads(grads: nnx.State, beta: float, block: int) -> nnx.State:
    """`momentum_mix` applied to a `NewsBertPair`'s gradient state; everything else (embeddings,
    the shared head, the teacher) is returned unchanged."""
    student_layers = grads["student"]["bert"]["layers"]
    teacher_layers = grads["teacher"]["bert"]["layers"]
    mixed = momentum_mix([student_layers[i] for i in range(len(student_layers))],
                         [teacher_layers[i] for i in range(len(teacher_layers))], beta, block)
    out = jax.tree.map(lambda g: g, grads)  # A new tree, so the caller's is not mutated.
    for i, layer in enumerate(mixed):
        out["student"]["bert"]["layers"][i] = layer
    return out


# ------------------------------------------------------------------------------------------------
# The losses and the step


def pooled_mse(student_out: BertOutput, teacher_out: dict, batch: dict) -> jax.Array:
    """MSE(pool_t, pool_s) per example, averaged over the hidden dimension. [B]"""
    del batch
    return losses.hidden_mse(student_out.pooled[:, None], teacher_out["pooled"][:, None])


@dataclasses.dataclass(frozen=True)
class NewsBertSpec:
    """Static description of the joint step (hashable: the jitted step specialises on it).

    `student_loss` is a `LossSpec` holding the embedding, hidden (pairs m <-> mK), soft
    cross-entropy and CE terms, with the pooled-output term as an extra term.
    """

    student_loss: LossSpec
    teacher_ce: float = 1.0
    beta: float = 0.5
    block: int = 1

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict, *, student_layers: int,
                    teacher_layers: int, total_steps: int = 1) -> "NewsBertSpec":
        """From the config's `newsbert` section (see configs/newsbert.py)."""
        if student_layers < 1 or teacher_layers % student_layers:
            raise DistillError(f"newsbert needs student.layers to divide the teacher's "
                               f"{teacher_layers} layers (got {student_layers})")
        block = teacher_layers // student_layers
        methods = (KD(ce=section.ce, soft_ce=section.soft_ce),
                   TinyBERT(embedding=section.embedding, hidden=section.hidden))
        student_loss = LossSpec(
            methods=tuple(m for m in methods if m.active), temperature=section.temperature,
            total_steps=total_steps, student_layers=student_layers,
            teacher_layers=teacher_layers,
            layer_pairs=tuple((m, m * block) for m in range(1, student_layers + 1)),
            extra_terms=(("pooled", float(section.pooled), pooled_mse),) if section.pooled
            else ())
        return cls(student_loss=student_loss, teacher_ce=section.teacher_ce, beta=section.beta,
                   block=block)


def _inputs(batch: dict) -> tuple:
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def joint_grads(params: nnx.State, graphdef: nnx.GraphDef, batch: dict,
                dropout_key: jax.Array | None, step: jax.Array, spec: NewsBertSpec,
                ) -> tuple[nnx.State, dict]:
    """Gradients of `teacher_ce * teacher loss + student loss` over the joint parameters, before
    momentum mixing.

    One gradient of the sum equals the sum of the two losses' gradients: the student loss sees
    the teacher only through stop_gradient, so teacher parameters get the teacher loss's
    gradient alone, and the shared head gets both.

    Args:
      params: the `NewsBertPair`'s parameters.
      graphdef: its graph definition.
      batch: input_ids, attention_mask, token_type_ids [B, L]; labels (-1 = unlabelled),
        weights [B].
      dropout_key: None runs both models deterministically.
      step: the global step (for the student loss's schedules).
      spec: the static step description.

    Returns:
      (gradients, metric sums with teacher/student logits under `teacher_logits`/`logits`).
    """
    teacher_key = student_key = None
    if dropout_key is not None:
        teacher_key, student_key = jax.random.split(dropout_key)
    rows = batch["weights"]
    labelled = rows * (batch["labels"] >= 0)

    def loss_fn(params):
        pair = nnx.merge(graphdef, params)
        teacher_out = pair.teacher(*_inputs(batch), dropout_key=teacher_key,
                                   output_hidden_states=True)
        teacher_ce = losses.hard_cross_entropy(teacher_out.logits, batch["labels"])  # [B]
        teacher_loss = jnp.sum(teacher_ce * labelled) / jnp.maximum(jnp.sum(labelled), 1.0)
        targets = jax.lax.stop_gradient({"logits": teacher_out.logits[None],  # [1, B, C]
                                         "hidden_states": teacher_out.hidden_states,
                                         "pooled": teacher_out.pooled})
        student_out = pair.student(*_inputs(batch), dropout_key=student_key,
                                   output_hidden_states=True)
        student_loss, metrics = combined_loss(spec.student_loss, student_out, targets, batch,
                                             step)
        metrics.update(teacher_ce_sum=jnp.sum(teacher_ce * labelled),
                       teacher_ce_count=jnp.sum(labelled),
                       student_loss_sum=student_loss * jnp.sum(rows),
                       teacher_logits=teacher_out.logits, logits=student_out.logits)
        return spec.teacher_ce * teacher_loss + student_loss, metrics

    (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics["loss_sum"] = total * jnp.sum(rows)
    return grads, metrics


def newsbert_step(state: train.TrainState, batch: dict, dropout_base_key: jax.Array, *,
                  spec: NewsBertSpec, grad_accum_steps: int = 1,
                  layout: sharding.Layout | None = None,
                  ) -> tuple[train.TrainState, dict]:
    """One joint update of teacher, student and shared head (see the module docstring).

    Args:
      state: the `NewsBertPair`'s TrainState (donated by the jitted version).
      batch: a (global) batch; labels -1 mark unlabelled examples (student distillation terms
        only).
      dropout_base_key: the run's key; the step's keys are folded from it and the step.
      spec: the static step description.
      grad_accum_steps: micro-batches per update (`train.accumulate_gradients`); the mixing is
        linear, so it is applied once to the accumulated gradient.

    Returns:
      (new state, metric sums): loss (the weighted total), teacher_ce, student_loss, each
      student term, student `correct`, `teacher_accuracy`, grad_norm (after mixing).
    """
    dropout_key = jax.random.fold_in(dropout_base_key, state.step)

    def micro_step(params, batch, dropout_key):
        grads, metrics = joint_grads(params, state.graphdef, batch, dropout_key, state.step,
                                     spec)
        rows, labels = batch["weights"], batch["labels"]
        labelled = rows * (labels >= 0)
        student_logits, teacher_logits = metrics.pop("logits"), metrics.pop("teacher_logits")
        metrics.update(count=jnp.sum(rows),
                       correct=jnp.sum((jnp.argmax(student_logits, -1) == labels) * rows),
                       teacher_accuracy_sum=jnp.sum((jnp.argmax(teacher_logits, -1) == labels)
                                                    * labelled),
                       teacher_accuracy_count=jnp.sum(labelled))
        return grads, metrics

    grads, metrics = train.accumulate_gradients(micro_step, state.params, batch,
                                                grad_accum_steps, dropout_key, layout)
    grads = mix_student_layer_grads(grads, spec.beta, spec.block)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return train.apply_gradients(state, grads), metrics


def make_newsbert_step(mesh: Mesh, spec: NewsBertSpec, step_fn: Callable = newsbert_step, *,
                       fsdp: bool = False, grad_accum_steps: int = 1) -> Callable:
    """`step_fn` jitted over `mesh` for `spec`: batch split over `data`, state replicated (or
    FSDP-split) and donated, `grad_accum_steps` micro-batches per update. Call it as
    `step(state, batch, dropout_key)`."""
    return train.make_train_step(mesh, functools.partial(step_fn, spec=spec), fsdp=fsdp,
                                 grad_accum_steps=grad_accum_steps)


# ------------------------------------------------------------------------------------------------
# The run


def _training_split(config, inputs: train.TaskInputs) -> data.EncodedSplit:
    """The labelled set (repeated `newsbert.labelled_repeats` times when there is a transfer
    set), plus the unlabelled rest when `data.unlabelled_rest`: unlabelled rows train the
    student's distillation terms only."""
    rest = inputs.unlabelled_rest
    if config.data.unlabelled_rest and rest is not None and len(rest):
        return data.concatenate([inputs.train] * config.newsbert.labelled_repeats + [rest])
    return inputs.train


class NewsBertRun(StudentRun):
    """Pretrained teacher + student from its first layers -> joint training -> evaluation ->
    both saved.

    Resumable: an interrupted run resumes from stages/joint/checkpoints. Writes config.json,
    labels.json, metrics.jsonl, model/ (the student), teacher_model/ (the jointly fine-tuned
    teacher), both Hugging Face directories, and eval.json, with the keys of every
    distillation run (`kdjax.engine.run.evaluate_student`); `teacher_accuracy` is the jointly
    trained teacher's dev accuracy.

    Raises (at `start`):
      DistillError: a student of another width, a depth not dividing the teacher's, or a
        teacher ensemble (teacher.seeds / teacher.extra), which joint training has no place for.
    """

    NAME = "newsbert"

    def start(self) -> None:
        run, config = self.run, self.run.config
        if len(config.teacher.seeds) != 1 or config.teacher.extra:
            raise DistillError("newsbert trains one teacher jointly with the student; set one "
                               "teacher.seeds entry and no teacher.extra")
        # Refuse an impossible architecture before tokenising anything.
        teacher_arch, _ = hf.read_config(hf.resolve_checkpoint(config.teacher.name))
        cfg = config.student
        student_arch = student_config(teacher_arch, layers=cfg.layers, hidden=cfg.hidden,
                                      heads=cfg.heads, intermediate=cfg.intermediate)
        check_architecture(student_arch, teacher_arch)

        self.inputs = inputs = train.prepare_task(ml_collections.ConfigDict(
            {"model": {"name": config.teacher.name}, "data": config.data.to_dict()}))
        num_labels = inputs.task.num_labels
        # The pretrained checkpoint: fine-tuned by the joint training itself, not beforehand.
        teacher, report, _ = hf.load_pretrained(str(inputs.checkpoint_dir),
                                                num_labels=num_labels,
                                                dtype=config.teacher.dtype,
                                                seed=config.train.seed)
        print(report.summary(), flush=True)
        student = build_student(config, teacher, num_labels, mlm_head=False)
        self.pair = NewsBertPair(teacher, student)
        engine_run.write_run_files(config, run.workdir, inputs.task.label_names)

    def stage_names(self) -> tuple[str, ...]:
        return ("joint",)

    def init_stage(self, name: str) -> engine_run.Stage:
        run, config, pair = self.run, self.run.config, self.pair
        split = _training_split(config, self.inputs)
        batcher = data.Batcher(split, config.data.batch_size, buckets=self.inputs.buckets,
                               shuffle=True, seed=config.train.seed)
        total_steps = config.train.max_steps or max(
            1, math.ceil(config.newsbert.epochs * batcher.num_batches))
        spec = NewsBertSpec.from_config(config.newsbert,
                                        student_layers=pair.student.config.num_hidden_layers,
                                        teacher_layers=pair.teacher.config.num_hidden_layers,
                                        total_steps=total_steps)
        tx = optim.make_optimizer(config.optim, total_steps)
        fsdp = config.train.get("fsdp", False)
        state = sharding.place_state(train.TrainState.create(pair, tx), run.mesh, fsdp=fsdp)
        self.pair = None  # The state holds the parameters now.
        print(f"newsbert: {total_steps} joint steps over {len(split)} examples, block K = "
              f"{spec.block}, beta = {spec.beta}", flush=True)
        step = make_newsbert_step(run.mesh, spec, fsdp=fsdp,
                                  grad_accum_steps=config.train.get("grad_accum_steps", 1))
        return engine_run.Stage(
            name=name, state=state, loop_step=step, total_steps=total_steps, batcher=batcher,
            lr_at=optim.warmup_linear_decay(config.optim.lr, total_steps,
                                            config.optim.warmup_ratio),
            # The pair (teacher and student) is kept at the step where the student scored best.
            selection=train.holdout_selection(config, self.inputs.holdout,
                                              engine_run.classifier_score(
                                                  config, self.inputs, run.mesh, _student_of)))

    def end_stage(self, name: str, state) -> None:
        self.pair = state.model()

    def finish(self) -> dict:
        run, pair, inputs = self.run, self.pair, self.inputs
        hf.save_pretrained(pair.teacher, run.workdir / "teacher_model",
                           label_names=inputs.class_names, tokenizer=inputs.tokenizer,
                           extra={"kdjax_config": run.config.to_dict(),
                                  "role": "newsbert teacher, trained jointly with model/"})
        return engine_run.finish(run.config, run.workdir, pair.student, [pair.teacher], inputs,
                                 run.mesh, run.log, run.train_seconds, run.stages,
                                 run.measure_throughput)


def _student_of(state):
    return state.model().student


def section(*, labelled_repeats: int = 1) -> ml_collections.ConfigDict:
    """The `newsbert` config section (configs/newsbert.py)."""
    newsbert = ml_collections.ConfigDict()
    # Momentum distillation weight of the teacher's block gradient. Not published: 0.5 is our
    # choice (METHODS.md); 0 turns momentum distillation off.
    newsbert.beta = 0.5
    # Soft cross-entropy temperature. 1 (TinyBERT's prediction loss, whose form NewsBERT's
    # CE(y_t/t, y_s/t) follows): the loss has no t^2 factor, so a larger t would also shrink the
    # term's gradient by ~1/t^2, and the teacher starts from a pretrained checkpoint with a new
    # classifier, whose early logits are already nearly uniform; softening them further carries
    # no extra signal.
    newsbert.temperature = 1.0
    # Term weights (0 = off). teacher_ce: the teacher's loss; the rest: the student's.
    newsbert.teacher_ce = 1.0
    newsbert.embedding = 1.0
    newsbert.hidden = 1.0
    newsbert.pooled = 1.0
    newsbert.soft_ce = 1.0
    newsbert.ce = 1.0
    # Passes over the training split (train.max_steps, when set, overrides it).
    newsbert.epochs = 1.0
    # With a transfer set (few_labels: 1,000 labelled + the rest unlabelled) the labelled rows
    # are repeated this many times per epoch, so the teacher, which only learns from labels,
    # sees them as often as the other recipes' teachers do (10 epochs on the 1,000).
    newsbert.labelled_repeats = labelled_repeats
    return newsbert


# NewsBERT's joint-training section (configs/newsbert.py).
CONFIG_RULES = (
    ("newsbert.beta", lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = no momentum distillation)"),
    ("newsbert.temperature", lambda v: v > 0, "must be > 0"),
    ("newsbert.epochs", lambda v: v > 0, "must be > 0"),
    ("newsbert.labelled_repeats", lambda v: v >= 1, "must be >= 1"),
) + tuple((f"newsbert.{term}", lambda v: v >= 0, "must be >= 0 (0 = off)")
          for term in ("teacher_ce", "embedding", "hidden", "pooled", "soft_ce", "ce"))

RUN = NewsBertRun

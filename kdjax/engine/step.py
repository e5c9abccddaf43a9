"""The student update step: teacher outputs (forward pass or cache, outside the gradient) ->
student forward -> combined loss -> optimizer, with gradient accumulation, jitted over the mesh.

A step is a pure function `(state, teachers, batch, key) -> (state, metric sums)`; its loss is
described by a static `LossSpec`, so one jitted program serves a stage.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import sharding, train
from kdjax.engine.loss import LossSpec, combined_loss
from kdjax.engine.students import DistillStudent
from kdjax.engine.teachers import Teachers, cached_teacher_outputs, model_inputs, teacher_forward


def step_batch_and_dropout(spec: LossSpec, batch: dict, dropout_base_key: jax.Array,
                           step: jax.Array) -> tuple[dict, jax.Array]:
    """The dropout key of student step `step` and its batch as the methods need it (each
    method's `prepare_batch`, e.g. DistilBERT's masking, drawn from the step's second key).

    Every step kind that trains a `DistillStudent` derives them this way, so that two steps on
    the same batch (KDABert's feature pass and its student update) see the same masks."""
    key = jax.random.fold_in(dropout_base_key, step)
    dropout_key, batch_key = jax.random.split(key)
    for method in spec.methods:
        batch = method.prepare_batch(spec, batch, batch_key)
    return batch, dropout_key


def student_forward(student: DistillStudent, batch: dict, dropout_key: jax.Array,
                    spec: LossSpec):
    """The student's training forward pass with the activations `spec`'s methods read."""
    needs = spec.needs
    return student.model(*model_inputs(batch), dropout_key=dropout_key,
                         output_hidden_states=needs.student_hidden,
                         output_attentions=needs.student_attention,
                         output_qkv=needs.student_qkv)


def teacher_outputs(spec: LossSpec, teachers: Teachers | None, batch: dict) -> dict | None:
    """The teachers' outputs for `batch`: read from the batch when it carries cached ones
    (`teacher_cache.CachedTeacherBatcher`), else a forward pass of what `spec` needs."""
    if "teacher_logits" in batch:
        return cached_teacher_outputs(batch, spec.cached_hidden_layers)
    if spec.uses_teacher:
        return teacher_forward(teachers, batch, spec.needs)
    return None


def student_step_metrics(metrics: dict, loss: jax.Array, logits: jax.Array, batch: dict,
                         grads: nnx.State) -> dict:
    """`metrics` plus the sums the training loop reports for every student step: loss, count,
    correct (labelled rows) and the gradient norm."""
    rows = batch["weights"]
    return {**metrics, "loss_sum": loss * jnp.sum(rows), "count": jnp.sum(rows),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * rows),
            "grad_norm": optax.tree.norm(grads)}


def distill_step(state: train.TrainState, teachers: Teachers | None, batch: dict,
                 dropout_base_key: jax.Array, *, spec: LossSpec, grad_accum_steps: int = 1,
                 layout: sharding.Layout | None = None) -> tuple[train.TrainState, dict]:
    """One student update: teacher outputs (outside the gradient) -> student loss -> optimizer.

    Args:
      state: the `DistillStudent`'s TrainState (donated by the jitted version).
      teachers: the frozen teachers (None when the loss uses no teacher or the batch carries
        cached teacher outputs).
      batch: a (global) batch; labels -1 mark unlabelled examples. With `teacher_logits`
        [B, K, C] (and `teacher_hidden` [B, S, L, H]) the teacher does not run.
      dropout_base_key: the run's key; the step's keys are folded from it and the step.
      spec: the static loss description.
      grad_accum_steps: micro-batches per update (`train.accumulate_gradients`); the methods'
        batch preparation is drawn for the whole batch, the teacher runs per micro-batch.
      layout: the step's mesh and FSDP flag, for the accumulation loop.

    Returns:
      (new state, metric sums).
    """
    batch, dropout_key = step_batch_and_dropout(spec, batch, dropout_base_key, state.step)

    def micro_step(params, batch, dropout_key):
        teacher_out = teacher_outputs(spec, teachers, batch)

        def loss_fn(params):
            student = nnx.merge(state.graphdef, params)
            out = student_forward(student, batch, dropout_key, spec)
            loss, metrics = combined_loss(spec, out, teacher_out, batch, state.step, student)
            return loss, (metrics, out.logits)

        (loss, (metrics, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, student_step_metrics(metrics, loss, logits, batch, grads)

    grads, metrics = train.accumulate_gradients(micro_step, state.params, batch,
                                                grad_accum_steps, dropout_key, layout)
    return train.apply_gradients(state, grads), metrics


def make_distill_step(mesh: Mesh, spec: LossSpec, step_fn: Callable = distill_step, *,
                      fsdp: bool = False, grad_accum_steps: int = 1) -> Callable:
    """`step_fn` jitted over `mesh` for `spec`: batch split over `data`, state and teachers
    replicated (FSDP-split with `fsdp`, see `sharding.place_state`), state donated. Call it as
    `step(state, teachers, batch, dropout_key)`.

    Args:
      grad_accum_steps: bound with the layout by `sharding.with_accumulation` when not 1.
    """
    step_fn = sharding.with_accumulation(functools.partial(step_fn, spec=spec), grad_accum_steps,
                                         mesh, fsdp=fsdp)
    return sharding.jit_step(step_fn, mesh, (sharding.STATE, sharding.STATE, sharding.BATCH,
                                             sharding.REPLICATED), fsdp=fsdp)

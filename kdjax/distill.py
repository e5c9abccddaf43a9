"""The distillation engine: layer maps, student construction, the frozen teacher's forward pass,
the combined loss, the jitted student update step, and the staged run behind `kdjax distill`.

Shape of a step (`distill_step`): the teacher runs first, deterministic and under
`stop_gradient`, outside `value_and_grad`; its parameters are an argument of the step, never
part of the optimizer or the student checkpoint. The student's loss is `combined_loss`, built
from a static `LossSpec`. Other step kinds (a discriminator step, a joint teacher-student step)
are further functions of the same form `(state, teachers, batch, key) -> (state, metrics)` and run
through the same `train.train_loop`, sharding and checkpointing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import pathlib
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import config as config_lib, data, distributed, hf, losses, optim, recipes, sharding
from kdjax import train
from kdjax import metrics as metrics_lib
from kdjax import teacher_cache
from kdjax.models.bert import BertClassifier, BertConfig, BertOutput, count_params


class DistillError(ValueError):
    """A distillation setup that cannot work (layer map, widths, heads, missing MLM head)."""


# ------------------------------------------------------------------------------------------------
# Layer maps and student construction


def layer_map(kind: str, student_layers: int, teacher_layers: int,
              explicit: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The teacher layer (1-based; 0 would be the embeddings) each student layer 1..M learns from.

    Kinds:
      uniform: TinyBERT's g(m) = m * N / M; needs M to divide N. In TinyBERT's code, student
        attention i (0-based) pairs with teacher attention i*k + k - 1 and student hidden i with
        teacher hidden i*k (index 0 = embeddings), k = N / M: both are layer m <-> m * k here.
      skip: Patient KD's every k-th layer (12 -> 6: 2, 4, 6, 8, 10 for the intermediate layers);
        the same pairs as uniform.
      last: Patient KD's last layers, student m <-> teacher N - M + m (12 -> 6: 7..11, then 12).
      explicit: `explicit[m - 1]` for student layer m.

    Raises:
      DistillError: an unknown kind, M not dividing N, or explicit indices out of range.
    """
    m, n = student_layers, teacher_layers
    if m < 1 or m > n and kind != "explicit":
        raise DistillError(f"layer map {kind!r}: the student has {m} layers, the teacher {n}; "
                           "need 1 <= student layers <= teacher layers")
    if kind in ("uniform", "skip"):
        if n % m:
            raise DistillError(
                f"layer map {kind!r} needs the student's layer count to divide the teacher's "
                f"({n} teacher layers, {m} student layers); use loss.layer_map=explicit with "
                f"loss.layer_map_explicit=({', '.join(str(round((i + 1) * n / m)) for i in range(m))})"
                " or another student depth")
        return tuple(i * (n // m) for i in range(1, m + 1))
    if kind == "last":
        return tuple(n - m + i for i in range(1, m + 1))
    if kind == "explicit":
        explicit = tuple(int(i) for i in explicit)
        if len(explicit) != m:
            raise DistillError(f"loss.layer_map_explicit has {len(explicit)} entries but the "
                               f"student has {m} layers; give one teacher layer per student layer")
        bad = [i for i in explicit if not 1 <= i <= n]
        if bad:
            raise DistillError(f"loss.layer_map_explicit {explicit}: teacher layers {bad} are "
                               f"outside 1..{n} (1-based; the teacher has {n} layers)")
        return explicit
    raise DistillError(f"unknown layer map {kind!r}; choose uniform, skip, last or explicit")


def spread_layers(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """DistilBERT's initialisation: evenly spread teacher layers (0-based), first and last kept.

    12 -> 6 gives (0, 2, 4, 7, 9, 11), the released DistilBERT's choice; 6 -> 3 gives (0, 2, 5).
    """
    if student_layers == 1:
        return (0,)
    step = (teacher_layers - 1) / (student_layers - 1)
    return tuple(round(i * step) for i in range(student_layers))


def first_layers(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """Patient KD's initialisation: the teacher's first M layers (0-based)."""
    return tuple(range(student_layers))


def student_config(teacher: BertConfig, *, layers: int, hidden: int = 0, heads: int = 0,
                   intermediate: int = 0, dtype: str = "float32") -> BertConfig:
    """A student architecture; 0 keeps the teacher's value (intermediate: 4x a new width)."""
    hidden = hidden or teacher.hidden_size
    if not intermediate:
        intermediate = (teacher.intermediate_size if hidden == teacher.hidden_size
                        else 4 * hidden)
    heads = heads or teacher.num_attention_heads
    if hidden % heads:
        raise DistillError(f"student hidden size {hidden} is not divisible by its {heads} heads")
    return teacher.replace(num_hidden_layers=layers, hidden_size=hidden,
                           num_attention_heads=heads, intermediate_size=intermediate, dtype=dtype)


def init_from_teacher(student: BertClassifier, teacher: BertClassifier,
                      layers: tuple[int, ...]) -> None:
    """Copies embeddings, the chosen teacher layers, pooler and (same label count) classifier
    into `student`, in place.

    Raises:
      DistillError: shapes differ (a narrower student cannot copy the teacher's weights).
    """
    s, t = student.config, teacher.config
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if getattr(s, field) != getattr(t, field):
            raise DistillError(f"initialising the student from teacher layers needs the same "
                               f"{field} (student {getattr(s, field)}, teacher "
                               f"{getattr(t, field)}); use student.init=random for a different "
                               "architecture")
    if len(layers) != s.num_hidden_layers or not all(0 <= i < t.num_hidden_layers
                                                     for i in layers):
        raise DistillError(f"student init layers {layers} must name {s.num_hidden_layers} "
                           f"teacher layers in 0..{t.num_hidden_layers - 1}")
    def copy(student_part, teacher_part):
        # Real copies: the student's buffers are donated to each update step, and must not
        # alias the teacher's, which stay in use.
        nnx.update(student_part, jax.tree.map(jnp.copy, nnx.state(teacher_part, nnx.Param)))

    copy(student.bert.embeddings, teacher.bert.embeddings)
    for i, j in enumerate(layers):
        copy(student.bert.layers[i], teacher.bert.layers[j])
    copy(student.bert.pooler, teacher.bert.pooler)
    if student.num_labels == teacher.num_labels:
        copy(student.classifier, teacher.classifier)
    if student.mlm is not None and teacher.mlm is not None:
        copy(student.mlm, teacher.mlm)


class DistillStudent(nnx.Module):
    """What a distillation step trains: the student classifier plus the learned projection
    W (student width -> teacher width) that TinyBERT's embedding/hidden losses and Patient KD's
    [CLS] loss use when widths differ. One projection is shared by all layers, as in TinyBERT's
    code. Only `model` is exported."""

    def __init__(self, model: BertClassifier, teacher_hidden: int | None, *, rngs: nnx.Rngs):
        self.model = model
        widths_differ = teacher_hidden is not None and teacher_hidden != model.config.hidden_size
        self.projection = (nnx.Linear(model.config.hidden_size, teacher_hidden,
                                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
                           if widths_differ else None)


# ------------------------------------------------------------------------------------------------
# The loss specification and the teacher's forward pass

_SCHEDULES = ("constant", "linear_warmup", "linear_decay")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static description of a stage's loss: weights (0 = term off), temperatures, layer pairs.

    Hashable, so the jitted step specialises on it. `extra_terms` plugs in user losses without
    touching kdjax: `(name, weight, fn)` with `fn(student_out, teacher_out, batch) -> [B]`.
    """

    ce: float = 0.0
    soft: float = 0.0
    soft_ce: float = 0.0
    logit_mse: float = 0.0
    embedding: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0
    attention_kl: float = 0.0
    cosine: float = 0.0
    pkd: float = 0.0
    mlm: float = 0.0
    # KDABert's adversarial term (kdjax/adversarial.py): lambda_adv, 0 for the first
    # `adversarial_warmup` fraction of the stage, then ramped linearly to full over the next
    # `adversarial_ramp` fraction (0 = full at once).
    adversarial: float = 0.0
    adversarial_warmup: float = 0.1
    adversarial_ramp: float = 0.1
    temperature: float = 1.0
    temperature_end: float = 0.0
    temperature_schedule: str = "constant"
    weight_schedule: str = "constant"
    schedule_warmup_ratio: float = 0.1
    # (student layer, teacher layer), 1-based, for hidden/attention terms (0 = embeddings).
    layer_pairs: tuple[tuple[int, int], ...] = ()
    hard_labels_from_teacher: bool = False
    total_steps: int = 1
    # Dynamic masking for the mlm term.
    mlm_probability: float = 0.15
    mask_token_id: int = 103
    special_token_ids: tuple[int, ...] = (0, 101, 102)
    vocab_size: int = 30522
    extra_terms: tuple[tuple[str, float, Callable], ...] = ()
    # Teacher outputs read from a teacher-output cache (kdjax/teacher_cache.py): the
    # `hidden_states` indices that batch["teacher_hidden"] [B, S, L, H] holds, in order.
    cached_hidden_layers: tuple[int, ...] = ()

    TEACHER_TERMS = ("soft", "soft_ce", "logit_mse", "embedding", "hidden", "attention",
                     "attention_kl", "cosine", "pkd", "adversarial")

    def __post_init__(self):
        for name in ("temperature_schedule", "weight_schedule"):
            if getattr(self, name) not in _SCHEDULES:
                raise DistillError(f"loss.{name} must be one of {_SCHEDULES}, got "
                                   f"{getattr(self, name)!r}")
        if self.temperature <= 0 or self.temperature_end < 0:
            raise DistillError(f"loss.temperature must be > 0 (got {self.temperature}) and "
                               f"loss.temperature_end >= 0 (got {self.temperature_end})")

    @property
    def uses_teacher(self) -> bool:
        return (any(getattr(self, t) for t in self.TEACHER_TERMS) or self.hard_labels_from_teacher
                or bool(self.extra_terms))

    @property
    def needs_logits(self) -> bool:
        return bool(self.soft or self.soft_ce or self.logit_mse or self.hard_labels_from_teacher
                    or self.extra_terms)

    @property
    def needs_hidden(self) -> bool:
        return bool(self.embedding or self.hidden or self.cosine or self.pkd or self.mlm
                    or self.adversarial)

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention or self.attention_kl)

    @property
    def needs_projection(self) -> bool:
        return bool(self.embedding or self.hidden or self.pkd or self.adversarial)

    @classmethod
    def from_config(cls, loss: ml_collections.ConfigDict, *, student_layers: int,
                    teacher_layers: int, total_steps: int, tokenizer=None,
                    extra_terms: tuple = ()) -> "LossSpec":
        """Builds the spec from a stage's `loss` config section (see `recipes.loss_config`)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in loss.items() if k in fields}
        pairs = ()
        if any(loss.get(k, 0) for k in ("hidden", "attention", "attention_kl", "pkd",
                                        "adversarial")):
            teacher_of = layer_map(loss.layer_map, student_layers, teacher_layers,
                                   tuple(loss.layer_map_explicit))
            pairs = tuple((m, t) for m, t in zip(range(1, student_layers + 1), teacher_of))
        if tokenizer is not None:
            values.update(mask_token_id=tokenizer.mask_token_id,
                          special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
                          vocab_size=len(tokenizer))
        return cls(**values, layer_pairs=pairs, total_steps=total_steps,
                   extra_terms=tuple(extra_terms))


def schedule_factor(kind: str, step: jax.Array, total_steps: int, warmup_ratio: float,
                    ) -> jax.Array:
    """Multiplier in [0, 1] at `step`: constant 1, linear warmup to 1, or linear decay to 0."""
    progress = step.astype(jnp.float32) / max(total_steps, 1)
    if kind == "linear_warmup":
        return jnp.minimum(1.0, progress / max(warmup_ratio, 1e-9))
    if kind == "linear_decay":
        return jnp.clip(1.0 - progress, 0.0, 1.0)
    return jnp.ones((), jnp.float32)


def temperature_at(spec: LossSpec, step: jax.Array) -> jax.Array:
    """T at `step`: constant, or moving linearly between `temperature` and `temperature_end`
    (linear_warmup ramps over the warmup fraction, linear_decay over the whole stage)."""
    if spec.temperature_schedule == "constant" or not spec.temperature_end:
        return jnp.asarray(spec.temperature, jnp.float32)
    f = schedule_factor(spec.temperature_schedule, step, spec.total_steps,
                        spec.schedule_warmup_ratio)
    if spec.temperature_schedule == "linear_decay":
        f = 1.0 - f  # 0 at the start, 1 at the end.
    return spec.temperature + f * (spec.temperature_end - spec.temperature)


@flax.struct.dataclass
class Teachers:
    """One or more frozen teachers: parameters (a pytree argument of the step, never optimised)
    and their static graph definitions. The first supplies hidden states and attention."""

    params: tuple[nnx.State, ...]
    graphdefs: tuple[nnx.GraphDef, ...] = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, models) -> "Teachers":
        graphdefs, params = zip(*(nnx.split(m, nnx.Param) for m in models))
        return cls(params=tuple(params), graphdefs=tuple(graphdefs))


def _inputs(batch: dict) -> tuple:
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def teacher_forward(teachers: Teachers, batch: dict, *, logits: bool = True,
                    hidden: bool = False, attention: bool = False) -> dict:
    """The frozen teachers' outputs that the losses need; deterministic, under stop_gradient.

    Returns:
      A dict with `logits` [K, B, C] (K teachers) when asked, and the first teacher's
      `hidden_states` (tuple, embeddings first), `attention_scores` and `attention_probs`.
    """
    out = {}
    all_logits = []
    for i, (graphdef, params) in enumerate(zip(teachers.graphdefs, teachers.params)):
        if i > 0 and not logits:
            break
        result = nnx.merge(graphdef, params)(*_inputs(batch), output_hidden_states=hidden and i == 0,
                                             output_attentions=attention and i == 0)
        all_logits.append(result.logits)
        if i == 0:
            if hidden:
                out["hidden_states"] = result.hidden_states
            if attention:
                out["attention_scores"] = result.attention_scores
                out["attention_probs"] = result.attention_probs
    if logits:
        out["logits"] = jnp.stack(all_logits)
    return jax.lax.stop_gradient(out)


def cached_teacher_outputs(batch: dict, spec: LossSpec) -> dict:
    """`teacher_forward`'s outputs rebuilt from a batch that carries cached ones
    (`teacher_cache.CachedTeacherBatcher`): `logits` [K, B, C] from `teacher_logits` [B, K, C],
    and `hidden_states` indexed by teacher layer (None where nothing is stored) from
    `teacher_hidden` [B, S, L, H] and `spec.cached_hidden_layers`."""
    out = {"logits": jnp.moveaxis(batch["teacher_logits"], 1, 0)}
    if spec.cached_hidden_layers:
        stored = {layer: j for j, layer in enumerate(spec.cached_hidden_layers)}
        hidden = batch["teacher_hidden"]
        # Long enough for every stored index; cosine's [-1] is the last layer, which it stores.
        out["hidden_states"] = tuple(hidden[:, stored[i]] if i in stored else None
                                     for i in range(max(stored) + 1))
    return jax.lax.stop_gradient(out)


def mask_tokens(batch: dict, key: jax.Array, spec: LossSpec) -> dict:
    """DistilBERT's dynamic masking, redrawn every step: round(p * n) of each example's n
    maskable tokens (real, not special), 80 % [MASK] / 10 % random / 10 % kept.

    Adds `mlm_positions`, `mlm_targets`, `mlm_where` ([B, P], P = ceil(p * L) + 1 slots) and
    replaces `input_ids`. Token choice is uniform (the official script weights by count^-0.7).
    """
    ids, real = batch["input_ids"], batch["attention_mask"].astype(bool)
    b, length = ids.shape
    eligible = real & ~jnp.isin(ids, jnp.asarray(spec.special_token_ids))
    n_eligible = jnp.sum(eligible, -1)
    n_masked = jnp.where(n_eligible > 0,
                         jnp.maximum(1, jnp.round(spec.mlm_probability * n_eligible)), 0)
    slots = min(length, math.ceil(spec.mlm_probability * length) + 1)
    k_rank, k_kind, k_random = jax.random.split(key, 3)
    scores = jnp.where(eligible, jax.random.uniform(k_rank, ids.shape), -1.0)
    top, positions = jax.lax.top_k(scores, slots)  # [B, P]
    where = (jnp.arange(slots)[None] < n_masked[:, None]) & (top >= 0)
    targets = jnp.take_along_axis(ids, positions, 1)
    kind = jax.random.uniform(k_kind, (b, slots))
    random_ids = jax.random.randint(k_random, (b, slots), 0, spec.vocab_size, ids.dtype)
    replaced = jnp.where(kind < 0.8, spec.mask_token_id, jnp.where(kind < 0.9, random_ids, targets))
    rows = jnp.arange(b)[:, None]
    new_ids = ids.at[rows, positions].set(jnp.where(where, replaced, targets))
    return {**batch, "input_ids": new_ids, "mlm_positions": positions, "mlm_targets": targets,
            "mlm_where": where}


# ------------------------------------------------------------------------------------------------
# The combined loss


def combined_loss(spec: LossSpec, student_out: BertOutput, teacher_out: dict | None,
                  batch: dict, step: jax.Array, projection: Callable | None = None,
                  mlm_logits: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The stage's total loss and every term separately.

    Each term is a per-example loss averaged over the examples it applies to (hard CE: labelled
    rows; everything else: every real row) and multiplied by its weight; teacher terms also by the
    weight schedule. Hidden and attention terms are summed over layer pairs (TinyBERT's code),
    the Patient KD term is averaged over its pairs (its F.mse_loss over layers).

    Returns:
      (scalar loss, metrics) with `NAME_sum` / `NAME_count` per term (unweighted values).
    """
    rows = batch["weights"]
    mask = batch["attention_mask"]
    labels = batch["labels"]
    teacher_factor = schedule_factor(spec.weight_schedule, step, spec.total_steps,
                                     spec.schedule_warmup_ratio)
    temperature = temperature_at(spec, step)
    s_hidden, s_scores, s_probs = (student_out.hidden_states, student_out.attention_scores,
                                   student_out.attention_probs)
    terms: dict[str, tuple[float | jax.Array, jax.Array, jax.Array]] = {}

    if spec.ce:
        hard = labels
        if spec.hard_labels_from_teacher:
            teacher_pred = jnp.argmax(jnp.mean(jax.nn.softmax(teacher_out["logits"]), 0), -1)
            hard = jnp.where(labels >= 0, labels, teacher_pred)
        terms["ce"] = (spec.ce, losses.hard_cross_entropy(student_out.logits, hard),
                       rows * (hard >= 0))
    if spec.soft:
        targets = losses.soft_targets(teacher_out["logits"], temperature)
        terms["soft"] = (spec.soft * teacher_factor,
                         losses.soft_kl(student_out.logits, targets, temperature), rows)
    if spec.soft_ce:
        targets = losses.soft_targets(teacher_out["logits"], temperature)
        terms["soft_ce"] = (spec.soft_ce * teacher_factor,
                            losses.soft_cross_entropy(student_out.logits, targets, temperature),
                            rows)
    if spec.logit_mse:
        terms["logit_mse"] = (spec.logit_mse * teacher_factor,
                              losses.logit_mse(student_out.logits,
                                               jnp.mean(teacher_out["logits"], 0)), rows)
    if spec.embedding:
        terms["embedding"] = (spec.embedding * teacher_factor,
                              losses.hidden_mse(s_hidden[0], teacher_out["hidden_states"][0],
                                                mask, projection), rows)
    if spec.hidden:
        per_example = sum(losses.hidden_mse(s_hidden[m], teacher_out["hidden_states"][t], mask,
                                            projection) for m, t in spec.layer_pairs)
        terms["hidden"] = (spec.hidden * teacher_factor, per_example, rows)
    if spec.attention:
        per_example = sum(losses.attention_score_mse(
            s_scores[m - 1], teacher_out["attention_scores"][t - 1], mask)
            for m, t in spec.layer_pairs)
        terms["attention"] = (spec.attention * teacher_factor, per_example, rows)
    if spec.attention_kl:
        per_example = sum(losses.attention_kl(
            s_probs[m - 1], teacher_out["attention_probs"][t - 1], mask)
            for m, t in spec.layer_pairs)
        terms["attention_kl"] = (spec.attention_kl * teacher_factor, per_example, rows)
    if spec.cosine:
        terms["cosine"] = (spec.cosine * teacher_factor,
                           losses.cosine_loss(student_out.last_hidden_state,
                                              teacher_out["hidden_states"][-1], mask), rows)
    if spec.pkd:
        # Intermediate layers only: the last one is covered by the soft loss.
        pairs = spec.layer_pairs[:-1]
        if pairs:
            per_example = sum(losses.patient_loss(s_hidden[m][:, 0],
                                                  teacher_out["hidden_states"][t][:, 0],
                                                  projection) for m, t in pairs) / len(pairs)
            terms["pkd"] = (spec.pkd * teacher_factor, per_example, rows)
    if spec.mlm:
        has_mask = jnp.any(batch["mlm_where"], -1)
        terms["mlm"] = (spec.mlm, losses.mlm_cross_entropy(mlm_logits, batch["mlm_targets"],
                                                           batch["mlm_where"]), rows * has_mask)
    for name, weight, fn in spec.extra_terms:
        terms[name] = (weight, fn(student_out, teacher_out, batch), rows)

    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, (weight, per_example, row_weights) in terms.items():
        total = jnp.sum(per_example * row_weights)
        count = jnp.sum(row_weights)
        loss = loss + weight * total / jnp.maximum(count, 1.0)
        metrics[f"{name}_sum"] = total
        metrics[f"{name}_count"] = count
    metrics["temperature_sum"] = temperature * jnp.sum(rows)
    return loss, metrics


# ------------------------------------------------------------------------------------------------
# The student update step


def student_forward(student: DistillStudent, batch: dict, dropout_key: jax.Array,
                    spec: LossSpec) -> tuple[BertOutput, jax.Array | None]:
    """The student's training forward pass with what `spec`'s terms need: hidden states,
    attention, and MLM logits at the masked slots (after `mask_tokens`) when there is an mlm term.
    """
    out = student.model(*_inputs(batch), dropout_key=dropout_key,
                        output_hidden_states=spec.needs_hidden,
                        output_attentions=spec.needs_attention)
    mlm_logits = None
    if spec.mlm:
        # The vocabulary projection only at the masked slots: [B, P, H] -> [B, P, V].
        at_slots = jnp.take_along_axis(out.last_hidden_state, batch["mlm_positions"][..., None], 1)
        mlm_logits = student.model.mlm(
            at_slots, student.model.bert.embeddings.word_embeddings.embedding[...])
    return out, mlm_logits


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
    """One student update: teacher forward (outside the gradient) -> student loss -> AdamW.

    Args:
      state: the `DistillStudent`'s TrainState (donated by the jitted version).
      teachers: the frozen teachers (None when the loss uses no teacher or the batch carries
        cached teacher outputs).
      batch: a (global) batch; labels -1 mark unlabelled examples. With `teacher_logits`
        [B, K, C] (and `teacher_hidden` [B, S, L, H]) the teacher does not run.
      dropout_base_key: the run's key; the step's keys are folded from it and the step.
      spec: the static loss description.
      grad_accum_steps: micro-batches per update (`train.accumulate_gradients`); the masking is
        drawn for the whole batch, the teacher runs per micro-batch.

    Returns:
      (new state, metric sums).
    """
    key = jax.random.fold_in(dropout_base_key, state.step)
    dropout_key, mask_key = jax.random.split(key)
    if spec.mlm:
        batch = mask_tokens(batch, mask_key, spec)

    def micro_step(params, batch, dropout_key):
        teacher_out = None
        if "teacher_logits" in batch:  # Read from the teacher-output cache.
            teacher_out = cached_teacher_outputs(batch, spec)
        elif spec.uses_teacher:
            teacher_out = teacher_forward(teachers, batch, logits=spec.needs_logits,
                                          hidden=spec.needs_hidden,
                                          attention=spec.needs_attention)

        def loss_fn(params):
            student = nnx.merge(state.graphdef, params)
            out, mlm_logits = student_forward(student, batch, dropout_key, spec)
            loss, metrics = combined_loss(spec, out, teacher_out, batch, state.step,
                                          student.projection, mlm_logits)
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


# ------------------------------------------------------------------------------------------------
# The run behind `kdjax distill`


def _teacher_finetune_config(config: ml_collections.ConfigDict,
                             seed: int) -> ml_collections.ConfigDict:
    ft = recipes.finetune_config()
    ft.model.name = config.teacher.name
    ft.model.dtype = config.teacher.dtype
    for key in ft.data:
        ft.data[key] = config.data[key]
    ft.optim = ml_collections.ConfigDict(config.teacher.optim.to_dict())
    ft.train.epochs = config.teacher.epochs
    ft.train.seed = seed
    ft.train.num_devices = config.train.num_devices
    ft.train.fsdp = config.train.get("fsdp", False)
    ft.train.grad_accum_steps = config.train.get("grad_accum_steps", 1)
    ft.train.log_every = config.train.log_every
    ft.train.checkpoint_every = config.train.checkpoint_every
    return ft


def _is_task_model(name: str, label_names: list[str]) -> bool:
    """True when `name` is a classifier already fine-tuned for a task with these labels."""
    try:
        directory = hf.resolve_checkpoint(name)
    except hf.CheckpointError:
        return False
    return hf.label_names_of(directory) == label_names


def prepare_teachers(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     label_names: list[str], *, progress: bool = True) -> list[pathlib.Path]:
    """The fine-tuned teacher directories: teacher.name itself when it is already a classifier
    for this task, else one fine-tuning run per seed in WORKDIR/teacher-seedN (reused when
    finished); then teacher.extra."""
    if _is_task_model(config.teacher.name, label_names):
        dirs = [hf.resolve_checkpoint(config.teacher.name)]
    else:
        dirs = []
        for seed in config.teacher.seeds:
            run_dir = workdir / f"teacher-seed{seed}"
            if not (run_dir / "eval.json").is_file():
                print(f"fine-tuning teacher {config.teacher.name} (seed {seed}) into {run_dir}",
                      flush=True)
                result = train.fine_tune(_teacher_finetune_config(config, seed), run_dir,
                                         progress=progress)
                if not result["finished"]:
                    raise DistillError(f"teacher fine-tuning in {run_dir} stopped early "
                                       "(train.stop_after_steps); rerun to finish it")
            dirs.append(run_dir / "model")
    for extra in config.teacher.extra:
        directory = hf.resolve_checkpoint(extra)
        if hf.label_names_of(directory) != label_names:
            raise DistillError(f"teacher.extra {extra} is not fine-tuned for this task's labels "
                               f"{label_names}")
        dirs.append(directory)
    return dirs


def build_student(config: ml_collections.ConfigDict, teacher: BertClassifier, num_labels: int,
                  *, mlm_head: bool) -> BertClassifier:
    """The student of `config.student`, initialised from the teacher's layers or randomly."""
    cfg = config.student
    bert_config = student_config(teacher.config, layers=cfg.layers, hidden=cfg.hidden,
                                 heads=cfg.heads, intermediate=cfg.intermediate, dtype=cfg.dtype)
    student = BertClassifier(bert_config, num_labels, rngs=nnx.Rngs(config.train.seed),
                             mlm_head=mlm_head)
    if cfg.init == "teacher":
        n = teacher.config.num_hidden_layers
        layers = {"spread": lambda: spread_layers(n, cfg.layers),
                  "first": lambda: first_layers(n, cfg.layers),
                  "explicit": lambda: tuple(cfg.init_layers_explicit)}
        if cfg.init_layers not in layers:
            raise DistillError(f"student.init_layers must be spread, first or explicit, got "
                               f"{cfg.init_layers!r}")
        chosen = layers[cfg.init_layers]()
        init_from_teacher(student, teacher, chosen)
        print(f"student: {cfg.layers} layers x {bert_config.hidden_size}, initialised from "
              f"teacher layers {chosen} (0-based)", flush=True)
    elif cfg.init == "random":
        print(f"student: {cfg.layers} layers x {bert_config.hidden_size}, random init",
              flush=True)
    else:
        raise DistillError(f"student.init must be teacher or random, got {cfg.init!r}")
    if mlm_head and teacher.mlm is None:
        if cfg.mlm_head_init != "random":
            raise DistillError(
                f"the loss has an mlm term but the teacher checkpoint {config.teacher.name} has "
                "no MLM head to initialise the student's from (all-MiniLM-L6-v2 ships none). "
                "Either set student.mlm_head_init=random (the head is learned by the MLM term; "
                "its decoder is tied to the student's word embeddings) or run without the term "
                "(loss.mlm=0)")
        print("note: the teacher has no MLM head; the student's MLM head (dense + LayerNorm + "
              "bias, decoder tied to the word embeddings) starts from random init and is "
              "learned by the mlm term", flush=True)
    return student


def _stage_split(config, stage, inputs: train.TaskInputs, *,
                 uses_teacher: bool) -> data.EncodedSplit:
    """The stage's training examples. Without a teacher term, unlabelled rows teach nothing, so
    such a stage trains on the labelled examples only."""
    if stage.data == "unlabelled":
        if config.data.unlabelled_file:
            path = pathlib.Path(config.data.unlabelled_file)
            if not path.is_file():
                raise FileNotFoundError(f"data.unlabelled_file {path} not found")
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            examples = [data.Example(ln, None, -1) for ln in lines if ln]
            if not examples:
                raise data.DataError(f"{path} has no non-empty line")
            return data.encode(examples, inputs.tokenizer, config.data.max_length)
        return data.without_labels(data.concatenate([inputs.train, inputs.unlabelled_rest]))
    if stage.data != "train":
        raise DistillError(f"a stage's data must be train or unlabelled, got {stage.data!r}")
    if uses_teacher and config.data.unlabelled_rest and len(inputs.unlabelled_rest):
        return data.concatenate([inputs.train, inputs.unlabelled_rest])
    return inputs.train


def _check_architecture(spec: LossSpec, student: BertConfig, teacher: BertConfig,
                        projection: bool) -> None:
    """Refuses terms the two architectures cannot support, naming the term."""
    if spec.needs_projection and student.hidden_size != teacher.hidden_size and not projection:
        raise DistillError(f"student width {student.hidden_size} != teacher width "
                           f"{teacher.hidden_size} and student.projection is off; the "
                           "embedding/hidden/pkd terms need a projection")
    if spec.cosine and student.hidden_size != teacher.hidden_size:
        raise DistillError(f"loss.cosine compares hidden states directly, but the student is "
                           f"{student.hidden_size} wide and the teacher {teacher.hidden_size}; "
                           "use loss.hidden (projected MSE) instead")
    if spec.needs_attention and student.num_attention_heads != teacher.num_attention_heads:
        raise DistillError(f"attention terms need equal head counts (student "
                           f"{student.num_attention_heads}, teacher "
                           f"{teacher.num_attention_heads})")


def inference_speed(model: BertClassifier, split: data.EncodedSplit, batch_size: int,
                    buckets, mesh: Mesh, repeats: int = 3) -> float:
    """Examples/s of deterministic inference over `split`, compiled first (best of `repeats`)."""
    predict_fn = train.make_predict_step(mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    params = sharding.replicate(params, mesh)
    batcher = data.Batcher(split, batch_size, buckets=buckets, shuffle=False)
    train.predict(predict_fn, graphdef, params, batcher, mesh)  # Compile every bucket.
    return max(train.predict(predict_fn, graphdef, params, batcher, mesh)[1]
               for _ in range(repeats))


# Recipes whose student or step differs from the BERT student trained by `distill` below: their
# own run function (same signature, same workdir layout and eval.json keys), chosen by
# `config.method`.
_METHOD_RUNNERS = {
    "bilstm": "kdjax.bilstm:distill_bilstm",
    "newsbert": "kdjax.newsbert:distill_newsbert",
}


def distill(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
            progress: bool = True, extra_terms: tuple = (),
            measure_throughput: bool = True) -> dict:
    """Fine-tuned teacher -> student -> distillation stages -> evaluation -> saved student.

    Resumable: finished teacher runs and stages are reused, an interrupted stage resumes from
    its last checkpoint. Writes to `workdir`: teacher-seedN/ (when fine-tuning), stages/NAME/
    (Orbax checkpoints of the student, never the teacher), metrics.jsonl, config.json,
    model/ (the student as a Hugging Face directory) and eval.json.

    Args:
      config: a distillation config (see `recipes.distill_config` and configs/).
      workdir: the run directory.
      extra_terms: user loss terms `(name, weight, fn)` added to every stage's loss.
      measure_throughput: also time student and teacher inference on the dev split.

    Returns:
      The student's dev metrics, teacher accuracy, agreement, timings and throughputs.
    """
    method = config.get("method", "bert")
    if method != "bert":
        if method not in _METHOD_RUNNERS:
            raise DistillError(f"unknown method {method!r}; choose bert, "
                               f"{', '.join(_METHOD_RUNNERS)}")
        module, function = _METHOD_RUNNERS[method].split(":")
        runner = getattr(importlib.import_module(module), function)
        return runner(config, workdir, progress=progress, measure_throughput=measure_throughput)
    workdir, mesh = train.start_run(config, workdir)

    task = data.load_task(config.data.task, train_file=config.data.train_file,
                          dev_file=config.data.dev_file,
                          text_columns=tuple(config.data.text_columns),
                          label_column=config.data.label_column, splits=("dev",))
    teacher_dirs = prepare_teachers(config, workdir, task.label_names, progress=progress)
    task_config = ml_collections.ConfigDict({"model": {"name": str(teacher_dirs[0])},
                                             "data": config.data.to_dict()})
    inputs = train.prepare_task(task_config)
    needs_mlm = any(config[name].loss.mlm for name in config.stages)
    teachers = []
    for directory in teacher_dirs:
        try:
            model, _, _ = hf.load_pretrained(str(directory), dtype=config.teacher.dtype,
                                             mlm_head=needs_mlm)
        except hf.CheckpointError:
            if not needs_mlm:
                raise
            model, _, _ = hf.load_pretrained(str(directory), dtype=config.teacher.dtype)
        teachers.append(model)
    num_labels = inputs.task.num_labels
    student_model = build_student(config, teachers[0], num_labels, mlm_head=needs_mlm)
    teacher_width = teachers[0].config.hidden_size if config.student.projection else None
    student = DistillStudent(student_model, teacher_width, rngs=nnx.Rngs(config.train.seed + 1))
    distributed.write_text(workdir / "config.json",
                           json.dumps(config_lib.to_dict(config), indent=2) + "\n")
    distributed.write_text(workdir / "labels.json", json.dumps(inputs.task.label_names) + "\n")
    log = metrics_lib.MetricLog(workdir, tensorboard=config.train.tensorboard)
    dropout_key = sharding.replicate(jax.random.key(config.train.seed), mesh)

    train_seconds, stage_results = 0.0, {}
    # Parameter layout and micro-batches of every stage's step (kdjax/sharding.py, train.py).
    fsdp = config.train.get("fsdp", False)
    grad_accum_steps = config.train.get("grad_accum_steps", 1)
    for name in config.stages:
        stage = config[name]
        spec = LossSpec.from_config(stage.loss, student_layers=student_model.config.num_hidden_layers,
                                    teacher_layers=teachers[0].config.num_hidden_layers,
                                    total_steps=1, tokenizer=inputs.tokenizer,
                                    extra_terms=extra_terms)
        _check_architecture(spec, student_model.config, teachers[0].config,
                            config.student.projection)
        split = _stage_split(config, stage, inputs, uses_teacher=spec.uses_teacher)
        batcher = data.Batcher(split, config.data.batch_size, buckets=inputs.buckets,
                               shuffle=True, seed=config.train.seed)
        total_steps = config.train.max_steps or max(
            1, math.ceil(stage.epochs * batcher.num_batches))
        spec = dataclasses.replace(spec, total_steps=total_steps)
        stage_teachers = None
        if spec.uses_teacher:
            models = teachers
            if stage.teacher == "pretrained":
                models = [hf.load_pretrained(config.teacher.name, num_labels=num_labels,
                                             dtype=config.teacher.dtype)[0]]
            elif stage.teacher != "finetuned":
                raise DistillError(f"{name}.teacher must be finetuned or pretrained, got "
                                   f"{stage.teacher!r}")
            stage_teachers = sharding.place_state(Teachers.create(models), mesh, fsdp=fsdp)
        if spec.uses_teacher:
            # Fixed inputs: the teachers' outputs are computed once, stored, and read back with
            # each batch (kdjax/teacher_cache.py); the step then runs no teacher.
            pretrained = stage.teacher == "pretrained"
            cache = teacher_cache.for_stage(
                config, name, spec, teachers=models, split=split, buckets=inputs.buckets,
                mesh=mesh, workdir=workdir,
                teacher_dirs=([hf.resolve_checkpoint(config.teacher.name)] if pretrained
                              else teacher_dirs),
                # hf.load_pretrained's new head for the task (seed 0) is in no file.
                key_extra={"new_head_labels": num_labels, "seed": 0} if pretrained else None)
            if cache is not None:
                batcher = teacher_cache.CachedTeacherBatcher(batcher, cache)
                spec = dataclasses.replace(spec, cached_hidden_layers=cache.hidden_layers)
                stage_teachers = None
        optim_config = ml_collections.ConfigDict(config.optim.to_dict())
        optim_config.lr = stage.lr or config.optim.lr
        tx = optim.make_optimizer(optim_config, total_steps)
        state = sharding.place_state(train.TrainState.create(student, tx), mesh, fsdp=fsdp)
        step_fn = functools.partial(
            _with_teachers, make_distill_step(mesh, spec, fsdp=fsdp,
                                              grad_accum_steps=grad_accum_steps),
            stage_teachers)
        if spec.adversarial:
            # KDABert: per-layer discriminators and alternating updates (kdjax/adversarial.py).
            from kdjax import adversarial
            state, step_fn = adversarial.setup_stage(config, spec, state, stage_teachers, mesh,
                                                     log=log, description=name)
        print(f"stage {name}: {total_steps} steps over {len(batcher.split)} examples, terms "
              f"{[t for t in _term_names(spec)]}", flush=True)
        run = train.train_loop(
            state, step_fn, batcher,
            total_steps=total_steps, train_config=config.train,
            checkpoint_dir=workdir / "stages" / name / "checkpoints", log=log, mesh=mesh,
            dropout_key=dropout_key,
            lr_at=optim.warmup_linear_decay(optim_config.lr, total_steps,
                                            optim_config.warmup_ratio),
            progress=progress, description=name)
        if not run.finished:
            return {"finished": False, "stage": name, "steps": run.steps}
        train_seconds += run.train_seconds
        stage_results[name] = {"steps": run.steps, "train_seconds": run.train_seconds}
        student = run.state.model()
        student_model = student.model

    return _finish(config, workdir, student_model, teachers, inputs, mesh, log,
                   train_seconds, stage_results, measure_throughput)


def _with_teachers(jitted: Callable, teachers, state, batch, key):
    """The loop's `(state, batch, key)` step over a distillation step that also takes teachers."""
    return jitted(state, teachers, batch, key)


def _term_names(spec: LossSpec) -> list[str]:
    names = [f.name for f in dataclasses.fields(spec)
             if f.name in ("ce", "mlm") + LossSpec.TEACHER_TERMS and getattr(spec, f.name)]
    return names + [name for name, _, _ in spec.extra_terms]


def compare_on_dev(student: nnx.Module, teachers, inputs: train.TaskInputs, mesh: Mesh,
                   batch_size: int) -> dict:
    """The student's dev metrics beside the teachers': the teacher's accuracy (several teachers:
    their ensemble, probabilities averaged as the soft targets are), each teacher's own accuracy
    and the best of them, and the student's agreement with the teacher's predictions."""
    predict_fn = train.make_predict_step(mesh)

    def dev_logits(model):
        graphdef, params = nnx.split(model, nnx.Param)
        batcher = data.Batcher(inputs.dev, batch_size, buckets=inputs.buckets, shuffle=False)
        return train.predict(predict_fn, graphdef, sharding.replicate(params, mesh), batcher,
                             mesh)[0]

    labels, num_labels = inputs.dev.labels, inputs.task.num_labels
    each_teacher_probs = [np.asarray(jax.nn.softmax(dev_logits(t))) for t in teachers]
    student_pred = dev_logits(student).argmax(-1)
    teacher_pred = np.mean(each_teacher_probs, 0).argmax(-1)
    single_accuracies = [float(np.mean(p.argmax(-1) == labels)) for p in each_teacher_probs]
    result = metrics_lib.classification_metrics(student_pred, labels, num_labels)
    result.update(
        teacher_accuracy=metrics_lib.classification_metrics(teacher_pred, labels,
                                                            num_labels)["accuracy"],
        teacher_accuracies=single_accuracies,
        best_single_teacher_accuracy=max(single_accuracies),
        teacher_agreement=float(np.mean(student_pred == teacher_pred)),
        examples=len(labels))
    return result


def _finish(config, workdir: pathlib.Path, student: BertClassifier, teachers, inputs, mesh,
            log, train_seconds: float, stage_results: dict, measure_throughput: bool) -> dict:
    """Dev evaluation, teacher agreement, throughputs; saves the student and eval.json."""
    eval_bs, buckets = config.data.eval_batch_size, inputs.buckets
    result = compare_on_dev(student, teachers, inputs, mesh, eval_bs)
    result.update(
        student_layers=student.config.num_hidden_layers,
        student_hidden=student.config.hidden_size,
        student_params=count_params(nnx.state(student, nnx.Param)),
        student_non_embedding_params=non_embedding_params(student),
        teacher_non_embedding_params=non_embedding_params(teachers[0]),
        train_seconds=train_seconds, stages=stage_results, finished=True)
    if measure_throughput:
        result.update(
            student_examples_per_s=inference_speed(student, inputs.dev, eval_bs, buckets, mesh),
            teacher_examples_per_s=inference_speed(teachers[0], inputs.dev, eval_bs, buckets,
                                                   mesh))
    log.write(sum(r["steps"] for r in stage_results.values()), "dev", result)
    export = student
    if student.mlm is not None:
        # The exported classifier carries no MLM head: save a copy without it.
        export = BertClassifier(student.config, student.num_labels, rngs=nnx.Rngs(0))
        nnx.update(export.bert, nnx.state(student.bert, nnx.Param))
        nnx.update(export.classifier, nnx.state(student.classifier, nnx.Param))
    hf.save_pretrained(export, workdir / "model", label_names=inputs.task.label_names,
                       tokenizer=inputs.tokenizer,
                       extra={"kdjax_config": config_lib.to_dict(config), "dev": result})
    distributed.write_text(workdir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


def non_embedding_params(model: BertClassifier) -> int:
    """Parameters outside the embedding tables and the task head (encoder layers + pooler)."""
    return (count_params(nnx.state(model.bert.layers, nnx.Param))
            + count_params(nnx.state(model.bert.pooler, nnx.Param)))

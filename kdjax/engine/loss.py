"""A stage's loss: the active methods, the settings they share (temperature, weight schedule,
layer pairs), and the one combined loss that adds up their terms."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from kdjax.engine.method import DistillError, Method, Needs, TermInputs
from kdjax.engine.students import layer_map

SCHEDULES = ("constant", "linear_warmup", "linear_decay")

# The settings of a stage's `loss` section that no single method owns.
SHARED_SETTINGS = {
    "temperature": 1.0,
    "temperature_end": 0.0,  # With a temperature schedule: the final T (0 = same as T).
    "temperature_schedule": "constant",  # constant | linear_warmup | linear_decay
    "weight_schedule": "constant",  # For every teacher term: constant | linear_warmup | ...
    "schedule_warmup_ratio": 0.1,  # linear_warmup: fraction of the stage to reach full.
    "layer_map": "uniform",  # uniform (TinyBERT) | skip | last (PKD) | explicit
    "layer_map_explicit": (),  # explicit: teacher layer (1-based) for student layers 1..M.
}

SHARED_RULES = (
    ("temperature", lambda v: v > 0, "must be > 0"),
    ("temperature_end", lambda v: v >= 0, "must be >= 0 (0 = no schedule)"),
    ("temperature_schedule", lambda v: v in SCHEDULES, f"must be one of {SCHEDULES}"),
    ("weight_schedule", lambda v: v in SCHEDULES, f"must be one of {SCHEDULES}"),
    ("schedule_warmup_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("layer_map", lambda v: v in ("uniform", "skip", "last", "explicit"),
     "must be uniform, skip, last or explicit"),
)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static description of a stage's loss: the active methods (each holding its weights, in
    the order their terms are added), the shared settings and the layer pairs.

    Hashable, so the jitted step specialises on it. `extra_terms` plugs in user losses without
    touching kdjax: `(name, weight, fn)` with `fn(student_out, teacher_out, batch) -> [B]`.
    """

    methods: tuple[Method, ...] = ()
    temperature: float = 1.0
    temperature_end: float = 0.0
    temperature_schedule: str = "constant"
    weight_schedule: str = "constant"
    schedule_warmup_ratio: float = 0.1
    # (student layer, teacher layer), 1-based, for the methods that read mapped layers.
    layer_pairs: tuple[tuple[int, int], ...] = ()
    # The two architectures' shapes, for methods whose terms depend on them.
    student_layers: int = 0
    teacher_layers: int = 0
    teacher_heads: int = 0
    total_steps: int = 1
    extra_terms: tuple[tuple[str, float, Callable], ...] = ()
    # Teacher outputs read from a teacher-output cache (kdjax/teacher_cache.py): the
    # `hidden_states` indices that batch["teacher_hidden"] [B, S, L, H] holds, in order.
    cached_hidden_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("temperature_schedule", "weight_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise DistillError(f"loss.{name} must be one of {SCHEDULES}, got "
                                   f"{getattr(self, name)!r}")
        if self.temperature <= 0 or self.temperature_end < 0:
            raise DistillError(f"loss.temperature must be > 0 (got {self.temperature}) and "
                               f"loss.temperature_end >= 0 (got {self.temperature_end})")

    def method(self, kind: type) -> Method | None:
        """The active method of class `kind`, or None."""
        return next((m for m in self.methods if isinstance(m, kind)), None)

    @property
    def needs(self) -> Needs:
        """What every active method (and the user's terms) read."""
        needs = Needs()
        for method in self.methods:
            needs = needs | method.needs(self)
        if self.extra_terms:  # User terms see the teacher's outputs; at least its logits.
            needs = needs | Needs(teacher_logits=True)
        return needs

    @property
    def uses_teacher(self) -> bool:
        return self.needs.uses_teacher

    @property
    def term_names(self) -> list[str]:
        """The names of the terms that are on, in the order they are added."""
        return [term for m in self.methods for term in m.TERMS if getattr(m, term)] + [
            name for name, _, _ in self.extra_terms]

    def update_method(self) -> Method | None:
        """The one active method that changes the update itself, or None.

        Raises:
          DistillError: two such methods in one stage.
        """
        changing = [m for m in self.methods if m.changes_update]
        if len(changing) > 1:
            raise DistillError(f"{' and '.join(type(m).__name__ for m in changing)} each change "
                               "the update itself and cannot share a stage")
        return changing[0] if changing else None

    def check(self, student, teacher, *, projection: bool) -> None:
        """Every active method's architecture check (`Method.check`)."""
        for method in self.methods:
            method.check(self, student, teacher, projection=projection)

    @classmethod
    def from_config(cls, loss: ml_collections.ConfigDict, *, methods: Sequence[type[Method]],
                    student_layers: int, teacher_layers: int, teacher_heads: int = 0,
                    total_steps: int = 1, tokenizer=None, extra_terms: tuple = ()) -> "LossSpec":
        """Builds the spec from a stage's `loss` config section.

        Args:
          loss: the section (see `kdjax.recipes.loss_config`).
          methods: the method classes to read from it, in the order their terms are added; those
            with every term off are left out.
          student_layers, teacher_layers: for the layer pairs.
          teacher_heads: the teacher's attention heads.
          tokenizer: for methods that need token ids (DistilBERT's masking).
        """
        active = tuple(m for m in (kind.from_config(loss, tokenizer=tokenizer)
                                   for kind in methods) if m.active)
        pairs = ()
        if any(m.uses_layer_map() for m in active):
            teacher_of = layer_map(loss.layer_map, student_layers, teacher_layers,
                                   tuple(loss.layer_map_explicit))
            pairs = tuple(zip(range(1, student_layers + 1), teacher_of))
        shared = {k: loss[k] for k in SHARED_SETTINGS if k in loss and k not in (
            "layer_map", "layer_map_explicit")}
        return cls(methods=active, **shared, layer_pairs=pairs, student_layers=student_layers,
                   teacher_layers=teacher_layers, teacher_heads=teacher_heads,
                   total_steps=total_steps,
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


def combined_loss(spec: LossSpec, student_out, teacher_out: dict | None, batch: dict,
                  step: jax.Array, model=None) -> tuple[jax.Array, dict]:
    """The stage's total loss and every term separately.

    Each term is a per-example loss averaged over the rows it applies to (as its method says:
    hard CE over labelled rows, most terms over every real row) and multiplied by its weight;
    methods multiply their teacher terms by the weight schedule's factor.

    Args:
      spec: the stage's loss.
      student_out: the student's forward pass with what `spec.needs` asks of it.
      teacher_out: the teachers' outputs (`teacher_forward`, or read from the cache), or None.
      batch: the (micro-)batch, after every method's `prepare_batch`.
      step: the global step (schedules).
      model: the trained module, for terms that use its projection or MLM head.

    Returns:
      (scalar loss, metrics) with `NAME_sum` / `NAME_count` per term (unweighted values).
    """
    rows = batch["weights"]
    teacher_factor = schedule_factor(spec.weight_schedule, step, spec.total_steps,
                                     spec.schedule_warmup_ratio)
    temperature = temperature_at(spec, step)
    inputs = TermInputs(spec=spec, student=student_out, teacher=teacher_out, batch=batch,
                        step=step, temperature=temperature, teacher_factor=teacher_factor,
                        model=model)
    terms = {}
    for method in spec.methods:
        terms.update(method.terms(inputs))
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

"""The interface a distillation method implements, and what the engine hands it.

A method (one module under `kdjax/methods/`) is a frozen dataclass: its fields are its settings in
a stage's `loss` config section (term weights, 0 = off, plus whatever else it reads), so the
dataclass is at once its config defaults and, being hashable, the static description a jitted step
specialises on. It declares:

- `TERMS`: the fields that are term weights, in the order its terms are added to the loss;
- `RULES`: range checks on its fields (`(field, check, what the check demands)`); every term weight
  must be >= 0 without being listed;
- `needs(spec)`: exactly which teacher and student outputs its terms read (`Needs`). The teacher
  forward, the student forward and the teacher-output cache all read this one declaration;
- `check(spec, student, teacher, projection=...)`: refuses an architecture it cannot support;
- `terms(inputs)`: its named per-example terms;
- optionally `prepare_batch` (a method that changes the step's input, DistilBERT's masking) and
  `make_update` (a method that changes the update itself, KDABert's discriminators).

The engine (`kdjax.engine.loss`, `.step`, `.run`) never names a method or a term: it adds up what
`terms` returns, forwards what `needs` asks for, and calls `make_update` when a method has one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax


class DistillError(ValueError):
    """A distillation setup that cannot work (layer map, widths, heads, missing MLM head)."""


@dataclasses.dataclass(frozen=True)
class Needs:
    """The model outputs a stage's terms read.

    Attributes:
      teacher_logits: the teachers' task logits (every teacher: soft targets are averaged).
      teacher_hidden: the first teacher's `hidden_states` indices (0 = embedding output, N = last
        layer) that the terms read.
      teacher_attention: the first teacher's attention scores and probabilities (every layer).
      teacher_qkv: the first teacher's per-layer query, key and value projections.
      student_hidden, student_attention, student_qkv: the same of the student.
      student_mlm_head: the student needs an MLM head (initialised from the teacher's).
      uncacheable: why the teacher must run inside the step even when its input is fixed
        ("" = its outputs may be computed once and read from the teacher-output cache).
    """

    teacher_logits: bool = False
    teacher_hidden: tuple[int, ...] = ()
    teacher_attention: bool = False
    teacher_qkv: bool = False
    student_hidden: bool = False
    student_attention: bool = False
    student_qkv: bool = False
    student_mlm_head: bool = False
    uncacheable: str = ""

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(
            teacher_logits=self.teacher_logits or other.teacher_logits,
            teacher_hidden=tuple(sorted(set(self.teacher_hidden) | set(other.teacher_hidden))),
            teacher_attention=self.teacher_attention or other.teacher_attention,
            teacher_qkv=self.teacher_qkv or other.teacher_qkv,
            student_hidden=self.student_hidden or other.student_hidden,
            student_attention=self.student_attention or other.student_attention,
            student_qkv=self.student_qkv or other.student_qkv,
            student_mlm_head=self.student_mlm_head or other.student_mlm_head,
            uncacheable=self.uncacheable or other.uncacheable)

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teacher_logits or self.teacher_hidden or self.teacher_attention
                    or self.teacher_qkv)


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What `Method.terms` reads, inside the student's loss function.

    Attributes:
      spec: the stage's `kdjax.engine.loss.LossSpec` (layer pairs, layer counts, schedule).
      student: the student's forward pass (`BertOutput`, or the BiLSTM's).
      teacher: the teachers' outputs (`kdjax.engine.teachers.teacher_forward`'s dict; `logits`
        [K, B, C]), or None when the stage uses no teacher.
      batch: the (micro-)batch; `weights` [B] marks real rows, labels -1 unlabelled ones.
      step: the global step.
      temperature: T at this step.
      teacher_factor: the weight schedule's factor at this step (multiplies every teacher term).
      model: the trained module (`DistillStudent`: its projection and MLM head), or None.
    """

    spec: Any
    student: Any
    teacher: dict | None
    batch: dict
    step: jax.Array
    temperature: jax.Array
    teacher_factor: jax.Array
    model: Any = None

    @property
    def rows(self) -> jax.Array:
        return self.batch["weights"]

    @property
    def mask(self) -> jax.Array:
        return self.batch["attention_mask"]

    @property
    def projection(self) -> Callable | None:
        return getattr(self.model, "projection", None)


# A term: (weight, per-example values [B], per-row weights [B]); the loss adds
# weight * sum(values * row weights) / sum(row weights).
Term = tuple[Any, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every method (see the module docstring). Subclasses are frozen dataclasses whose
    fields are their `loss` config keys; a field with `metadata={"config": False}` is filled by
    `from_config` from elsewhere (a tokenizer) and is no config key."""

    TERMS: ClassVar[tuple[str, ...]] = ()
    RULES: ClassVar[tuple[tuple[str, Callable[[Any], bool], str], ...]] = ()

    @classmethod
    def config_fields(cls) -> dict[str, Any]:
        """The method's `loss` config keys and their defaults."""
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.metadata.get("config", True)}

    @classmethod
    def from_config(cls, loss, *, tokenizer=None) -> "Method":
        """The method's settings from a stage's `loss` section (keys it lacks keep defaults)."""
        del tokenizer
        return cls(**{k: loss[k] for k in cls.config_fields() if k in loss})

    @property
    def active(self) -> bool:
        """Whether any of its terms is on."""
        return any(getattr(self, term) for term in self.TERMS)

    def uses_layer_map(self) -> bool:
        """Whether its terms read the stage's layer pairs (`loss.layer_map`)."""
        return False

    def needs(self, spec) -> Needs:
        return Needs()

    def check(self, spec, student, teacher, *, projection: bool) -> None:
        """Raises `DistillError` naming the term when the architectures cannot support it."""

    def prepare_batch(self, spec, batch: dict, key: jax.Array) -> dict:
        """The step's batch as this method's terms need it (drawn once per step)."""
        return batch

    def terms(self, inputs: TermInputs) -> dict[str, Term]:
        return {}

    # A method that changes the update itself returns `(state, loop step)` here for a stage; the
    # engine trains that state with that step instead of its plain student update.
    changes_update: ClassVar[bool] = False

    def make_update(self, stage) -> tuple[Any, Callable]:
        raise NotImplementedError


@dataclasses.dataclass
class RunContext:
    """What one run of `kdjax.engine.run.run` shares with its `StudentRun`.

    Attributes:
      config: the run's config.
      workdir: the run directory.
      mesh: the device mesh.
      methods: the loss-method classes a stage's `loss` section may name.
      progress: show a progress bar.
      measure_throughput: time student and teacher inference at the end.
      extra_terms: user loss terms for the stages' losses.
      log: the run's metric log (metrics.jsonl).
      dropout_key: the run's replicated base key.
      train_seconds, stages: what the finished stages took (`stages[name]` = steps, seconds).
    """

    config: Any
    workdir: Any
    mesh: Any
    methods: tuple = ()
    progress: bool = True
    measure_throughput: bool = True
    extra_terms: tuple = ()
    log: Any = None
    dropout_key: Any = None
    train_seconds: float = 0.0
    stages: dict = dataclasses.field(default_factory=dict)


class StudentRun:
    """A run's student and its update: what the engine's one run (`kdjax.engine.run.run`) asks
    of a method. The staged BERT run is one (`kdjax.engine.run.StagedBertRun`); a method with
    its own student or its own joint update is another (the Distilled BiLSTM, NewsBERT), chosen
    by `config.method = NAME`.

    The run calls, in order: `start()` (teachers, data, student), then for each name of
    `stage_names()`: `init_stage(name)` (the stage's state, loop step, batches and schedule),
    the one training loop, `end_stage(name, state)`; then `finish()` (evaluation and export,
    returning eval.json's contents).
    """

    NAME: ClassVar[str] = ""

    def __init__(self, run: RunContext):
        self.run = run

    def start(self) -> None:
        """Everything before the first stage."""

    def stage_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def init_stage(self, name: str):
        """The stage's `kdjax.engine.run.Stage` (state, loop step, batcher, steps, schedule)."""
        raise NotImplementedError

    def end_stage(self, name: str, state) -> None:
        """Takes the trained state of a finished stage."""

    def finish(self) -> dict:
        raise NotImplementedError

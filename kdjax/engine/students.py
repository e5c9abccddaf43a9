"""Students: architecture, layer maps, initialisation from teacher layers, and the module a
distillation step trains (the student plus its learned width projection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kdjax.engine.method import DistillError
from kdjax.models.bert import BertClassifier, BertConfig, count_params


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


def non_embedding_params(model: BertClassifier) -> int:
    """Parameters outside the embedding tables and the task head (encoder layers + pooler)."""
    return (count_params(nnx.state(model.bert.layers, nnx.Param))
            + count_params(nnx.state(model.bert.pooler, nnx.Param)))

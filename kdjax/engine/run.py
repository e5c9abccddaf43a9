"""The staged run behind `kdjax distill`: teachers -> student -> each stage (its loss, data,
teachers or their cached outputs, state and step) through the one training loop -> evaluation
and export. `build_stage` is the public builder of one stage's state and step; `kdjax bench`
builds its step with it too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kdjax import augment, config as config_lib, data, distributed, hf, optim, sharding
from kdjax import teacher_cache, workdir as workdir_lib
from kdjax import train
from kdjax import metrics as metrics_lib
from kdjax.engine.loss import LossSpec
from kdjax.engine.method import DistillError, Method, RunContext, StudentRun
from kdjax.engine.step import make_distill_step
from kdjax.engine.students import (DistillStudent, build_student, non_embedding_params,
                                   student_config)
from kdjax.engine.teachers import Teachers, load_teachers, prepare_teachers
from kdjax.models.bert import BertClassifier, BertConfig, count_params


def stage_loss(config: ml_collections.ConfigDict, name: str, *,
               methods: Sequence[type[Method]], student: BertConfig, teacher: BertConfig,
               tokenizer=None, total_steps: int = 1, extra_terms: tuple = ()) -> LossSpec:
    """Stage `name`'s loss from its config section, checked against the two architectures.

    Raises:
      DistillError: a layer map that does not fit, or a term the architectures cannot support.
    """
    spec = LossSpec.from_config(config[name].loss, methods=methods,
                                student_layers=student.num_hidden_layers,
                                teacher_layers=teacher.num_hidden_layers,
                                teacher_heads=teacher.num_attention_heads,
                                total_steps=total_steps, tokenizer=tokenizer,
                                extra_terms=extra_terms)
    spec.check(student, teacher, projection=config.student.projection)
    return spec


@dataclasses.dataclass
class Stage:
    """One stage, ready for the training loop.

    Attributes:
      name: the stage's name (its config section, and its checkpoint directory stages/NAME).
      state: what the loop trains (a TrainState, or a method's own composite state).
      loop_step: the loop's `(state, batch, key) -> (state, metrics)`.
      total_steps: the stage's updates.
      lr_at: the learning rate at a step (logged).
      batcher: the stage's batches (`data.Batcher`, or one that adds cached teacher outputs).
      spec: its loss, for a stage of a `DistillStudent`.
      step: the plain jitted student step `(state, teachers, batch, key)`, or None when a method
        changes the update (`Method.make_update`).
      teachers: the placed frozen teachers the step reads, or None (cached or no teacher).
      optim_config: the optimizer section with the stage's learning rate.
      config, mesh, log: the run's (a method that changes the update reads them).
      selection: checkpoint selection on the held-out slice (`train.holdout_selection`), or
        None (the last state is the stage's result).
    """

    name: str
    state: Any
    loop_step: Callable | None
    total_steps: int
    lr_at: Callable
    batcher: Any = None
    spec: LossSpec | None = None
    step: Callable | None = None
    teachers: Teachers | None = None
    optim_config: ml_collections.ConfigDict | None = None
    config: ml_collections.ConfigDict | None = None
    mesh: Mesh | None = None
    log: Any = None
    selection: train.Selection | None = None


def _with_teachers(jitted: Callable, teachers, state, batch, key):
    """The loop's `(state, batch, key)` step over a distillation step that also takes teachers."""
    return jitted(state, teachers, batch, key)


def build_stage(config: ml_collections.ConfigDict, name: str, spec: LossSpec,
                student: DistillStudent, teachers: Teachers | None, mesh: Mesh, *,
                total_steps: int, log=None) -> Stage:
    """The state and step of stage `name`: the student's optimizer (the stage's learning rate,
    warm-up and linear decay over `total_steps`) and state placed on the mesh, the jitted student
    step, or, when a method changes the update, that method's state and step.

    Args:
      config: the run's config (`optim`, `train.fsdp`, `train.grad_accum_steps`).
      name: the stage's config section.
      spec: its loss (`stage_loss`, with `total_steps` set).
      student: the module to train.
      teachers: the placed frozen teachers, or None when the step needs none (cached outputs).
      mesh: the device mesh.
      total_steps: the stage's updates (the learning-rate schedule's length).
      log: the run's metric log.
    """
    stage_config = config[name]
    optim_config = ml_collections.ConfigDict(config.optim.to_dict())
    optim_config.lr = stage_config.lr or config.optim.lr
    tx = optim.make_optimizer(optim_config, total_steps)
    fsdp = config.train.get("fsdp", False)
    state = sharding.place_state(train.TrainState.create(student, tx), mesh, fsdp=fsdp)
    lr_at = optim.warmup_linear_decay(optim_config.lr, total_steps, optim_config.warmup_ratio)
    stage = Stage(name=name, state=state, loop_step=None, total_steps=total_steps, lr_at=lr_at,
                  spec=spec, teachers=teachers, optim_config=optim_config, config=config,
                  mesh=mesh, log=log)
    update = spec.update_method()
    if update is not None:
        stage.state, stage.loop_step = update.make_update(stage)
        return stage
    stage.step = make_distill_step(mesh, spec, fsdp=fsdp,
                                   grad_accum_steps=config.train.get("grad_accum_steps", 1))
    stage.loop_step = functools.partial(_with_teachers, stage.step, teachers)
    return stage


def classifier_score(config, inputs: train.TaskInputs, mesh: Mesh,
                     classifier_of: Callable[[Any], nnx.Module]) -> Callable:
    """`(state, split) -> metrics` of the classifier `classifier_of(state)` (the held-out score
    of a `train.Selection`)."""
    predict_fn = train.make_predict_step(mesh)

    def score(state, split):
        graphdef, params = nnx.split(classifier_of(state), nnx.Param)
        return train.evaluate(predict_fn, graphdef, params, split, inputs.task.num_labels,
                              config.data.eval_batch_size, inputs.buckets, mesh)

    return score


def stage_split(config, stage, inputs: train.TaskInputs, *,
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
            return data.encode(examples, inputs.tokenizer, inputs.max_length)
        return data.without_labels(data.concatenate([inputs.train, inputs.unlabelled_rest]))
    if stage.data != "train":
        raise DistillError(f"a stage's data must be train or unlabelled, got {stage.data!r}")
    if uses_teacher and config.data.unlabelled_rest and len(inputs.unlabelled_rest):
        return data.concatenate([inputs.train, inputs.unlabelled_rest])
    return inputs.train


def with_augmented(config, split: data.EncodedSplit, inputs: train.TaskInputs, teacher,
                   cache_dir: pathlib.Path, *, progress: bool = False,
                   ) -> tuple[data.EncodedSplit, dict]:
    """`split` plus the augmented copies of the labelled examples (`config.augment`; label -1,
    so only teacher terms learn from them), as TinyBERT's task distillation trains. The set is
    built once per run and cached (`augment.augmented_split`); the teacher labels it through
    the stage's teacher-output cache like any other example."""
    augmented, info = augment.augmented_split(config, inputs.train_examples, inputs.tokenizer,
                                              teacher, cache_dir, inputs.max_length,
                                              progress=progress)
    return data.concatenate([split, augmented]), info


def start_task(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
               progress: bool = True) -> tuple[list[pathlib.Path], train.TaskInputs]:
    """The fine-tuned teacher directories (fine-tuning them first when needed) and the task's
    encoded splits, tokenised with the first teacher's tokenizer."""
    task = data.load_task(config.data.task, train_file=config.data.train_file,
                          dev_file=config.data.dev_file,
                          text_columns=tuple(config.data.text_columns),
                          label_column=config.data.label_column, splits=("dev",),
                          quoting=config.data.get("quoting", "auto"))
    # Named before any teacher is fine-tuned, so a bad data.label_names fails at once.
    class_names = train.task_class_names(config, task)
    teacher_dirs = prepare_teachers(config, workdir, task.label_names, class_names,
                                    progress=progress)
    task_config = ml_collections.ConfigDict({"model": {"name": str(teacher_dirs[0])},
                                             "data": config.data.to_dict()})
    return teacher_dirs, train.prepare_task(task_config)


def write_run_files(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                    label_names: list[str]) -> None:
    distributed.write_text(workdir / "config.json",
                           json.dumps(config_lib.to_dict(config), indent=2) + "\n")
    distributed.write_text(workdir / "labels.json", json.dumps(label_names) + "\n")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, student_run: type,
        *, methods: Sequence[type[Method]], progress: bool = True, extra_terms: tuple = (),
        measure_throughput: bool = True, overwrite: bool = False) -> dict:
    """The one run of every distillation: `student_run`'s start, each of its stages through the
    one training loop (checkpointed in WORKDIR/stages/NAME/, resumed from there), its finish.

    Args:
      config: a distillation config (see `kdjax.recipes`).
      workdir: the run directory.
      student_run: the `StudentRun` class of the run's student (`StagedBertRun`, or a method's).
      methods: the loss-method classes a stage's `loss` section holds
        (`kdjax.methods.loss_methods()`), in the order their terms are added.
      extra_terms: user loss terms `(name, weight, fn)` added to every stage's loss.
      measure_throughput: also time student and teacher inference on the dev split.
      overwrite: move a run of another config found in `workdir` aside (`workdir.claim`)
        instead of refusing.

    Returns:
      What `finish` returns (eval.json's contents), or `{"finished": False, ...}` when a stage
      stopped early (`train.stop_after_steps`; rerun to resume).

    Raises:
      workdir.WorkdirError: another process holds `workdir`, or it holds another run.
    """
    workdir, mesh = train.start_run(config, workdir)
    with workdir_lib.claim(workdir, config, "distill", overwrite=overwrite):
        return _run(config, workdir, mesh, student_run, methods=methods, progress=progress,
                    extra_terms=extra_terms, measure_throughput=measure_throughput)


def _run(config, workdir: pathlib.Path, mesh: Mesh, student_run: type, *, methods,
         progress: bool, extra_terms: tuple, measure_throughput: bool) -> dict:
    context = RunContext(config=config, workdir=workdir, mesh=mesh, methods=tuple(methods),
                         progress=progress, measure_throughput=measure_throughput,
                         extra_terms=tuple(extra_terms),
                         dropout_key=sharding.replicate(jax.random.key(config.train.seed), mesh))
    method = student_run(context)
    method.start()
    if context.log is None:
        context.log = metrics_lib.MetricLog(workdir, tensorboard=config.train.tensorboard)
    for name in method.stage_names():
        stage = method.init_stage(name)
        result = train.train_loop(
            stage.state, stage.loop_step, stage.batcher, total_steps=stage.total_steps,
            train_config=config.train, checkpoint_dir=workdir / "stages" / name / "checkpoints",
            log=context.log, mesh=mesh, dropout_key=context.dropout_key, lr_at=stage.lr_at,
            progress=progress, description=name, selection=stage.selection)
        if not result.finished:
            return {"finished": False, "stage": name, "steps": result.steps}
        context.train_seconds += result.train_seconds
        context.stages[name] = {"steps": result.steps, "train_seconds": result.train_seconds,
                                "epochs": result.steps / stage.batcher.num_batches,
                                **result.selection_record()}
        method.end_stage(name, result.state)
    return method.finish()


class StagedBertRun(StudentRun):
    """Fine-tuned teacher -> BERT student -> `config.stages` -> evaluation -> saved student.

    Resumable: finished teacher runs and stages are reused. Writes to the workdir: teacher-seedN/
    (when fine-tuning), stages/NAME/ (Orbax checkpoints of the student, never the teacher),
    metrics.jsonl, config.json, labels.json, model/ (the student as a Hugging Face directory)
    and eval.json.
    """

    NAME = "bert"

    def start(self) -> None:
        run, config = self.run, self.run.config
        self.teacher_dirs, self.inputs = start_task(config, run.workdir, progress=run.progress)
        teacher_arch, _ = hf.read_config(self.teacher_dirs[0])
        cfg = config.student
        student_arch = student_config(teacher_arch, layers=cfg.layers, hidden=cfg.hidden,
                                      heads=cfg.heads, intermediate=cfg.intermediate,
                                      dtype=cfg.dtype)
        # Every stage's loss, checked before any model is built (does a stage need an MLM head?).
        self.specs = {name: stage_loss(config, name, methods=run.methods, student=student_arch,
                                       teacher=teacher_arch, tokenizer=self.inputs.tokenizer,
                                       extra_terms=run.extra_terms) for name in config.stages}
        mlm_head = any(spec.needs.student_mlm_head for spec in self.specs.values())
        self.teachers = load_teachers(self.teacher_dirs, dtype=config.teacher.dtype,
                                      mlm_head=mlm_head)
        student = build_student(config, self.teachers[0], self.inputs.task.num_labels,
                                mlm_head=mlm_head)
        teacher_width = self.teachers[0].config.hidden_size if cfg.projection else None
        self.student = DistillStudent(student, teacher_width,
                                      rngs=nnx.Rngs(config.train.seed + 1))
        write_run_files(config, run.workdir, self.inputs.task.label_names)
        self.augment_info = None  # What the augmented set added, for eval.json (augment.method).

    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.run.config.stages)

    def init_stage(self, name: str) -> Stage:
        run, config, inputs = self.run, self.run.config, self.inputs
        stage_config = config[name]
        spec = self.specs[name]
        split = stage_split(config, stage_config, inputs, uses_teacher=spec.uses_teacher)
        if (config.get("augment") and config.augment.method != "none" and spec.uses_teacher
                and stage_config.data == "train"):
            split, info = with_augmented(config, split, inputs, self.teachers[0],
                                         run.workdir / "cache", progress=run.progress)
            self.augment_info = {"augmented_examples": info["augmented_examples"],
                                 "augmented_examples_per_s": info["augmented_examples_per_s"]}
        batcher = data.Batcher(split, config.data.batch_size, buckets=inputs.buckets,
                               shuffle=True, seed=config.train.seed)
        total_steps = config.train.max_steps or max(
            1, math.ceil(stage_config.epochs * batcher.num_batches))
        spec = dataclasses.replace(spec, total_steps=total_steps)
        stage_teachers = None
        if spec.uses_teacher:
            models, dirs, key_extra = self.teachers, self.teacher_dirs, None
            if stage_config.teacher == "pretrained":
                num_labels = inputs.task.num_labels
                models = [hf.load_pretrained(config.teacher.name, num_labels=num_labels,
                                             dtype=config.teacher.dtype)[0]]
                dirs = [hf.resolve_checkpoint(config.teacher.name)]
                # hf.load_pretrained's new head for the task (seed 0) is in no file.
                key_extra = {"new_head_labels": num_labels, "seed": 0}
            elif stage_config.teacher != "finetuned":
                raise DistillError(f"{name}.teacher must be finetuned or pretrained, got "
                                   f"{stage_config.teacher!r}")
            stage_teachers = sharding.place_state(Teachers.create(models), run.mesh,
                                                  fsdp=config.train.get("fsdp", False))
            # Fixed inputs: the teachers' outputs are computed once, stored, and read back with
            # each batch (kdjax/teacher_cache.py); the step then runs no teacher.
            cache = teacher_cache.for_stage(
                config, name, spec, teachers=models, split=split, buckets=inputs.buckets,
                mesh=run.mesh, workdir=run.workdir, teacher_dirs=dirs, key_extra=key_extra,
                progress=run.progress)
            if cache is not None:
                batcher = teacher_cache.CachedTeacherBatcher(batcher, cache)
                spec = dataclasses.replace(spec, cached_hidden_layers=cache.hidden_layers)
                stage_teachers = None
        stage = build_stage(config, name, spec, self.student, stage_teachers, run.mesh,
                            total_steps=total_steps, log=run.log)
        stage.batcher = batcher
        if name == config.stages[-1]:
            # Only the last stage trains the classifier the run exports (TinyBERT's earlier
            # stages have no task output worth scoring), so only it selects on the held-out slice.
            stage.selection = train.holdout_selection(
                config, inputs.holdout, classifier_score(config, inputs, run.mesh,
                                                         lambda state: state.model().model),
                export_best=lambda state, step, metrics: train.export_best_model(
                    config, classifier_only(state.model().model), run.workdir, inputs, step,
                    metrics))
        print(f"stage {name}: {total_steps} steps over {len(batcher.split)} examples, terms "
              f"{spec.term_names}", flush=True)
        return stage

    def end_stage(self, name: str, state) -> None:
        self.student = state.model()

    def finish(self) -> dict:
        run = self.run
        return finish(run.config, run.workdir, self.student.model, self.teachers, self.inputs,
                      run.mesh, run.log, run.train_seconds, run.stages, run.measure_throughput,
                      extra=self.augment_info)


# ------------------------------------------------------------------------------------------------
# Evaluation and export


def inference_speed(model: nnx.Module, split: data.EncodedSplit, batch_size: int,
                    buckets, mesh: Mesh, repeats: int = 3) -> float:
    """Examples/s of deterministic inference over `split`, compiled first (best of `repeats`)."""
    predict_fn = train.make_predict_step(mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    params = sharding.replicate(params, mesh)
    batcher = data.Batcher(split, batch_size, buckets=buckets, shuffle=False)
    train.predict(predict_fn, graphdef, params, batcher, mesh)  # Compile every bucket.
    return max(train.predict(predict_fn, graphdef, params, batcher, mesh)[1]
               for _ in range(repeats))


def dev_logits(model: nnx.Module, inputs: train.TaskInputs, mesh: Mesh, batch_size: int,
               predict_fn: Callable | None = None) -> np.ndarray:
    """[N, C] float32 logits of `model` on the dev split, in the split's order."""
    predict_fn = predict_fn or train.make_predict_step(mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    batcher = data.Batcher(inputs.dev, batch_size, buckets=inputs.buckets, shuffle=False)
    return train.predict(predict_fn, graphdef, sharding.replicate(params, mesh), batcher,
                         mesh)[0]


def compare_on_dev(student: nnx.Module, teachers, inputs: train.TaskInputs, mesh: Mesh,
                   batch_size: int, *, logits_path: pathlib.Path | None = None) -> dict:
    """The student's dev metrics beside the teachers': `student_metrics` and `teacher_metrics`
    hold the same keys (accuracy, mcc, and f1 for two classes or macro_f1 for more; several
    teachers: their ensemble, probabilities averaged as the soft targets are), the student's
    are also at the top level; each teacher's own accuracy and the best of them, the student's
    agreement with the teacher's predictions, KL(teacher || student), the expected calibration
    error (15 bins) of both, and the task's headline `metric` (`data.task_metric`) as
    `dev_metric` and `teacher_dev_metric`.

    Args:
      logits_path: also save the dev logits of student and teacher there
        (`metrics.write_dev_logits`; an ensemble's teacher logits are the log of its averaged
        probabilities).
    """
    labels, num_labels = inputs.dev.labels, inputs.task.num_labels
    predict_fn = train.make_predict_step(mesh)
    each_teacher_probs = [
        np.asarray(jax.nn.softmax(dev_logits(t, inputs, mesh, batch_size, predict_fn)))
        for t in teachers]
    student_logits = dev_logits(student, inputs, mesh, batch_size, predict_fn)
    # The ensemble as one model: log of the averaged probabilities (softmax gives them back).
    teacher_logits = np.log(np.maximum(np.mean(each_teacher_probs, 0), 1e-30))
    student_pred = student_logits.argmax(-1)
    teacher_pred = teacher_logits.argmax(-1)
    single_accuracies = [float(np.mean(p.argmax(-1) == labels)) for p in each_teacher_probs]
    student_metrics = metrics_lib.classification_metrics(student_pred, labels, num_labels)
    teacher_metrics = metrics_lib.classification_metrics(teacher_pred, labels, num_labels)
    metric = data.task_metric(inputs.task.name)
    # The student's metrics stay at the top level too, where every earlier eval.json has them.
    result = dict(student_metrics)
    result.update(
        metric=metric, dev_metric=result[metric], teacher_dev_metric=teacher_metrics[metric],
        student_metrics=student_metrics, teacher_metrics=teacher_metrics,
        teacher_accuracy=teacher_metrics["accuracy"],
        teacher_accuracies=single_accuracies,
        best_single_teacher_accuracy=max(single_accuracies),
        teacher_agreement=float(np.mean(student_pred == teacher_pred)),
        teacher_kl=metrics_lib.mean_kl_divergence(teacher_logits, student_logits),
        ece=metrics_lib.expected_calibration_error(student_logits, labels),
        teacher_ece=metrics_lib.expected_calibration_error(teacher_logits, labels),
        examples=len(labels))
    if logits_path is not None:
        metrics_lib.write_dev_logits(logits_path, labels, student_logits, teacher_logits)
    return result


# Dev examples the layer similarity reads at most: CKA's cost grows with the examples squared
# in memory of the features kept, and a few thousand already fix it to about 1e-2.
CKA_MAX_EXAMPLES = 2000


def _pooled_hidden_states(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> jax.Array:
    """[B, 2 * (layers + 1) * H]: every hidden state's [CLS] vector, then its mean over real
    tokens, flattened so that `train.predict` gathers them like logits."""
    out = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                      batch["token_type_ids"], output_hidden_states=True)
    mask = batch["attention_mask"][..., None].astype(jnp.float32)  # [B, L, 1]
    hidden = [h.astype(jnp.float32) for h in out.hidden_states]  # each [B, L, H]
    cls = jnp.stack([h[:, 0] for h in hidden], 1)  # [B, layers + 1, H]
    mean = jnp.stack([(h * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
                            for h in hidden], 1)
    return jnp.concatenate([cls, mean], 1).reshape(cls.shape[0], -1)


def layer_similarity(student: BertClassifier, teacher: BertClassifier,
                     inputs: train.TaskInputs, mesh: Mesh, batch_size: int) -> dict:
    """Linear CKA (`metrics.linear_cka`) of every student hidden state against every teacher
    hidden state on dev (the first `CKA_MAX_EXAMPLES`), for the [CLS] vector and for the mean
    over real tokens. Row/column 0 is the embedding output, i the output of layer i.

    Returns:
      {"cls": [[S+1 x T+1]], "mean": [[...]], "examples": N} (JSON-ready lists; null where CKA
      is undefined: the embedding output's [CLS] vector is the same for every example).
    """
    split = inputs.dev
    if len(split) > CKA_MAX_EXAMPLES:
        split = split.subset(np.arange(CKA_MAX_EXAMPLES))
    batch_split = sharding.batch_sharded(mesh)
    features_fn = jax.jit(_pooled_hidden_states, static_argnums=0,
                          in_shardings=(None, batch_split), out_shardings=batch_split)

    def features(model):
        graphdef, params = nnx.split(model, nnx.Param)
        batcher = data.Batcher(split, batch_size, buckets=inputs.buckets, shuffle=False)
        flat = train.predict(features_fn, graphdef, sharding.replicate(params, mesh), batcher,
                             mesh)[0]
        layers, width = model.config.num_hidden_layers + 1, model.config.hidden_size
        both = flat.reshape(len(split), 2, layers, width)
        return both[:, 0], both[:, 1]  # [N, layers + 1, H] each

    student_cls, student_mean = features(student)
    teacher_cls, teacher_mean = features(teacher)
    by_layer = lambda f: [f[:, i] for i in range(f.shape[1])]

    def json_ready(matrix):  # Undefined entries (NaN) as null: eval.json stays strict JSON.
        return [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]

    return {"cls": json_ready(metrics_lib.cka_matrix(by_layer(student_cls),
                                                     by_layer(teacher_cls))),
            "mean": json_ready(metrics_lib.cka_matrix(by_layer(student_mean),
                                                      by_layer(teacher_mean))),
            "examples": len(split)}


def evaluate_student(config, student: nnx.Module, teachers, inputs: train.TaskInputs,
                     mesh: Mesh, *, measure_throughput: bool, student_layers: int,
                     student_hidden: int, student_non_embedding_params: int,
                     train_seconds: float, stages: dict,
                     logits_path: pathlib.Path | None = None) -> dict:
    """The keys of every distillation run's eval.json: dev metrics beside the teachers', sizes,
    training time and (with `measure_throughput`) inference examples/s of student and teacher.
    With `logits_path`, the dev logits are saved there (`compare_on_dev`)."""
    eval_bs, buckets = config.data.eval_batch_size, inputs.buckets
    result = compare_on_dev(student, teachers, inputs, mesh, eval_bs, logits_path=logits_path)
    result.update(
        student_layers=student_layers, student_hidden=student_hidden,
        student_params=count_params(nnx.state(student, nnx.Param)),
        student_non_embedding_params=student_non_embedding_params,
        teacher_non_embedding_params=non_embedding_params(teachers[0]),
        train_seconds=train_seconds, stages=stages, finished=True)
    if measure_throughput:
        result.update(
            student_examples_per_s=inference_speed(student, inputs.dev, eval_bs, buckets, mesh),
            teacher_examples_per_s=inference_speed(teachers[0], inputs.dev, eval_bs, buckets,
                                                   mesh))
    return result


def write_result(workdir: pathlib.Path, log, result: dict) -> None:
    """The final dev line of metrics.jsonl and eval.json."""
    log.discard_after("dev", -1)  # A rerun of a finished run records its evaluation once.
    log.write(sum(r["steps"] for r in result["stages"].values()), "dev", result)
    distributed.write_text(workdir / "eval.json", json.dumps(result, indent=2) + "\n")


def classifier_only(student: BertClassifier) -> BertClassifier:
    """`student` as the exported classifier: without its MLM head (a copy) when it has one."""
    if student.mlm is None:
        return student
    export = BertClassifier(student.config, student.num_labels, rngs=nnx.Rngs(0))
    nnx.update(export.bert, nnx.state(student.bert, nnx.Param))
    nnx.update(export.classifier, nnx.state(student.classifier, nnx.Param))
    return export


def finish(config, workdir: pathlib.Path, student: BertClassifier, teachers, inputs, mesh,
           log, train_seconds: float, stage_results: dict, measure_throughput: bool,
           extra: dict | None = None) -> dict:
    """Dev evaluation, teacher agreement, throughputs; saves the BERT student and eval.json
    (with `extra`'s keys)."""
    result = evaluate_student(
        config, student, teachers, inputs, mesh, measure_throughput=measure_throughput,
        student_layers=student.config.num_hidden_layers,
        student_hidden=student.config.hidden_size,
        student_non_embedding_params=non_embedding_params(student),
        train_seconds=train_seconds, stages=stage_results,
        logits_path=workdir / metrics_lib.DEV_LOGITS_FILE)
    # Computed here, where both models are loaded, so a report never reruns them.
    result["layer_cka"] = layer_similarity(student, teachers[0], inputs, mesh,
                                           config.data.eval_batch_size)
    result.update(extra or {})
    if inputs.holdout is not None and len(inputs.holdout):
        result["holdout_examples"] = len(inputs.holdout)
    export = classifier_only(student)
    hf.save_pretrained(export, workdir / "model", label_names=inputs.class_names,
                       tokenizer=inputs.tokenizer,
                       extra={"kdjax_config": config_lib.to_dict(config), "dev": result})
    result.update(train.check_saved_model(config, export, workdir / "model", inputs.task))
    write_result(workdir, log, result)
    return result

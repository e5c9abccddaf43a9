"""Distilled BiLSTM (Tang et al. 2019): the run behind `kdjax distill` for `config.method =
"bilstm"`.

fine-tuned teacher (`distill.prepare_teachers`) -> augmented transfer set (`kdjax.augment`:
Tang's rules or TinyBERT's replacement; cached in the workdir) -> the teacher labels the whole
transfer set once (batched, jitted, cached on disk; never inside the training step) -> the
BiLSTM student trains on `alpha CE + (1 - alpha) logit MSE` with Adadelta through
`train.train_loop` -> dev evaluation, throughputs, `model/` and eval.json.

The loss is `distill.combined_loss` with the stage's LossSpec (ce, logit_mse,
hard_labels_from_teacher): augmented examples carry label -1 and take the teacher's argmax as
their hard label. A loss without teacher terms (configs/bilstm_baseline.py) skips augmentation
and labelling and trains on the labelled examples alone.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import augment as augment_lib, distributed
from kdjax import config as config_lib, data, distill, hf, sharding, teacher_cache, train
from kdjax import metrics as metrics_lib
from kdjax.models.bert import BertClassifier, count_params
# load_bilstm is re-exported: `from kdjax.bilstm import load_bilstm` loads a run's model/.
from kdjax.models.bilstm import (BiLSTMClassifier, BiLSTMConfig, load_bilstm,  # noqa: F401
                                 non_embedding_params, save_bilstm)

AUGMENT_METHODS = ("tang", "tinybert", "none")


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
                spec: distill.LossSpec, grad_accum_steps: int = 1,
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
            loss, metrics = distill.combined_loss(spec, out, teacher_out, batch, state.step)
            return loss, (metrics, out.logits)

        (loss, (metrics, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, distill.student_step_metrics(metrics, loss, logits, batch, grads)

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


def augmented_split(config: ml_collections.ConfigDict, examples: list[data.Example], tokenizer,
                    teacher: BertClassifier, cache_dir: pathlib.Path,
                    ) -> tuple[data.EncodedSplit, dict]:
    """The augmented examples of `config.augment` (label -1), tokenised; cached in
    `cache_dir/augmented-HASH.npz`, HASH covering the examples, the augment section, the
    tokenizer's vocabulary and (TinyBERT) the teacher's embedding table.

    Returns:
      (split, info) with info = {augmented_examples, augmented_examples_per_s,
      augment_seconds, augment_rounds, cached}.
    """
    cfg = config.augment
    embeddings = None
    if cfg.method == "tinybert":
        embeddings = np.asarray(teacher.bert.embeddings.word_embeddings.embedding[...])
    key = teacher_cache.digest(cfg.to_dict(), config.data.max_length,
                               sorted(tokenizer.get_vocab().items()),
                               [(e.text_a, e.text_b) for e in examples],
                               embeddings if embeddings is not None else b"")
    path = pathlib.Path(cache_dir) / f"augmented-{key}.npz"
    distributed.barrier("augmentation cache")  # Same decision on every process; 0 writes.
    if path.is_file():
        with np.load(path) as saved:
            split = data.EncodedSplit(saved["input_ids"], saved["token_type_ids"],
                                      saved["lengths"], saved["labels"])
            info = json.loads(str(saved["info"]))
        return split, {**info, "cached": True}
    if cfg.method == "tang":
        rules = augment_lib.TangRules(p_mask=cfg.p_mask, p_pos=cfg.p_pos, p_ng=cfg.p_ng,
                                      max_ngram=cfg.max_ngram)
        make = lambda texts: augment_lib.TangGenerator(texts, rules)
    elif cfg.method == "tinybert":
        make = lambda texts: augment_lib.TinyBertGenerator(texts, tokenizer, embeddings,
                                                           p_t=cfg.p_t, k=cfg.k)
    else:
        raise augment_lib.AugmentError(f"augment.method must be one of {AUGMENT_METHODS}, "
                                       f"got {cfg.method!r}")
    result = augment_lib.augment(examples, make, n_iter=cfg.n_iter,
                                 max_examples=cfg.max_examples, seed=cfg.seed,
                                 pair_sides=cfg.pair_sides)
    split = data.encode(result.examples, tokenizer, config.data.max_length)
    info = {"augmented_examples": len(result.examples),
            "augmented_examples_per_s": result.examples_per_s,
            "augment_seconds": result.seconds, "augment_rounds": result.rounds}
    print(f"augmentation ({cfg.method}): {len(result.examples):,} new examples from "
          f"{len(examples):,} in {result.seconds:.1f} s ({result.examples_per_s:,.0f}/s, "
          f"{result.rounds} rounds)", flush=True)
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **teacher_cache.split_arrays(split), info=json.dumps(info))
        tmp.rename(path)
    return split, {**info, "cached": False}


# ------------------------------------------------------------------------------------------------
# The run


def check_config(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks `config.validate` cannot express, before any work starts.

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
    for term in ("embedding", "hidden", "attention", "attention_kl", "cosine", "pkd", "mlm",
                 "adversarial"):
        if stage.loss.get(term, 0.0):
            raise config_lib.ConfigError(
                f"config key '{config.stages[0]}.loss.{term}' needs BERT hidden states, "
                "attention or an MLM head, which the BiLSTM student does not have; use ce, "
                "logit_mse, soft or soft_ce")
    if stage.teacher != "finetuned":
        raise config_lib.ConfigError(f"config key '{config.stages[0]}.teacher' must be "
                                     "'finetuned' for method=bilstm")


def distill_bilstm(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                   progress: bool = True, measure_throughput: bool = True) -> dict:
    """Fine-tuned teacher -> augmented transfer set -> teacher labels -> BiLSTM -> evaluation.

    Resumable like `distill.distill`: the teacher run, the augmented set, the teacher's labels
    and the stage's checkpoints are reused. Writes to `workdir`: teacher-seedN/, cache/
    (augmented-HASH.npz, teacher-outputs-KEY/), stages/NAME/checkpoints (Orbax),
    metrics.jsonl, config.json, labels.json, model/ (`load_bilstm`) and eval.json.

    Returns:
      `distill._finish`'s keys (student_layers=1, student_hidden=LSTM width) plus
      augmented_examples, augmented_examples_per_s, transfer_examples and
      teacher_labelling_seconds.
    """
    workdir, mesh = train.start_run(config, workdir)
    check_config(config)
    task = data.load_task(config.data.task, train_file=config.data.train_file,
                          dev_file=config.data.dev_file,
                          text_columns=tuple(config.data.text_columns),
                          label_column=config.data.label_column, splits=("dev",))
    teacher_dirs = distill.prepare_teachers(config, workdir, task.label_names, progress=progress)
    task_config = ml_collections.ConfigDict({"model": {"name": str(teacher_dirs[0])},
                                             "data": config.data.to_dict()})
    inputs = train.prepare_task(task_config)
    teachers = [hf.load_pretrained(str(d), dtype=config.teacher.dtype)[0] for d in teacher_dirs]
    name = config.stages[0]
    stage = config[name]
    spec = distill.LossSpec.from_config(stage.loss, student_layers=1, teacher_layers=1,
                                        total_steps=1, tokenizer=inputs.tokenizer)
    distributed.write_text(workdir / "config.json",
                           json.dumps(config_lib.to_dict(config), indent=2) + "\n")
    distributed.write_text(workdir / "labels.json", json.dumps(inputs.task.label_names) + "\n")
    cache_dir = workdir / "cache"

    # The transfer set: the labelled examples (plus the unlabelled rest of a few-labels run),
    # then the augmented copies; without a teacher term, the labelled examples alone.
    split = inputs.train
    extra = {"augmented_examples": 0, "augmented_examples_per_s": None,
             "transfer_examples": 0, "teacher_labelling_seconds": 0.0}
    if spec.uses_teacher:
        if config.data.unlabelled_rest and len(inputs.unlabelled_rest):
            split = data.concatenate([split, inputs.unlabelled_rest])
        if config.augment.method != "none":
            source = inputs.task.splits["train"]
            if config.data.train_limit:  # The labelled subset train.prepare_task chose.
                order = np.random.default_rng(config.data.subset_seed).permutation(len(source))
                source = [source[i] for i in np.sort(order[:config.data.train_limit])]
            augmented, info = augmented_split(config, source, inputs.tokenizer, teachers[0],
                                              cache_dir)
            extra.update(augmented_examples=info["augmented_examples"],
                         augmented_examples_per_s=info["augmented_examples_per_s"])
            split = data.concatenate([split, augmented])
    extra["transfer_examples"] = len(split)

    batcher = data.Batcher(split, config.data.batch_size, buckets=inputs.buckets, shuffle=True,
                           seed=config.train.seed)
    if spec.uses_teacher:
        # The step never runs the teacher, so its logits are always cached (teacher.cache
        # cannot turn that off here); teacher.cache_dir picks where.
        cache = teacher_cache.load_or_compute(
            teacher_dirs, teachers, split, mesh=mesh,
            cache_dir=teacher_cache.cache_directory(config, workdir),
            batch_size=config.data.eval_batch_size, buckets=inputs.buckets,
            teacher_dtype=config.teacher.dtype, max_gb=config.teacher.cache_max_gb,
            description="the transfer set")
        extra["teacher_labelling_seconds"] = _labelling_info(cache)["seconds"]
        batcher = teacher_cache.CachedTeacherBatcher(batcher, cache)

    student = build_student(config, teachers[0], inputs.task.num_labels, inputs.tokenizer,
                            inputs.task.label_names, pair=inputs.task.is_pair)
    total_steps = config.train.max_steps or max(1, math.ceil(stage.epochs * batcher.num_batches))
    optim_config = ml_collections.ConfigDict(config.optim.to_dict())
    optim_config.lr = stage.lr or config.optim.lr
    tx = make_optimizer(optim_config, train_embedding=config.student.train_embedding)
    fsdp = config.train.get("fsdp", False)
    state = sharding.place_state(train.TrainState.create(student, tx), mesh, fsdp=fsdp)
    step_fn = train.make_train_step(mesh, functools.partial(bilstm_step, spec=spec), fsdp=fsdp,
                                    grad_accum_steps=config.train.get("grad_accum_steps", 1))
    log = metrics_lib.MetricLog(workdir, tensorboard=config.train.tensorboard)
    print(f"stage {name}: {total_steps} steps over {len(split):,} examples "
          f"({len(inputs.train):,} labelled), terms {distill._term_names(spec)}", flush=True)
    run = train.train_loop(
        state, step_fn, batcher, total_steps=total_steps, train_config=config.train,
        checkpoint_dir=workdir / "stages" / name / "checkpoints", log=log, mesh=mesh,
        dropout_key=sharding.replicate(jax.random.key(config.train.seed), mesh),
        lr_at=optax.constant_schedule(optim_config.lr), progress=progress, description=name)
    if not run.finished:
        return {"finished": False, "stage": name, "steps": run.steps}
    stages = {name: {"steps": run.steps, "train_seconds": run.train_seconds}}
    return _finish(config, workdir, run.state.model(), teachers, inputs, mesh, log,
                   run.train_seconds, stages, measure_throughput, extra)


def _finish(config, workdir: pathlib.Path, student: BiLSTMClassifier, teachers, inputs, mesh,
            log, train_seconds: float, stages: dict, measure_throughput: bool,
            extra: dict) -> dict:
    """Dev evaluation, teacher agreement and throughputs (the keys of `distill._finish`); saves
    the student to model/ and eval.json."""
    eval_bs, buckets = config.data.eval_batch_size, inputs.buckets
    result = distill.compare_on_dev(student, teachers, inputs, mesh, eval_bs)
    result.update(
        student_layers=1, student_hidden=student.config.hidden_size,
        student_params=count_params(nnx.state(student, nnx.Param)),
        student_non_embedding_params=non_embedding_params(student),
        teacher_non_embedding_params=distill.non_embedding_params(teachers[0]),
        train_seconds=train_seconds, stages=stages, finished=True,
        **extra)
    if measure_throughput:
        result.update(
            student_examples_per_s=distill.inference_speed(student, inputs.dev, eval_bs,
                                                           buckets, mesh),
            teacher_examples_per_s=distill.inference_speed(teachers[0], inputs.dev, eval_bs,
                                                           buckets, mesh))
        result["speedup"] = result["student_examples_per_s"] / result["teacher_examples_per_s"]
    log.write(sum(s["steps"] for s in stages.values()), "dev", result)
    save_bilstm(student, workdir / "model", tokenizer=inputs.tokenizer,
                extra={"kdjax_config": config_lib.to_dict(config), "dev": result})
    distributed.write_text(workdir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result

"""Training state, the pure jitted train/eval steps, and the fine-tuning loop.

Steps live at module level over a `TrainState` pytree: `nnx.merge` the graph definition with the
parameters inside the step, compute, return the new state. `make_train_step` jits them over the
device mesh: batch split over the `data` axis, state replicated (or FSDP-split, `train.fsdp`),
state buffers donated. `accumulate_gradients` lets every step kind take one update from several
micro-batches (`train.grad_accum_steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import checkpoint, data, distributed, hf, optim, sharding
from kdjax import config as config_lib, metrics as metrics_lib, workdir as workdir_lib
from kdjax.models import bilstm
from kdjax.models.bert import BertClassifier


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved (a KeyboardInterrupt, so
    that `except Exception` does not swallow it).

    Attributes:
      signum: the signal.
      step: the step saved.
    """

    def __init__(self, message: str, signum: int, step: int | None = None):
        super().__init__(message)
        self.signum, self.step = signum, step


class _StopSignals:
    """While active (in the main thread), SIGINT and SIGTERM only set `signum`: the training loop
    then stops after the current step and saves, instead of dying mid-step or mid-save."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            # A second signal while stopping: the user does not want to wait for the save.
            self.__exit__()
            raise TrainingInterrupted(
                f"interrupted again by {name} before the checkpoint was saved; the last "
                "complete checkpoint is kept; run the same command again to resume", signum)
        print(f"\nreceived {name}: saving a checkpoint after this step, then stopping (send it "
              "again to stop at once)", flush=True)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


@flax.struct.dataclass
class TrainState:
    """Everything an update step changes, plus the static pieces it needs.

    `graphdef` (the model's structure) and `tx` (the optimizer) are static: part of the jit cache
    key, never traced, never checkpointed.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation) -> "TrainState":
        graphdef, params = nnx.split(model, nnx.Param)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   graphdef=graphdef, tx=tx)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def arrays(self) -> dict:
        """The checkpointed part."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    def with_arrays(self, arrays: dict) -> "TrainState":
        return self.replace(step=arrays["step"], params=arrays["params"],
                            opt_state=arrays["opt_state"])


def apply_gradients(state: TrainState, grads: nnx.State, **changes) -> TrainState:
    """The optimizer update every step kind ends with: new parameters and optimizer state, the
    step counter advanced, and any other `changes` to the state's fields."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, **changes)


def _model_inputs(batch: dict) -> tuple:
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy in float32; rows with label -1 (padding) give 0."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.maximum(labels, 0))
    return jnp.where(labels >= 0, per_example, 0.0)


def weighted_sums(per_example_loss: jax.Array, logits: jax.Array, batch: dict) -> dict:
    """Metrics as sums with a count, so averages stay right across batches and devices."""
    w = batch["weights"]
    return {
        "loss_sum": jnp.sum(per_example_loss * w),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w),
        "count": jnp.sum(w),
    }


def split_micro_batches(batch: dict, num_micro_batches: int) -> dict:
    """[B, ...] -> [k, B/k, ...] for every entry: row i of micro-batch j is row i * k + j.

    Strided, not contiguous blocks: the batch is split over the devices in contiguous blocks,
    so each micro-batch takes rows from every device's block and stays spread over all of them
    (contiguous blocks would each live on B/k-th of the devices).
    """
    k = num_micro_batches

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(micro_step: Callable, params: nnx.State, batch: dict,
                         num_micro_batches: int, key: jax.Array,
                         layout: sharding.Layout | None = None) -> tuple[nnx.State, dict]:
    """One update's gradient from `num_micro_batches` micro-batches, one at a time.

    The batch is split by `split_micro_batches`; a `jax.lax.scan` runs `micro_step` on each
    (so only one micro-batch's activations are alive at a time) and adds its gradient weighted
    by its share of the batch's real examples (`weights`), n_j / N: for a loss that is a mean
    over the real rows, sum_j (n_j / N) grad(mean over micro-batch j) is the full batch's
    gradient. A term averaged over a subset of rows (hard CE over labelled rows only) is exact
    when each micro-batch holds the same share of that subset, and close otherwise (the usual
    behaviour of gradient accumulation).

    Args:
      micro_step: `(params, micro_batch, key) -> (grads of the micro-batch's mean loss, metric
        sums)`. Metric sums add up over micro-batches; a `grad_norm` entry is recomputed from
        the accumulated gradient.
      params: the parameters the gradient is taken for.
      batch: the step's (global) batch; every entry has the batch dimension first.
      num_micro_batches: k (`train.grad_accum_steps`); 1 calls `micro_step(params, batch, key)`
        once, exactly the computation of a step without accumulation.
      key: the step's key; micro-batch j gets `fold_in(key, j)` when k > 1.
      layout: the step's mesh and FSDP flag (`sharding.with_accumulation` binds it); None
        leaves the layout of what the loop creates to XLA.

    Returns:
      (gradient, metric sums) of the whole batch.

    Raises:
      ValueError: k does not divide the batch (names train.grad_accum_steps).
    """
    k = num_micro_batches
    if k == 1:
        return micro_step(params, batch, key)
    size = batch["weights"].shape[0]
    if k < 1 or size % k:
        raise ValueError(f"train.grad_accum_steps={k} must divide the batch of {size} rows")
    micro_batches = split_micro_batches(batch, k)
    constrain_grads = constrain_rows = gather_params = lambda tree: tree
    if layout is not None:
        mesh, fsdp = layout.mesh, layout.fsdp
        # Micro-batch rows split over `data` like the batch; the running gradient laid out like
        # the parameters (under FSDP each device accumulates only its slice).
        constrain_rows = functools.partial(jax.lax.with_sharding_constraint,
                                           shardings=sharding.batch_sharded(mesh))
        constrain_grads = functools.partial(sharding.constrain_state, mesh=mesh, fsdp=fsdp)
        if fsdp:
            # FSDP: gather the parameters for each micro-batch's compute, so that the loop
            # body runs data-parallel (left alone, XLA's propagation through the loop shards
            # activations along the split parameter dimensions instead).
            gather_params = functools.partial(jax.lax.with_sharding_constraint,
                                              shardings=sharding.replicated(mesh))
    total = jnp.sum(batch["weights"])

    def accumulate(grads_sum, inputs):
        index, micro_batch = inputs
        micro_batch = constrain_rows(micro_batch)
        grads, metrics = micro_step(gather_params(params), micro_batch,
                                    jax.random.fold_in(key, index))
        share = jnp.where(total > 0, jnp.sum(micro_batch["weights"]) / total, 0.0)
        grads_sum = jax.tree.map(lambda acc, g: acc + share * g.astype(acc.dtype), grads_sum,
                                 grads)
        return constrain_grads(grads_sum), metrics

    zeros = constrain_grads(jax.tree.map(jnp.zeros_like, params))
    grads, per_micro = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro_batches))
    metrics = jax.tree.map(lambda m: jnp.sum(m, 0), per_micro)
    if "grad_norm" in metrics:
        metrics["grad_norm"] = optax.tree.norm(grads)
    return grads, metrics


def train_step(state: TrainState, batch: dict, dropout_base_key: jax.Array, *,
               grad_accum_steps: int = 1, layout: sharding.Layout | None = None,
               ) -> tuple[TrainState, dict]:
    """One supervised fine-tuning update on a (global) batch.

    Args:
      state: current state (donated by the jitted version).
      batch: input_ids, attention_mask, token_type_ids [B, L]; labels, weights [B].
      dropout_base_key: the run's key; the step's dropout key is derived from it and the step
        number, so a resumed run draws the same dropout masks.
      grad_accum_steps: micro-batches per update (`accumulate_gradients`).
      layout: the step's mesh and FSDP flag, for the accumulation loop.

    Returns:
      (new state, metric sums for this step).
    """
    dropout_key = jax.random.fold_in(dropout_base_key, state.step)

    def micro_step(params, batch, dropout_key):
        def loss_fn(params):
            model = nnx.merge(state.graphdef, params)
            logits = model(*_model_inputs(batch), dropout_key=dropout_key).logits
            per_example = classification_loss(logits, batch["labels"])
            loss = (jnp.sum(per_example * batch["weights"])
                    / jnp.maximum(jnp.sum(batch["weights"]), 1))
            return loss, (per_example, logits)

        (_, (per_example, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, weighted_sums(per_example, logits, batch)

    grads, step_metrics = accumulate_gradients(micro_step, state.params, batch,
                                               grad_accum_steps, dropout_key, layout)
    step_metrics["grad_norm"] = optax.tree.norm(grads)
    return apply_gradients(state, grads), step_metrics


def predict_step(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> jax.Array:
    """Deterministic float32 logits [B, num_labels]."""
    return nnx.merge(graphdef, params)(*_model_inputs(batch)).logits


def make_train_step(mesh: Mesh, step_fn: Callable = train_step, *, fsdp: bool = False,
                    grad_accum_steps: int = 1) -> Callable:
    """`step_fn(state, batch, key)` jitted over `mesh`: batch split over `data`, state
    replicated (FSDP-split with `fsdp`, see `sharding.place_state`) in and out, and donated.

    Args:
      grad_accum_steps: bound with the layout by `sharding.with_accumulation` when not 1.
    """
    step_fn = sharding.with_accumulation(step_fn, grad_accum_steps, mesh, fsdp=fsdp)
    return sharding.jit_step(step_fn, mesh, (sharding.STATE, sharding.BATCH,
                                             sharding.REPLICATED), fsdp=fsdp)


def make_predict_step(mesh: Mesh) -> Callable:
    """Jitted `predict_step`: batch split over `data`; the parameters keep the layout they come
    with (replicated, or FSDP-split straight from a training state)."""
    split = sharding.batch_sharded(mesh)
    return jax.jit(predict_step, static_argnums=0, in_shardings=(None, split),
                   out_shardings=split)


# ------------------------------------------------------------------------------------------------
# Evaluation


def predict(predict_fn: Callable, graphdef: nnx.GraphDef, params: nnx.State,
            batcher: data.Batcher, mesh: Mesh,
            on_batch: Callable[[], None] | None = None) -> tuple[np.ndarray, float]:
    """Logits for every example of `batcher`'s split, in the split's order, and examples/s.

    With several processes each feeds its rows of every batch, and every process gets all the
    logits (batch-split outputs are all-gathered, so every process must call this).

    Args:
      on_batch: called once each batch is computed (a progress bar); the loop then waits for
        batch k - 1 after dispatching batch k, so that the count follows the device rather than
        the (asynchronous) dispatch, while the device always has the next batch queued.
    """
    start = time.perf_counter()
    pending = []
    for batch in batcher.epoch(0):
        global_batch = sharding.shard_batch(batch, mesh)
        pending.append((global_batch["example_index"],
                        predict_fn(graphdef, params, global_batch)))
        if on_batch is not None and len(pending) > 1:
            jax.block_until_ready(pending[-2][1])
            on_batch()
    if on_batch is not None and pending:
        jax.block_until_ready(pending[-1][1])
        on_batch()
    # One host transfer at the end instead of a sync per batch.
    host = (jax.device_get(pending) if jax.process_count() == 1
            else distributed.host_arrays(pending))
    logits = np.zeros((len(batcher.split), host[0][1].shape[1]), np.float32)
    for index, out in host:
        real = index >= 0
        logits[index[real]] = out[real]
    seconds = time.perf_counter() - start
    return logits, len(batcher.split) / max(seconds, 1e-9)


def evaluate(predict_fn: Callable, graphdef: nnx.GraphDef, params: nnx.State,
             split: data.EncodedSplit, num_labels: int, batch_size: int, buckets, mesh: Mesh,
             *, logits_path: pathlib.Path | None = None) -> dict[str, float]:
    """Accuracy (F1 / macro-F1), mean loss and examples/s on a labelled split; with
    `logits_path`, the logits and labels are also saved there (`metrics.write_dev_logits`)."""
    batcher = data.Batcher(split, batch_size, buckets=buckets, shuffle=False)
    logits, examples_per_s = predict(predict_fn, graphdef, params, batcher, mesh)
    labels = split.labels
    if logits_path is not None:
        metrics_lib.write_dev_logits(logits_path, labels, logits)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits), -1)
    loss = -float(jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(labels)[:, None], 1)))
    result = metrics_lib.classification_metrics(logits.argmax(-1), labels, num_labels)
    return {**result, "loss": loss, "examples_per_s": examples_per_s, "examples": len(labels)}


def evaluate_saved_model(model_dir: str | pathlib.Path,
                         config: ml_collections.ConfigDict) -> dict[str, float]:
    """Evaluates a saved Hugging Face classifier on `config.data`'s dev split, tokenised with the
    model's own tokenizer."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.name = str(model_dir)
    # Only dev is evaluated: a training file, when given, only supplies the label map.
    inputs = prepare_task(config, dev_only=True)
    model, _, _ = hf.load_pretrained(str(inputs.checkpoint_dir), dtype=config.model.dtype)
    saved_labels = hf.label_names_of(inputs.checkpoint_dir)
    # A model saved before kdjax named the classes carries the label values as names.
    if saved_labels is not None and saved_labels not in (inputs.task.label_names,
                                                          inputs.class_names):
        source = "" if config.data.train_file or not config.data.dev_file else (
            " (read from the dev file alone: no data.train_file; a class missing from dev "
            "needs the training file's label map)")
        raise ValueError(f"{model_dir} was trained with labels {saved_labels}, but the task "
                         f"{config.data.task!r} has labels {inputs.task.label_names}{source}")
    mesh = sharding.make_mesh(config.train.num_devices)
    graphdef, params = nnx.split(model, nnx.Param)
    return evaluate(make_predict_step(mesh), graphdef, sharding.replicate(params, mesh),
                    inputs.dev, inputs.task.num_labels, config.data.eval_batch_size,
                    inputs.buckets, mesh)


# ------------------------------------------------------------------------------------------------
# The fine-tuning loop


@dataclasses.dataclass
class TaskInputs:
    """A task's tokenised splits plus what is needed to rebuild and save models for it."""

    task: data.TaskData
    tokenizer: Any
    checkpoint_dir: pathlib.Path
    train: data.EncodedSplit
    dev: data.EncodedSplit
    buckets: tuple[int, ...]
    max_length: int  # data.max_length, resolved when 0 (auto)
    # Training examples left out by data.train_limit, labels removed (-1): the unlabelled
    # transfer set of a few-labels distillation run. Empty without a limit.
    unlabelled_rest: data.EncodedSplit | None = None
    # The labelled examples set aside by data.holdout_fraction for checkpoint selection and
    # early stopping (never trained on). Empty when the fraction is 0.
    holdout: data.EncodedSplit | None = None
    # Where `train`'s rows are in task.splits["train"] (a method that builds more examples from
    # the raw sentences, such as augmentation, starts from these).
    train_indices: np.ndarray | None = None
    # The names saved models give the classes (id2label), index by index (`data.class_names`):
    # the labels stay task.label_names, the values the files hold.
    class_names: list[str] | None = None

    @property
    def train_examples(self) -> list[data.Example]:
        source = self.task.splits["train"]
        if self.train_indices is None:
            return list(source)
        return [source[i] for i in self.train_indices]


# data.max_length=0 never picks more than BERT's 512 positions.
_MAX_AUTO_LENGTH = 512


def prepare_task(config: ml_collections.ConfigDict, *, dev_only: bool = False) -> TaskInputs:
    """Loads the task named by `config.data` and tokenises it with `config.model.name`'s tokenizer.

    With `dev_only` (evaluation), the training split is not needed: its file, when there is one,
    only gives the label map (else the dev file's own labels do), `max_length=0` is resolved on
    dev, and `train`, `holdout` and `unlabelled_rest` are empty.
    """
    import transformers

    cfg = config.data
    ckpt_dir = hf.resolve_checkpoint(config.model.name)
    # A checkpoint this BERT cannot load is refused before its tokenizer (whose own error for a
    # foreign architecture is a page of text) and before minutes of reading and tokenising. A
    # saved BiLSTM student has a format of its own and needs only its tokenizer here.
    if not (ckpt_dir / bilstm.CONFIG_FILE).is_file():
        hf.read_config(ckpt_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(ckpt_dir))
    except (OSError, ValueError) as e:
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        raise hf.CheckpointError(f"{ckpt_dir}: no usable tokenizer ({type(e).__name__}: "
                                 f"{first_line})") from None
    task = data.load_task(cfg.task, train_file=cfg.train_file, dev_file=cfg.dev_file,
                          text_columns=tuple(cfg.text_columns), label_column=cfg.label_column,
                          quoting=cfg.get("quoting", "auto"),
                          splits=("dev",) if dev_only else ("train", "dev"))
    length_split = "dev" if dev_only else "train"
    max_length = cfg.max_length
    if not max_length:
        # Auto: the smallest length bucket that holds 99 % of the training examples whole.
        cap = min(_MAX_AUTO_LENGTH, tokenizer.model_max_length)
        max_length, held = data.covering_length(task.splits[length_split], tokenizer, cap,
                                                widths=tuple(cfg.buckets))
        print(f"data.max_length=0 (auto): {max_length} tokens hold {100 * held:.2f} % of the "
              f"{length_split} examples whole", flush=True)
    dev = data.encode(task.splits["dev"], tokenizer, max_length)
    if dev_only:
        nothing = dev.subset(np.arange(0))
        buckets = tuple(cfg.buckets) or data.default_buckets(max_length)
        if cfg.dev_limit and cfg.dev_limit < len(dev):
            dev = dev.subset(np.arange(cfg.dev_limit))
        return TaskInputs(task, tokenizer, ckpt_dir, nothing, dev, buckets, max_length, nothing,
                          nothing, np.arange(0), task_class_names(config, task))
    train = data.encode(task.splits["train"], tokenizer, max_length)
    labelled, held_out, rest = data.training_indices(
        len(train), train_limit=cfg.train_limit, holdout_fraction=cfg.get("holdout_fraction", 0.0),
        seed=cfg.subset_seed)
    rest = data.without_labels(train.subset(rest))
    holdout = train.subset(held_out)
    train = train.subset(labelled)
    if cfg.dev_limit and cfg.dev_limit < len(dev):
        dev = dev.subset(np.arange(cfg.dev_limit))
    buckets = tuple(cfg.buckets) or data.default_buckets(max_length)
    return TaskInputs(task, tokenizer, ckpt_dir, train, dev, buckets, max_length, rest,
                      holdout, labelled, task_class_names(config, task))


def task_class_names(config: ml_collections.ConfigDict, task: data.TaskData) -> list[str]:
    """`data.class_names` for `task` with `config.data.label_names` (absent in older configs)."""
    return data.class_names(config.data.task, task.label_names,
                            tuple(config.data.get("label_names", ()) or ()))


def total_train_steps(config: ml_collections.ConfigDict, batches_per_epoch: int) -> int:
    if config.train.max_steps:
        return config.train.max_steps
    return max(1, math.ceil(config.train.epochs * batches_per_epoch))


def _batches_from(batcher: data.Batcher, step: int) -> Iterator[dict]:
    """Training batches for global step `step` onwards, epoch after epoch."""
    epoch, index = divmod(step, batcher.num_batches)
    while True:
        yield from batcher.epoch(epoch, start=index)
        epoch, index = epoch + 1, 0


class _IntervalMetrics:
    """Collects per-step metric arrays on device; fetches them only when asked (log interval).

    A step's metrics are sums: `count` (real examples), `loss_sum`, `correct`, `grad_norm`, and
    any `NAME_sum` with an optional `NAME_count` (its own denominator, e.g. labelled examples
    only); the summary reports `NAME = sum / count` over the interval.
    """

    def __init__(self):
        self.pending: list[tuple[int, dict]] = []
        self.since = time.perf_counter()
        # Real examples of every flushed step: the step's `count` is summed over the global
        # batch inside the step, so it counts every process's rows.
        self.examples = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> dict | None:
        """Summarises pending steps; raises TrainingDiverged naming the first bad step."""
        if not self.pending:
            return None
        host = jax.device_get([m for _, m in self.pending])
        for (step, _), m in zip(self.pending, host):
            if not np.isfinite(m["loss_sum"]) or not np.isfinite(m["grad_norm"]):
                raise TrainingDiverged(f"loss became {m['loss_sum'] / max(m['count'], 1)} at "
                                       f"step {step + 1}")
        total = lambda key: sum(float(m[key]) for m in host)
        count = total("count")
        self.examples += int(count)
        seconds = time.perf_counter() - self.since
        summary = {"loss": total("loss_sum") / max(count, 1),
                   "accuracy": total("correct") / max(count, 1)}
        for key in host[0]:
            name = key.removesuffix("_sum")
            if key.endswith("_sum") and name != "loss":
                denominator = total(f"{name}_count") if f"{name}_count" in host[0] else count
                summary[name] = total(key) / max(denominator, 1e-9)
        summary["grad_norm"] = float(np.mean([m["grad_norm"] for m in host]))
        summary["examples_per_s"] = count / max(seconds, 1e-9)
        self.pending, self.since = [], time.perf_counter()
        return summary


@dataclasses.dataclass(frozen=True)
class Selection:
    """Checkpoint selection and early stopping on a held-out slice of the training set.

    Attributes:
      score: `state -> metrics` on the held-out slice (the loop never looks at dev).
      metric: the key of `score`'s result to maximise (the task's headline metric).
      every: steps between evaluations; the run's last step is always evaluated.
      patience: evaluations without improvement before training stops; 0 = never.
      on_improvement: `(state, step, metrics) -> None`, called when an evaluation improves on
        the best (`train.export_every_eval` writes the state as a model); None = nothing.
    """

    score: Callable[[Any], dict]
    metric: str = "accuracy"
    every: int = 0
    patience: int = 0
    on_improvement: Callable[[Any, int, dict], None] | None = None

    def interval(self, total_steps: int) -> int:
        return self.every or max(1, math.ceil(total_steps / 10))


def holdout_selection(config: ml_collections.ConfigDict, holdout: data.EncodedSplit | None,
                      score: Callable[[Any, data.EncodedSplit], dict],
                      export_best: Callable[[Any, int, dict], None] | None = None,
                      ) -> Selection | None:
    """The run's `Selection` when `data.holdout_fraction` set a held-out slice aside, else None.

    Args:
      config: the run's config (`data.task`, `train.holdout_every`, `train.patience`,
        `train.export_every_eval`).
      holdout: the held-out examples (`TaskInputs.holdout`).
      score: `(state, split) -> metrics` of the state's predicting model.
      export_best: `(state, step, metrics) -> None` writing the state as a model; called at
        each improvement when `train.export_every_eval` is on.
    """
    if holdout is None or not len(holdout):
        return None
    on_improvement = export_best if config.train.get("export_every_eval", False) else None
    return Selection(score=lambda state: score(state, holdout),
                     metric=data.task_metric(config.data.task),
                     every=config.train.get("holdout_every", 0),
                     patience=config.train.get("patience", 0),
                     on_improvement=on_improvement)


@dataclasses.dataclass
class LoopResult:
    state: Any
    steps: int  # the global step reached
    train_seconds: float  # this invocation's training time, compilation included
    examples_seen: int  # real examples this invocation trained on
    finished: bool  # False when train.stop_after_steps ended it early
    # With a Selection: the step whose state is returned, its held-out metrics, and whether
    # the patience rule ended training before total_steps.
    selected_step: int | None = None
    holdout: dict | None = None
    stopped_early: bool = False

    def selection_record(self) -> dict:
        """What eval.json records of the selection (empty without one)."""
        if self.selected_step is None:
            return {}
        return {"selected_step": self.selected_step, "holdout": self.holdout,
                "stopped_early": self.stopped_early}


def train_loop(state: Any, step_fn: Callable, batcher: data.Batcher, *, total_steps: int,
               train_config: ml_collections.ConfigDict, checkpoint_dir: pathlib.Path,
               log: metrics_lib.MetricLog, mesh: Mesh, dropout_key: jax.Array,
               lr_at: optax.Schedule | None = None, progress: bool = True,
               description: str = "train", selection: Selection | None = None) -> LoopResult:
    """The one training loop: every update step kind (fine-tuning, distillation, and later
    discriminator or joint steps) runs through it.

    Args:
      state: a pytree with `.step`, `.arrays()` (the checkpointed part) and `.with_arrays()`.
      step_fn: `(state, sharded batch, dropout_key) -> (state, metric sums)`, jitted.
      batcher: the training batches; epoch e, batch k is global step e * num_batches + k.
      total_steps: the run's length (fixes the schedules; checked on resume).
      train_config: the `train` section: seed, log_every, checkpoint_every, keep_checkpoints,
        stop_after_steps.
      checkpoint_dir: Orbax directory; a checkpoint there is resumed.
      log: where interval summaries go.
      dropout_key: the run's base key (replicated).
      lr_at: the learning-rate schedule, for the log.
      description: progress-bar label.
      selection: evaluate on a held-out slice every `selection.interval` steps, keep the best
        state in CHECKPOINT_DIR/../best/ and return it; stop after `selection.patience`
        evaluations without improvement. The evaluations and the best state are part of the
        run's checkpoints, so a resumed run selects as an uninterrupted one.

    Raises:
      TrainingDiverged: a NaN/inf loss or gradient; names the step and the last good checkpoint.
      ValueError: the checkpoint directory holds a run of another seed or length.
    """
    from tqdm.auto import tqdm

    dropout_key_data = np.asarray(jax.random.key_data(dropout_key)).tolist()
    ckpt = checkpoint.Checkpointer(checkpoint_dir, keep=train_config.keep_checkpoints)
    start_step = 0
    # Selection state: the best held-out evaluation so far and evaluations since it.
    best = {"step": None, "metrics": None, "since": 0, "stopped_early": False}
    if ckpt.latest_step() is not None:
        # A damaged latest checkpoint falls back to the one before it (hence two are kept).
        arrays, meta, damaged = ckpt.restore_latest_good(state.arrays())
        for note in damaged:
            print(f"{note}; resuming from step {meta['step']}", flush=True)
        if meta["dropout_key"] != dropout_key_data or meta["total_steps"] != total_steps:
            ckpt.close()
            raise ValueError(f"{ckpt.directory} holds a run with another seed or length "
                             f"(total_steps {meta['total_steps']} vs {total_steps}); use a new "
                             "--workdir or the original config")
        state = state.with_arrays(arrays)
        start_step = int(meta["step"])
        best.update(meta.get("selection", {}))
        if start_step < total_steps and not best["stopped_early"]:
            print(f"resumed from {ckpt.directory} at step {start_step} "
                  f"(epoch {meta['epoch']}, batch {meta['batch_in_epoch']})", flush=True)
    # Records a killed run wrote past its last checkpoint are written again from there.
    log.discard_after(description, start_step)
    best_ckpt = (checkpoint.Checkpointer(checkpoint_dir.parent / "best", keep=1)
                 if selection is not None else None)
    if best_ckpt is not None:
        # A best state saved after the restored step comes from a stretch that was interrupted
        # before its next checkpoint; this run replays that stretch exactly (same batches and
        # dropout keys) and saves it again.
        best_ckpt.discard_after(start_step)

    def save(step: int) -> None:
        epoch, index = divmod(step, batcher.num_batches)
        # Each step's dropout key is fold_in(dropout_key, step): the base key and the step fix
        # every future draw.
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": index,
                "seed": train_config.seed, "total_steps": total_steps,
                "dropout_key": dropout_key_data}
        if selection is not None:
            meta["selection"] = dict(best)
        ckpt.save(step, state.arrays(), meta)

    def evaluate_holdout(step: int) -> None:
        # Without its timing, which would make a resumed run's record differ.
        metrics = {k: v for k, v in selection.score(state).items() if k != "examples_per_s"}
        log.write(step, f"{description}/holdout", metrics)
        if best["metrics"] is None or metrics[selection.metric] > best["metrics"][selection.metric]:
            best.update(step=step, metrics=metrics, since=0)
            best_ckpt.save(step, state.arrays(), {"step": step, "metrics": metrics})
            if selection.on_improvement is not None:
                selection.on_improvement(state, step, metrics)
        else:
            best["since"] += 1
            if selection.patience and best["since"] >= selection.patience:
                best["stopped_early"] = True

    interval = _IntervalMetrics()
    bar = tqdm(total=total_steps, initial=start_step, unit="step",
               disable=not (progress and distributed.is_main_process()),
               dynamic_ncols=True, mininterval=1.0, desc=description)
    train_start = time.perf_counter()
    step = start_step
    # stop_after_steps ends this invocation early (a time-limited job); rerun to resume.
    stop_at = total_steps
    if train_config.stop_after_steps:
        stop_at = min(total_steps, start_step + train_config.stop_after_steps)
    every = selection.interval(total_steps) if selection is not None else 0

    def log_interval(step: int) -> None:
        # Flushing checks every pending step for NaN, so no bad state is ever saved.
        summary = interval.flush()
        if summary is None:
            return
        if lr_at is not None:
            summary["lr"] = float(lr_at(step))
        summary["epoch"] = step / batcher.num_batches
        log.write(step, description, summary)
        bar.set_postfix(loss=f"{summary['loss']:.4f}", ex_s=f"{summary['examples_per_s']:.0f}")

    # SIGINT/SIGTERM from here to the last save only set stop_signals.signum: the loop stops
    # between steps and the state is saved whole.
    stop_signals = _StopSignals().__enter__()
    try:
        for batch in _batches_from(batcher, start_step):
            if stop_signals.signum:
                log_interval(step)  # The steps since the last record, checked before saving.
                break
            if step >= stop_at or best["stopped_early"]:
                break
            state, step_metrics = step_fn(state, sharding.shard_batch(batch, mesh), dropout_key)
            interval.add(step, step_metrics)
            step += 1
            bar.update(1)
            is_save = (train_config.checkpoint_every
                       and step % train_config.checkpoint_every == 0)
            if step % train_config.log_every == 0 or is_save or step == stop_at:
                log_interval(step)
            if every and (step % every == 0 or step == total_steps):
                evaluate_holdout(step)
                # An early stop is saved at once, so a rerun does not train on.
                is_save = is_save or best["stopped_early"]
            if is_save:
                save(step)
    except BaseException as e:
        stop_signals.__exit__()
        if not isinstance(e, TrainingDiverged):
            raise
        bar.close()
        ckpt.wait()
        last = ckpt.latest_step()
        ckpt.close()
        if best_ckpt is not None:
            best_ckpt.close()
        where = (f"the last good checkpoint (step {last}) is in {ckpt.directory}"
                 if last is not None else "no checkpoint had been saved yet")
        raise TrainingDiverged(f"{e}; training stopped, {where}") from None
    try:
        jax.block_until_ready(state)
        train_seconds = time.perf_counter() - train_start
        bar.close()
        if ckpt.latest_step() != step:
            save(step)
        # Waits for every asynchronous save, so a signal leaves complete checkpoints only.
        ckpt.close()
    finally:
        stop_signals.__exit__()
    if stop_signals.signum:
        if best_ckpt is not None:
            best_ckpt.close()
        name = signal.Signals(stop_signals.signum).name
        raise TrainingInterrupted(
            f"interrupted by {name} at step {step} of {total_steps} ({description}); saved a "
            f"checkpoint in {ckpt.directory}; run the same command again to resume",
            stop_signals.signum, step)
    finished = step >= total_steps or best["stopped_early"]
    if not finished:
        print(f"stopped after step {step} of {total_steps} (train.stop_after_steps); run the "
              f"same command again to resume", flush=True)
    result = LoopResult(state, step, train_seconds, interval.examples, finished)
    if best_ckpt is not None:
        if finished and best["step"] is not None:
            if best["stopped_early"]:
                print(f"{description}: stopped at step {step} of {total_steps}, "
                      f"{best['since']} held-out evaluations without improvement", flush=True)
            arrays, _ = best_ckpt.restore(state.arrays(), best["step"])
            result.state = state.with_arrays(arrays)
            result.selected_step, result.holdout = best["step"], best["metrics"]
            result.stopped_early = best["stopped_early"]
            print(f"{description}: the held-out slice chose step {best['step']} "
                  f"({selection.metric} {best['metrics'][selection.metric]:.4f})", flush=True)
        best_ckpt.close()
    return result


def start_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
              ) -> tuple[pathlib.Path, Mesh]:
    """Validates the config, builds the mesh and checks batch sizes on it (touching no file:
    `workdir.claim` creates and holds the workdir)."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    mesh = sharding.make_mesh(config.train.num_devices)
    sharding.check_batch_size(config.data.batch_size, mesh)
    sharding.check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
    sharding.check_grad_accum_steps(config.data.batch_size,
                                    config.train.get("grad_accum_steps", 1), mesh)
    return workdir, mesh


def fine_tune(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
              progress: bool = True, overwrite: bool = False) -> dict:
    """Fine-tunes `config.model.name` on `config.data`'s task; resumes from `workdir` if a
    checkpoint is there.

    Writes to `workdir`: config.json (resolved config), metrics.jsonl, checkpoints/ (Orbax),
    model/ (a Hugging Face directory with tokenizer and label map), eval.json.

    Args:
      overwrite: move a run of another config found in `workdir` aside (`workdir.claim`)
        instead of refusing.

    Returns:
      The final dev metrics plus timing: train_seconds, train_examples_per_s, steps.

    Raises:
      workdir.WorkdirError: another process holds `workdir`, or it holds another run.
    """
    workdir, mesh = start_run(config, workdir)
    with workdir_lib.claim(workdir, config, "fine-tune", overwrite=overwrite):
        return _fine_tune(config, workdir, mesh, progress)


def _fine_tune(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: Mesh,
               progress: bool) -> dict:
    inputs = prepare_task(config)
    model, report, _ = hf.load_pretrained(str(inputs.checkpoint_dir),
                                          num_labels=inputs.task.num_labels,
                                          dtype=config.model.dtype, seed=config.train.seed)
    print(report.summary(), flush=True)
    _write_run_files(workdir, config, inputs.task.label_names)
    batcher = data.Batcher(inputs.train, config.data.batch_size, buckets=inputs.buckets,
                           shuffle=True, seed=config.train.seed)
    total_steps = total_train_steps(config, batcher.num_batches)
    tx = optim.make_optimizer(config.optim, total_steps)
    fsdp = config.train.get("fsdp", False)
    state = sharding.place_state(TrainState.create(model, tx), mesh, fsdp=fsdp)
    del model
    dropout_key = sharding.replicate(jax.random.key(config.train.seed), mesh)
    log = metrics_lib.MetricLog(workdir, tensorboard=config.train.tensorboard)
    step_fn = make_train_step(mesh, fsdp=fsdp,
                              grad_accum_steps=config.train.get("grad_accum_steps", 1))
    predict_fn = make_predict_step(mesh)

    def score(state, split, logits_path=None):
        return evaluate(predict_fn, state.graphdef, state.params, split, inputs.task.num_labels,
                        config.data.eval_batch_size, inputs.buckets, mesh,
                        logits_path=logits_path)

    run = train_loop(state, step_fn, batcher, total_steps=total_steps,
                     train_config=config.train, checkpoint_dir=workdir / "checkpoints", log=log,
                     mesh=mesh, dropout_key=dropout_key,
                     lr_at=optim.warmup_linear_decay(config.optim.lr, total_steps,
                                                     config.optim.warmup_ratio),
                     progress=progress,
                     selection=holdout_selection(
                         config, inputs.holdout, score,
                         export_best=lambda state, step, metrics: export_best_model(
                             config, state.model(), workdir, inputs, step, metrics)))
    if not run.finished:
        return {"steps": run.steps, "train_seconds": run.train_seconds, "finished": False}
    state = run.state
    result = score(state, inputs.dev, logits_path=workdir / metrics_lib.DEV_LOGITS_FILE)
    result.update(steps=run.steps, train_seconds=run.train_seconds, finished=True,
                  # Passes over the training split actually run (fewer than train.epochs when
                  # the held-out slice stopped it): the budget a results table reports.
                  epochs=run.steps / batcher.num_batches,
                  train_examples_per_s=run.examples_seen / max(run.train_seconds, 1e-9),
                  **run.selection_record())
    if len(inputs.holdout):
        result["holdout_examples"] = len(inputs.holdout)
    log.discard_after("dev", -1)  # A rerun of a finished run records its evaluation once.
    log.write(run.steps, "dev", result)
    hf.save_pretrained(state.model(), workdir / "model", label_names=inputs.class_names,
                       tokenizer=inputs.tokenizer,
                       extra={"kdjax_config": config_lib.to_dict(config), "dev": result})
    result.update(check_saved_model(config, state.model(), workdir / "model", inputs.task))
    distributed.write_text(workdir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


def export_best_model(config: ml_collections.ConfigDict, model: BertClassifier,
                      workdir: pathlib.Path, inputs: TaskInputs, step: int,
                      holdout_metrics: dict) -> None:
    """`train.export_every_eval`: the best model so far as WORKDIR/best_model/ (replaced at each
    improvement; written next to it and renamed into place, so it is always a whole model)."""
    hf.save_pretrained(model, workdir / "best_model", label_names=inputs.class_names,
                       tokenizer=inputs.tokenizer,
                       extra={"kdjax_config": config_lib.to_dict(config), "step": step,
                              "holdout": holdout_metrics})
    if distributed.is_main_process():
        print(f"train.export_every_eval: step {step} is the best so far on the held-out slice; "
              f"wrote {workdir / 'best_model'}", flush=True)


# Dev examples `train.check_export` compares on (seconds on a CPU).
_CHECK_EXAMPLES = 16


def check_saved_model(config: ml_collections.ConfigDict, model: BertClassifier,
                      directory: pathlib.Path, task: data.TaskData) -> dict:
    """With `train.check_export`, `hf.check_with_transformers` on the first dev examples.

    Returns:
      {"export_check_max_abs_difference": float or None (torch absent)} for eval.json, or {}
      when the check is off or the run has several processes (its parameters may be split
      over them; check the directory with `kdjax export`'s check afterwards).

    Raises:
      hf.CheckpointError: the saved directory does not reproduce the model.
    """
    if not config.train.get("check_export", False):
        return {}
    if jax.process_count() > 1:
        if distributed.is_main_process():
            print("train.check_export: skipped in a multi-process run", flush=True)
        return {}
    examples = task.splits["dev"][:_CHECK_EXAMPLES]
    difference = hf.check_with_transformers(
        model, directory, [e.text_a for e in examples] or None,
        [e.text_b for e in examples] if task.is_pair and examples else None)
    if difference is None:
        print(f"train.check_export: skipped for {directory} (torch is not installed)", flush=True)
    else:
        print(f"train.check_export: {directory} reloaded by transformers (PyTorch) gives logits "
              f"within {difference:.2e} of the model on {len(examples)} dev examples", flush=True)
    return {"export_check_max_abs_difference": difference}


def _write_run_files(workdir: pathlib.Path, config, label_names: list[str]) -> None:
    """The resolved config and label map, which `load_run` needs to rebuild the model (written
    by process 0 only)."""
    distributed.write_text(workdir / "config.json",
                           json.dumps(config_lib.to_dict(config), indent=2) + "\n")
    distributed.write_text(workdir / "labels.json", json.dumps(label_names) + "\n")


def load_run(workdir: str | pathlib.Path, step: int | None = None,
             ) -> tuple[BertClassifier, list[str], ml_collections.ConfigDict, int]:
    """The model of a fine-tuning run's checkpoint (latest, or `step`).

    Returns:
      (model, label names, the run's config, the checkpoint's step).
    """
    workdir = pathlib.Path(workdir)
    for name in ("config.json", "labels.json"):
        if not (workdir / name).is_file():
            raise FileNotFoundError(f"{workdir / name} not found; is {workdir} a kdjax run "
                                    "directory?")
    # Checked before Orbax opens the directory: it would create an empty checkpoints/ in the
    # run (a refused export must change nothing) and then fail with a message about no step.
    checkpoints = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir()
                   if p.is_dir() and p.name.isdigit()) if checkpoints.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint to export ({checkpoints} is missing "
                                "or holds no finished step); run or resume the training first")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint of step {step} (steps saved: {steps})")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    label_names = json.loads((workdir / "labels.json").read_text())
    bert_config, _ = hf.read_config(hf.resolve_checkpoint(config.model.name))
    bert_config = bert_config.replace(dtype=config.model.dtype)
    # The optimizer's structure (not its schedule) is what restoring needs.
    tx = optim.make_optimizer(config.optim, total_steps=1)
    abstract = jax.eval_shape(lambda: TrainState.create(
        BertClassifier(bert_config, len(label_names), rngs=nnx.Rngs(0)), tx))
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        if step is None:
            # Reading changes nothing on disk: a damaged latest checkpoint is only skipped.
            arrays, meta, damaged = ckpt.restore_latest_good(abstract.arrays(), set_aside=False)
            for note in damaged:
                print(f"{note}; using step {meta['step']}", flush=True)
        else:
            arrays, meta = ckpt.restore(abstract.arrays(), step)
    return abstract.with_arrays(arrays).model(), label_names, config, int(meta["step"])

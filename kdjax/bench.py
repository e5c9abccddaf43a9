"""`kdjax bench`: how fast kdjax distils, against PyTorch and against the hardware, in one run.

What it measures, on this machine, for the `kd` recipe's step (configs/kd.py: 0.5 CE + 0.5 T^2
KL, T = 2; AdamW) with a student of half the teacher's depth copied from its spread layers
(MiniLM 6 x 384 -> 3 x 384 from layers 0, 2, 5):

  kdjax step      the real jitted `distill.make_distill_step` on the mesh of all local devices,
                  one batch of real SST-2 train sentences padded to --seq-len; compile time
                  separately; examples/s = the median over --repeats runs of --steps steps.
  PyTorch step    the same step in PyTorch eager + transformers (`kdjax.bench_torch`), same
                  weights and batch, torch threads = the cores JAX uses.
  FLOPs           XLA's cost analysis of the compiled step; achieved FLOP/s = FLOPs x steps/s;
                  peak = a large jitted matmul in the step's dtype (>= 50 ms a call, best of
                  several); fraction_of_peak = achieved / peak.
  teacher cache   the step with the teacher forward (off) against the step reading precomputed
                  `batch["teacher_logits"]` with no teacher (on); both ship a host batch per step.
  bucketing       the same step over the same seeded SST-2 train batches, length buckets against
                  fixed 128-token padding; every shape compiled before timing.
  memory          the compiled step's argument + output + temp bytes, the process's max RSS, and
                  on GPU the device's peak bytes in use.
  inference       examples/s of the teacher and of each recipe student size (half_depth,
                  tenth_size, BiLSTM; random weights) on SST-2 dev batches.

  kdjax bench --quick                       # a few minutes on a 2-core CPU
  kdjax bench --json results/bench.json     # the full measurement
  kdjax bench --preset bert-base --dtype bfloat16 --no-torch   # GPU MFU: 12 x 768 -> 6 x 768
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import bench_torch, data, distill, hf, methods, recipes, sharding
from kdjax import teacher_cache, train
from kdjax.models.bert import BertClassifier, BertConfig


PRESETS = ("minilm", "bert-base")
# --preset bert-base: a random-init BERT-base-sized teacher (no checkpoint needed).
BERT_BASE = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072)

# The targets. On a CPU: the four below; on a GPU, only the MFU figure of BERT-base in
# bfloat16 against the bfloat16 matmul peak.
CPU_TARGETS = {"speedup_vs_torch": 1.5, "fraction_of_peak": 0.6, "cache_speedup": 1.6,
               "bucketing_speedup": 2.5}
GPU_BERT_BASE_BF16_TARGETS = {"fraction_of_peak": 0.4}

# The peak matmul grows until one call takes this long (shorter calls under-report the peak).
PEAK_MIN_SECONDS = 0.05


class BenchError(ValueError):
    """A benchmark setting that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What `kdjax bench` measures; 0 means "the default for --quick or the full run"."""

    quick: bool = False
    teacher: str = hf.PACKAGED_MINILM  # Checkpoint (minilm preset) or tokenizer (bert-base).
    preset: str = "minilm"
    batch_size: int = 32
    seq_len: int = 64
    steps: int = 0  # Timed steps per repeat: 20, quick 3.
    repeats: int = 0  # Timed repeats (the median is reported): 3, quick 2.
    dtype: str = "float32"
    torch: bool = True
    task: str = "sst2"
    bucket_batches: int = 0  # Batches in the bucketing comparison: 24, quick 4.
    bucket_length: int = 128  # The fixed padding (and the bucket ladder's top).
    eval_batch_size: int = 128
    dev_examples: int = 0  # Dev examples for inference: 0 = all (quick: 256).
    matmul_size: int = 0  # The peak matmul's size: 0 = grow until a call takes >= 50 ms.
    seed: int = 0

    def __post_init__(self):
        checks = [
            ("--preset", self.preset in PRESETS, f"must be one of {PRESETS}", self.preset),
            ("--dtype", self.dtype in ("float32", "bfloat16"), "must be float32 or bfloat16",
             self.dtype),
            ("--batch-size", self.batch_size >= 1, "must be >= 1", self.batch_size),
            ("--seq-len", 2 <= self.seq_len <= 512, "must be in [2, 512]", self.seq_len),
            ("--steps", self.steps >= 0, "must be >= 1 (0 = default)", self.steps),
            ("--repeats", self.repeats >= 0, "must be >= 1 (0 = default)", self.repeats),
            ("--bucket-batches", self.bucket_batches >= 0, "must be >= 1 (0 = default)",
             self.bucket_batches),
            ("--bucket-length", 8 <= self.bucket_length <= 512, "must be in [8, 512]",
             self.bucket_length),
            ("--eval-batch-size", self.eval_batch_size >= 1, "must be >= 1",
             self.eval_batch_size),
            ("--dev-examples", self.dev_examples >= 0, "must be >= 0 (0 = all)",
             self.dev_examples),
            ("--matmul-size", self.matmul_size >= 0, "must be >= 0 (0 = automatic)",
             self.matmul_size),
        ]
        for flag, ok, demand, value in checks:
            if not ok:
                raise BenchError(f"{flag} {demand}, got {value!r}")

    def resolved(self) -> "BenchSettings":
        """The settings with every 0 default filled in for quick or full runs."""
        quick = self.quick
        return dataclasses.replace(
            self, steps=self.steps or (3 if quick else 20),
            repeats=self.repeats or (2 if quick else 3),
            bucket_batches=self.bucket_batches or (4 if quick else 24),
            dev_examples=self.dev_examples or (256 if quick else 0))


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class _Sections:
    """Wall seconds of each part of the benchmark (where the time of a run goes)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._current, self._since = None, time.perf_counter()

    def start(self, name: str | None, message: str = "") -> None:
        now = time.perf_counter()
        if self._current is not None:
            self.seconds[self._current] = now - self._since
        self._current, self._since = name, now
        if message:
            _say(message)


# ------------------------------------------------------------------------------------------------
# The models and the step under test


@dataclasses.dataclass
class KDSetup:
    """The `kd` recipe's step for one teacher: everything `kdjax distill` would build."""

    config: ml_collections.ConfigDict
    spec: distill.LossSpec
    state: train.TrainState  # The DistillStudent's state, replicated on the mesh.
    teachers: distill.Teachers  # Replicated.
    student: BertClassifier  # The initial student (before any step).
    init_layers: tuple[int, ...]  # The teacher layers (0-based) the student copies.
    optim_config: ml_collections.ConfigDict
    step: Callable  # `distill.make_distill_step(mesh, spec)`: (state, teachers, batch, key).


def kd_config(teacher: BertClassifier, dtype: str = "float32") -> ml_collections.ConfigDict:
    """The `kd` recipe's half_depth config (`recipes.kd_config`, what configs/kd.py runs) for
    `teacher`: a student of half its depth (at least one layer), copied from evenly spread
    layers."""
    config = recipes.kd_config("half_depth")
    config.student.layers = max(1, teacher.config.num_hidden_layers // 2)
    config.student.dtype = dtype
    config.teacher.dtype = dtype
    return methods.validate(config)


def _without_dropout(model: BertClassifier) -> BertClassifier:
    """The same weights in a model whose dropout rates are all 0 (a deterministic student)."""
    cfg = model.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               classifier_dropout=0.0)
    clean = BertClassifier(cfg, model.num_labels, rngs=nnx.Rngs(0))
    nnx.update(clean, nnx.state(model, nnx.Param))
    return clean


def kd_setup(teacher: BertClassifier, num_labels: int, tokenizer, mesh: Mesh, *,
             total_steps: int = 1000, dtype: str = "float32", dropout: bool = True) -> KDSetup:
    """The student, loss, optimizer and replicated state of the `kd` recipe, built by the same
    stage builder `kdjax distill` uses (`kdjax.engine.run.build_stage`).

    Args:
      teacher: the frozen teacher (its dtype is the step's).
      num_labels: the task's label count (teacher and student heads).
      tokenizer: the task's tokenizer (for the LossSpec's token ids).
      mesh: the device mesh; state and teachers are replicated over it.
      total_steps: the learning-rate schedule's length.
      dtype: the student's compute dtype.
      dropout: False gives the student zero dropout rates (a deterministic loss, for tests).
    """
    config = kd_config(teacher, dtype)
    student_model = distill.build_student(config, teacher, num_labels, mlm_head=False)
    if not dropout:
        student_model = _without_dropout(student_model)
    name = config.stages[0]
    spec = distill.stage_loss(config, name, methods=methods.loss_methods(),
                              student=student_model.config, teacher=teacher.config,
                              tokenizer=tokenizer, total_steps=total_steps)
    teacher_width = teacher.config.hidden_size if config.student.projection else None
    student = distill.DistillStudent(student_model, teacher_width,
                                     rngs=nnx.Rngs(config.train.seed + 1))
    teachers = sharding.replicate(distill.Teachers.create([teacher]), mesh)
    # The stage exactly as `kdjax distill` builds it (one device mesh, no FSDP, no accumulation).
    stage = distill.build_stage(config, name, spec, student, teachers, mesh,
                                total_steps=total_steps)
    # Copies: the state is donated to every step and must not alias the student module's arrays,
    # which the caller may still read (its size, a comparison with the initial weights).
    state = sharding.replicate(jax.tree.map(jnp.copy, stage.state), mesh)
    layers = distill.spread_layers(teacher.config.num_hidden_layers, config.student.layers)
    return KDSetup(config, spec, state, teachers, student_model, layers, stage.optim_config,
                   stage.step)


def torch_kd_step(setup: KDSetup, teacher: BertClassifier, *, total_steps: int = 1000,
                  dropout: bool = True, device: str = "cpu", dtype: str = "float32"):
    """The same step in PyTorch: the teacher's weights in a transformers classifier, a student
    copied from it in PyTorch (the same layers), the same loss and optimizer settings."""
    torch = bench_torch.import_torch()
    torch_teacher = bench_torch.to_torch_classifier(teacher, device)
    torch_student = bench_torch.student_from_teacher(torch_teacher, setup.init_layers)
    loss = setup.config[setup.config.stages[0]].loss
    opt = setup.optim_config
    config = bench_torch.TorchKDConfig(
        ce=loss.ce, soft=loss.soft, temperature=loss.temperature, lr=opt.lr,
        warmup_ratio=opt.warmup_ratio, weight_decay=opt.weight_decay, grad_clip=opt.grad_clip,
        b1=opt.b1, b2=opt.b2, eps=opt.eps, total_steps=total_steps)
    return bench_torch.TorchKDStep(
        torch_teacher, torch_student, config, dropout=dropout,
        autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)


def load_teacher(settings: BenchSettings, num_labels: int):
    """(teacher, tokenizer, checkpoint description) for the preset."""
    import transformers

    directory = hf.resolve_checkpoint(settings.teacher)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    if settings.preset == "bert-base":
        teacher = BertClassifier(BERT_BASE.replace(dtype=settings.dtype), num_labels,
                                 rngs=nnx.Rngs(settings.seed))
        return teacher, tokenizer, "random init (BERT-base size)"
    teacher, _, _ = hf.load_pretrained(str(directory), num_labels=num_labels,
                                       dtype=settings.dtype, seed=settings.seed)
    return teacher, tokenizer, str(directory)


def _seeded_subset(examples: list, n: int, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in np.sort(order[:n])]


def fixed_batch(examples: list[data.Example], tokenizer, batch_size: int, seq_len: int,
                seed: int) -> tuple[data.Batcher, dict]:
    """A batcher over `batch_size` seeded-random examples with every row padded to `seq_len`,
    and its one batch."""
    split = data.encode(_seeded_subset(examples, batch_size, seed), tokenizer, seq_len)
    batcher = data.Batcher(split, batch_size, buckets=(seq_len,), shuffle=False)
    return batcher, next(batcher.epoch(0))


# ------------------------------------------------------------------------------------------------
# Measurements


def _timed_runs(run: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable on one device, from XLA's cost analysis (a
    dict, or a list of dicts in some JAX versions); 0 when the backend reports none. A program
    partitioned over a mesh is analysed per device: the whole step is this times the devices."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", 0.0))


def memory_of(compiled) -> dict:
    """The compiled step's buffers (argument + output + temp = `step_bytes`; donated outputs
    alias their arguments, `alias_bytes`) and the process's peak memory so far."""
    result = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        fields = {"argument_bytes": "argument_size_in_bytes",
                  "output_bytes": "output_size_in_bytes", "temp_bytes": "temp_size_in_bytes",
                  "alias_bytes": "alias_size_in_bytes",
                  "generated_code_bytes": "generated_code_size_in_bytes"}
        result.update({k: int(getattr(analysis, v, 0) or 0) for k, v in fields.items()})
        result["step_bytes"] = (result["argument_bytes"] + result["output_bytes"]
                                + result["temp_bytes"])
    result.update(process_memory())
    return result


def process_memory() -> dict:
    """The process's max resident set size and, on an accelerator, the device's peak bytes."""
    # ru_maxrss is in KiB on Linux.
    result = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return result


def measure_peak_flops(mesh: Mesh, dtype: str, *, size: int = 0, repeats: int = 5,
                       max_size: int = 32768) -> dict:
    """The mesh's matmul FLOP/s: every device multiplies its own n x n matrices in `dtype` at
    once (one jitted batched matmul sharded over `data`), n doubled from 256 until a call takes
    >= 50 ms (or `size` as given); the best of `repeats` calls."""
    split = NamedSharding(mesh, P(sharding.DATA_AXIS))
    devices = mesh.size
    matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b),
                     in_shardings=(split, split), out_shardings=split)
    n = size or 256
    while True:
        # Made on the devices; scaled so products stay O(1) (no inf/denormal slow paths).
        make = jax.jit(lambda key, n=n: jax.random.normal(key, (devices, n, n), dtype)
                       / jnp.sqrt(n).astype(dtype), out_shardings=split)
        a, b = make(jax.random.key(0)), make(jax.random.key(1))
        matmul(a, b).block_until_ready()  # Compile.
        best = min(_timed_runs(lambda: matmul(a, b).block_until_ready(), 2))
        if size or best >= PEAK_MIN_SECONDS or n >= max_size:
            break
        n *= 2
    best = min([best] + _timed_runs(lambda: matmul(a, b).block_until_ready(), repeats))
    flops = devices * 2.0 * n ** 3
    return {"peak_flops_per_s": flops / best, "matmul_size": n, "matmul_seconds": best,
            "matmul_dtype": dtype, "matmul_devices": devices}


def measure_kdjax_step(setup: KDSetup, batch: dict, mesh: Mesh, *, steps: int, repeats: int,
                       ) -> tuple[dict, Callable]:
    """Compiles the real jitted distillation step ahead of time (timed), checks its cost and
    memory, warms it up and times `repeats` runs of `steps` steps on a device-resident batch.

    Returns:
      (measurements, the compiled step), `setup.state` advanced.
    """
    device_batch = sharding.shard_batch(batch, mesh)
    key = sharding.replicate(jax.random.key(0), mesh)
    start = time.perf_counter()
    compiled = setup.step.lower(setup.state, setup.teachers, device_batch, key).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(setup.state, setup.teachers, device_batch, key)  # Warm-up.
    metrics = jax.device_get(metrics)
    step0_loss = float(metrics["loss_sum"] / max(metrics["count"], 1))

    def run():
        nonlocal state
        for _ in range(steps):
            state, out = compiled(state, setup.teachers, device_batch, key)
        jax.block_until_ready((state, out))

    times = _timed_runs(run, repeats)
    setup.state = state
    seconds = statistics.median(times) / steps
    flops_per_device = step_flops(compiled)
    flops = flops_per_device * mesh.size
    return {"examples_per_s": int(batch["weights"].sum()) / seconds,
            "compile_seconds": compile_seconds, "step_seconds": seconds,
            "step0_loss": step0_loss, "step_flops": flops,
            "step_flops_per_device": flops_per_device, "achieved_flops_per_s": flops / seconds,
            "memory": memory_of(compiled), "times": times}, compiled


def measure_torch_step(step, batch: dict, *, steps: int, repeats: int, device: str) -> dict:
    """Times the PyTorch step like the kdjax one: a warm-up step, then the median of `repeats`
    runs of `steps` steps on the same batch."""
    torch = bench_torch.import_torch()
    torch_batch = bench_torch.to_torch_batch(batch, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step0_loss = float(step(torch_batch))
    sync()

    def run():
        for _ in range(steps):
            step(torch_batch)
        sync()

    times = _timed_runs(run, repeats)
    examples = steps * int(batch["weights"].sum())
    return {"examples_per_s": examples / statistics.median(times),
            "step_seconds": statistics.median(times) / steps, "step0_loss": step0_loss,
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "attention_implementation": bench_torch.attention_implementation(step.student),
            "device": device, "times": times}


def _endless(batcher) -> Iterator[dict]:
    while True:
        yield from batcher.epoch(0)


def measure_cache(setup: KDSetup, compiled_off: Callable, batcher: data.Batcher, mesh: Mesh, *,
                  teacher: BertClassifier, teacher_dir: pathlib.Path, steps: int,
                  repeats: int) -> dict:
    """Logit-only KD with the teacher forward in the step (cache off) against the same step
    reading the teacher's stored logits with `teachers=None` (cache on).

    Cache on is the real path of a cached `kdjax distill` stage: `teacher_cache.load_or_compute`
    writes the batcher's split's logits to a (temporary) cache directory and maps them back,
    and `teacher_cache.CachedTeacherBatcher` gathers each batch's rows on the host. Both sides
    build a host batch and ship it to the devices every step, as the training loop does, so
    the cache is charged what it costs.
    """
    key = sharding.replicate(jax.random.key(0), mesh)
    rows = int(next(batcher.epoch(0))["weights"].sum())
    with tempfile.TemporaryDirectory(prefix="kdjax-bench-cache-") as cache_dir:
        cache = teacher_cache.load_or_compute(
            [teacher_dir], [teacher], batcher.split, mesh=mesh, cache_dir=cache_dir,
            batch_size=batcher.batch_size, buckets=batcher.buckets,
            teacher_dtype=teacher.config.dtype, key_extra="kdjax bench",
            description="the benchmark batch")
        sides = {"off": (compiled_off, setup.teachers, _endless(batcher)),
                 "on": (setup.step, None,
                        _endless(teacher_cache.CachedTeacherBatcher(batcher, cache)))}
        state, result = setup.state, {"cache_bytes": cache.nbytes}
        for name, (step, teachers, batches) in sides.items():

            def run(n):
                nonlocal state
                for _ in range(n):
                    state, out = step(state, teachers, sharding.shard_batch(next(batches), mesh),
                                      key)
                jax.block_until_ready((state, out))

            run(1)  # Compile / warm up.
            times = _timed_runs(lambda: run(steps), repeats)
            result[f"{name}_examples_per_s"] = steps * rows / statistics.median(times)
    setup.state = state
    result["cache_speedup"] = result["on_examples_per_s"] / result["off_examples_per_s"]
    return result


def measure_bucketing(setup: KDSetup, examples: list[data.Example], tokenizer, mesh: Mesh, *,
                      batch_size: int, batches: int, length: int, seed: int,
                      repeats: int) -> dict:
    """The distillation step over the same `batches` seeded-shuffled SST-2 train batches, padded
    to the default length buckets or to `length` for every batch.

    The examples are a seeded random subset of `batches * batch_size` training examples; the
    Batcher's shuffle (the same seed for both) makes identical batches either way, only their
    padding differs. Every shape is compiled before timing; each step ships its host batch.
    """
    split = data.encode(_seeded_subset(examples, batches * batch_size, seed), tokenizer, length)
    step, key = setup.step, sharding.replicate(jax.random.key(0), mesh)
    state = setup.state
    result = {"batches": 0, "examples": len(split), "length": length}
    for name, buckets in (("bucketed", data.default_buckets(length)), ("fixed", (length,))):
        host = list(data.Batcher(split, batch_size, buckets=buckets, shuffle=True,
                                 seed=seed).epoch(0))
        widths = [b["input_ids"].shape[1] for b in host]
        for width in sorted(set(widths)):  # Compile every shape first.
            state, out = step(state, setup.teachers,
                              sharding.shard_batch(host[widths.index(width)], mesh), key)
        jax.block_until_ready(out)

        def run():
            nonlocal state
            for b in host:
                state, metrics = step(state, setup.teachers, sharding.shard_batch(b, mesh), key)
            jax.block_until_ready(metrics)

        times = _timed_runs(run, repeats)
        rows = sum(int(b["weights"].sum()) for b in host)
        result.update({f"{name}_examples_per_s": rows / statistics.median(times),
                       f"{name}_mean_padded_length": float(np.mean(widths)),
                       f"{name}_shapes": sorted(set(widths))})
        result["batches"] = len(host)
    setup.state = state
    result["mean_real_length"] = float(np.mean(split.lengths))
    result["bucketing_speedup"] = (result["bucketed_examples_per_s"]
                                   / result["fixed_examples_per_s"])
    return result


def inference_models(teacher: BertClassifier, num_labels: int, tokenizer, label_names,
                     dtype: str) -> list[tuple[str, nnx.Module]]:
    """The teacher and one random-init model per recipe student size: half_depth and
    tenth_size from `recipes.SETTINGS`, the BiLSTM of `recipes.bilstm_config`."""
    from kdjax.methods import bilstm

    models = [("teacher", teacher)]
    for name in ("half_depth", "tenth_size"):
        size = recipes.SETTINGS[name]
        cfg = distill.student_config(teacher.config, layers=size["layers"], hidden=size["hidden"],
                                     heads=size["heads"], intermediate=size["intermediate"],
                                     dtype=dtype)
        models.append((name, BertClassifier(cfg, num_labels, rngs=nnx.Rngs(1))))
    config = recipes.bilstm_config("tang")
    config.student.init = "random"
    models.append(("bilstm", bilstm.build_student(config, teacher, num_labels, tokenizer,
                                                  label_names, pair=False)))
    return models


def measure_inference(models, dev: data.EncodedSplit, mesh: Mesh, *, batch_size: int,
                      repeats: int) -> list[dict]:
    """Examples/s of deterministic inference per model over the dev split (length buckets,
    `distill.inference_speed`: compiled first, best of `repeats`)."""
    from kdjax.models import bilstm as bilstm_model

    buckets = data.default_buckets(dev.input_ids.shape[1])
    rows = []
    for name, model in models:
        if isinstance(model, BertClassifier):
            size = dict(layers=model.config.num_hidden_layers, hidden=model.config.hidden_size,
                        non_embedding_params=distill.non_embedding_params(model))
        else:
            size = dict(layers=1, hidden=model.config.hidden_size,
                        non_embedding_params=bilstm_model.non_embedding_params(model))
        rate = distill.inference_speed(model, dev, batch_size, buckets, mesh, repeats=repeats)
        rows.append({"model": name, **size, "examples_per_s": rate})
    for row in rows:
        row["speedup_vs_teacher"] = row["examples_per_s"] / rows[0]["examples_per_s"]
    return rows


def evaluate_targets(result: dict, platform: str, preset: str, dtype: str) -> dict:
    """{name: {target, value, met}} for the targets that apply to this device and setting
    (`met` is None when the value was not measured)."""
    if platform == "cpu":
        targets = CPU_TARGETS
    elif preset == "bert-base" and dtype == "bfloat16":
        targets = GPU_BERT_BASE_BF16_TARGETS
    else:
        targets = {}
    out = {}
    for name, target in targets.items():
        value = result.get(name)
        out[name] = {"target": target, "value": value,
                     "met": None if value is None else bool(value >= target)}
    return out


def device_info(mesh: Mesh) -> dict:
    device = mesh.devices.flat[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "device_count": int(mesh.size), "process_count": jax.process_count(),
            "cpu_cores": bench_torch.cpu_cores(), "jax_version": jax.__version__}


# ------------------------------------------------------------------------------------------------
# The whole benchmark


def run_bench(settings: BenchSettings) -> dict:
    """Runs every measurement of `kdjax bench` and returns the result dict (see the module
    docstring; `format_table` renders it).

    Raises:
      BenchError: settings that cannot work here (batch not divisible by the devices, a sequence
        longer than the teacher's positions, torch missing without --no-torch).
    """
    settings = settings.resolved()
    started = time.perf_counter()
    sections = _Sections()
    sections.start("setup")
    mesh = sharding.make_mesh()
    if settings.batch_size % mesh.size or settings.eval_batch_size % mesh.size:
        raise BenchError(f"--batch-size ({settings.batch_size}) and --eval-batch-size "
                         f"({settings.eval_batch_size}) must be divisible by the {mesh.size} "
                         "devices of the mesh")
    platform = mesh.devices.flat[0].platform
    torch_device = "cpu"
    if settings.torch:
        torch = bench_torch.import_torch()  # Fails early, with the install command.
        if platform == "gpu":
            if not torch.cuda.is_available():
                raise BenchError("JAX runs on a GPU but this torch build has no CUDA: comparing "
                                 "with PyTorch on the CPU would mean nothing; install a CUDA "
                                 "torch or pass --no-torch")
            torch_device = "cuda"
        torch.set_num_threads(bench_torch.cpu_cores())

    task = data.load_task(settings.task)
    teacher, tokenizer, source = load_teacher(settings, task.num_labels)
    for flag, length in (("--seq-len", settings.seq_len),
                         ("--bucket-length", settings.bucket_length)):
        if length > teacher.config.max_position_embeddings:
            raise BenchError(f"{flag} {length} exceeds the teacher's "
                             f"max_position_embeddings ({teacher.config.max_position_embeddings})")
    _say(f"teacher {source}: {teacher.config.num_hidden_layers} x {teacher.config.hidden_size}; "
         f"{mesh.size} {platform} device(s); {settings.steps} steps x {settings.repeats} repeats")

    train_examples = task.splits["train"]
    batcher, batch = fixed_batch(train_examples, tokenizer, settings.batch_size,
                                 settings.seq_len, settings.seed)
    setup = kd_setup(teacher, task.num_labels, tokenizer, mesh, dtype=settings.dtype)
    result = {"settings": dataclasses.asdict(settings), "device": device_info(mesh),
              "teacher": {"source": source, "layers": teacher.config.num_hidden_layers,
                          "hidden": teacher.config.hidden_size},
              "student": {"layers": setup.student.config.num_hidden_layers,
                          "hidden": setup.student.config.hidden_size,
                          "init_layers": list(setup.init_layers)},
              "timing": "examples/s = real examples x steps / the median wall time over the "
                        "repeats; compile and a warm-up step excluded"}

    # The PyTorch step is built before any kdjax step runs: same initial weights.
    torch_step = None
    if settings.torch:
        torch_step = torch_kd_step(setup, teacher, device=torch_device, dtype=settings.dtype)

    sections.start("kdjax_step", "kdjax step: compiling and timing")
    kdjax_step, compiled = measure_kdjax_step(setup, batch, mesh, steps=settings.steps,
                                              repeats=settings.repeats)
    result["kdjax"] = kdjax_step
    result["kdjax_examples_per_s"] = kdjax_step["examples_per_s"]
    result["compile_seconds"] = kdjax_step["compile_seconds"]
    result["memory"] = kdjax_step["memory"]

    result["torch_examples_per_s"] = result["speedup_vs_torch"] = None
    if torch_step is not None:
        sections.start("torch_step", f"PyTorch eager step ({torch_device}, "
                                     f"{bench_torch.cpu_cores()} threads): timing")
        result["torch"] = measure_torch_step(torch_step, batch, steps=settings.steps,
                                             repeats=settings.repeats, device=torch_device)
        del torch_step
        result["torch_examples_per_s"] = result["torch"]["examples_per_s"]
        result["speedup_vs_torch"] = (result["kdjax_examples_per_s"]
                                      / result["torch_examples_per_s"])

    sections.start("peak_matmul", "peak matmul FLOP/s")
    peak = measure_peak_flops(mesh, settings.dtype, size=settings.matmul_size)
    result["peak"] = peak
    result["peak_flops_per_s"] = peak["peak_flops_per_s"]
    result["achieved_flops_per_s"] = kdjax_step["achieved_flops_per_s"]
    result["fraction_of_peak"] = result["achieved_flops_per_s"] / result["peak_flops_per_s"]

    sections.start("teacher_cache", "teacher cache on vs off")
    result["cache"] = measure_cache(setup, compiled, batcher, mesh, teacher=teacher,
                                    teacher_dir=hf.resolve_checkpoint(settings.teacher),
                                    steps=settings.steps, repeats=settings.repeats)
    result["cache_speedup"] = result["cache"].get("cache_speedup")

    sections.start("bucketing", f"bucketing vs fixed {settings.bucket_length}: "
                                f"{settings.bucket_batches} batches")
    result["bucketing"] = measure_bucketing(
        setup, train_examples, tokenizer, mesh, batch_size=settings.batch_size,
        batches=settings.bucket_batches, length=settings.bucket_length, seed=settings.seed,
        repeats=1 if settings.quick else 2)
    result["bucketing_speedup"] = result["bucketing"]["bucketing_speedup"]

    sections.start("inference", "inference throughput per student size")
    dev_examples = task.splits["dev"]
    if settings.dev_examples:
        dev_examples = dev_examples[:settings.dev_examples]
    dev = data.encode(dev_examples, tokenizer, settings.seq_len)
    models = inference_models(teacher, task.num_labels, tokenizer, task.label_names,
                              settings.dtype)
    result["inference"] = measure_inference(models, dev, mesh,
                                            batch_size=settings.eval_batch_size,
                                            repeats=1 if settings.quick else 3)

    result["memory"].update(process_memory())
    result["targets"] = evaluate_targets(result, platform, settings.preset, settings.dtype)
    sections.start(None)
    result["section_seconds"] = sections.seconds
    result["total_seconds"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------
# Output


def _num(value, fmt: str = ",.1f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{fmt}}{unit}"


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def format_table(result: dict) -> str:
    """The result as a readable plain-text report."""
    s, d = result["settings"], result["device"]
    lines = [
        f"kdjax bench: {d['platform']} ({d['device_kind']}) x {d['device_count']}, "
        f"{d['cpu_cores']} CPU cores; preset {s['preset']}, {s['dtype']}, batch "
        f"{s['batch_size']} x {s['seq_len']} tokens, teacher {result['teacher']['layers']} x "
        f"{result['teacher']['hidden']} -> student {result['student']['layers']} x "
        f"{result['student']['hidden']}",
        "",
        f"{'distillation step (kd: CE + soft KL)':40s} {'examples/s':>12s} {'step ms':>9s}",
    ]
    k = result["kdjax"]
    lines.append(f"{'  kdjax (jit)':40s} {_num(k['examples_per_s']):>12s} "
                 f"{_num(1e3 * k['step_seconds']):>9s}")
    if "torch" in result:
        t = result["torch"]
        label = f"  PyTorch eager ({t['attention_implementation']}, {t['threads']} thr)"
        lines.append(f"{label:40s} {_num(t['examples_per_s']):>12s} "
                     f"{_num(1e3 * t['step_seconds']):>9s}")
    lines += [
        f"{'  speedup vs PyTorch':40s} {_num(result['speedup_vs_torch'], '.2f', 'x'):>12s}",
        f"{'  compile (s)':40s} {_num(result['compile_seconds'], '.1f'):>12s}",
        "",
        f"{'step FLOPs (XLA cost analysis)':40s} {_num(k['step_flops'] / 1e9, ',.2f', ' G'):>12s}",
        f"{'achieved FLOP/s':40s} {_num(result['achieved_flops_per_s'] / 1e9, ',.1f', ' G'):>12s}",
        f"{'peak matmul FLOP/s (n=' + str(result['peak']['matmul_size']) + ')':40s} "
        f"{_num(result['peak_flops_per_s'] / 1e9, ',.1f', ' G'):>12s}",
        f"{'fraction of peak':40s} {_num(result['fraction_of_peak'], '.3f'):>12s}",
        "",
    ]
    c = result["cache"]
    lines += [
        f"{'teacher cache off (teacher forward)':40s} {_num(c.get('off_examples_per_s')):>12s}",
        f"{'teacher cache on (stored logits)':40s} {_num(c.get('on_examples_per_s')):>12s}",
        f"{'  cache speedup':40s} {_num(result['cache_speedup'], '.2f', 'x'):>12s}",
        "",
    ]
    b = result["bucketing"]
    lines += [
        f"{'length buckets (mean pad ' + _num(b['bucketed_mean_padded_length']) + ')':40s} "
        f"{_num(b['bucketed_examples_per_s']):>12s}",
        f"{'fixed ' + str(b['length']) + ' padding':40s} {_num(b['fixed_examples_per_s']):>12s}",
        f"{'  bucketing speedup':40s} {_num(result['bucketing_speedup'], '.2f', 'x'):>12s}",
        "",
        f"{'inference (dev, buckets)':22s} {'layers':>6s} {'hidden':>6s} {'non-emb params':>15s} "
        f"{'examples/s':>12s} {'vs teacher':>10s}",
    ]
    for row in result["inference"]:
        lines.append(f"  {row['model']:20s} {row['layers']:6d} {row['hidden']:6d} "
                     f"{row['non_embedding_params']:15,d} {_num(row['examples_per_s']):>12s} "
                     f"{_num(row['speedup_vs_teacher'], '.2f', 'x'):>10s}")
    m = result["memory"]
    lines += ["", f"memory: step buffers {_gib(m.get('step_bytes'))} (arguments "
                  f"{_gib(m.get('argument_bytes'))}, temp {_gib(m.get('temp_bytes'))}), process "
                  f"max RSS {_gib(m.get('max_rss_bytes'))}"
              + (f", device peak {_gib(m['device_peak_bytes'])}"
                 if "device_peak_bytes" in m else "")]
    if result["targets"]:
        lines += ["", "targets:"]
        for name, t in result["targets"].items():
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            lines.append(f"  {name:22s} >= {t['target']:<5g} {_num(t['value'], '.3f'):>8s}  "
                         f"{verdict}")
    lines.append(f"\n({result['total_seconds']:.0f} s in all; {result['timing']})")
    return "\n".join(lines)


def write_json(result: dict, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def settings_from_args(args) -> BenchSettings:
    return BenchSettings(
        quick=args.quick, teacher=args.teacher, preset=args.preset, batch_size=args.batch_size,
        seq_len=args.seq_len, steps=args.steps, repeats=args.repeats, dtype=args.dtype,
        torch=not args.no_torch, bucket_batches=args.bucket_batches,
        bucket_length=args.bucket_length, eval_batch_size=args.eval_batch_size,
        dev_examples=args.dev_examples, matmul_size=args.matmul_size)


def main(args) -> dict:
    """`kdjax bench`: runs, prints the table, writes --json."""
    try:
        result = run_bench(settings_from_args(args))
    except bench_torch.TorchMissing as e:
        raise BenchError(str(e)) from None
    print(format_table(result), flush=True)
    if args.json:
        print(f"wrote {write_json(result, args.json)}", flush=True)
    return result

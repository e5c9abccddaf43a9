"""Teachers: fine-tuned once per run (or used as they are), frozen, and run outside every
gradient; their outputs come from a forward pass or from the teacher-output cache."""

from __future__ import annotations

import json
import pathlib

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kdjax import config as config_lib, data, hf, train
from kdjax.engine.method import DistillError, Needs


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


def model_inputs(batch: dict) -> tuple:
    """The encoder's positional inputs from a batch."""
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def teacher_forward(teachers: Teachers, batch: dict, needs: Needs) -> dict:
    """The frozen teachers' outputs that `needs` asks for; deterministic, under stop_gradient.

    Returns:
      A dict with `logits` [K, B, C] (K teachers) when asked, and the first teacher's
      `hidden_states` (tuple, embeddings first), `attention_scores` and `attention_probs`,
      `queries`, `keys` and `values` (tuples, one per layer).
    """
    logits, hidden = needs.teacher_logits, bool(needs.teacher_hidden)
    attention, qkv = needs.teacher_attention, needs.teacher_qkv
    out = {}
    all_logits = []
    for i, (graphdef, params) in enumerate(zip(teachers.graphdefs, teachers.params)):
        if i > 0 and not logits:
            break
        result = nnx.merge(graphdef, params)(*model_inputs(batch),
                                             output_hidden_states=hidden and i == 0,
                                             output_attentions=attention and i == 0,
                                             output_qkv=qkv and i == 0)
        all_logits.append(result.logits)
        if i == 0:
            if hidden:
                out["hidden_states"] = result.hidden_states
            if attention:
                out["attention_scores"] = result.attention_scores
                out["attention_probs"] = result.attention_probs
            if qkv:
                out.update(queries=result.queries, keys=result.keys, values=result.values)
    if logits:
        out["logits"] = jnp.stack(all_logits)
    return jax.lax.stop_gradient(out)


def cached_teacher_outputs(batch: dict, cached_hidden_layers: tuple[int, ...]) -> dict:
    """`teacher_forward`'s outputs rebuilt from a batch that carries cached ones
    (`teacher_cache.CachedTeacherBatcher`): `logits` [K, B, C] from `teacher_logits` [B, K, C],
    and `hidden_states` indexed by teacher layer (None where nothing is stored) from
    `teacher_hidden` [B, S, L, H] and `cached_hidden_layers` (the indices it holds, in order)."""
    out = {"logits": jnp.moveaxis(batch["teacher_logits"], 1, 0)}
    if cached_hidden_layers:
        stored = {layer: j for j, layer in enumerate(cached_hidden_layers)}
        hidden = batch["teacher_hidden"]
        # Long enough for every stored index; cosine's [-1] is the last layer, which it stores.
        out["hidden_states"] = tuple(hidden[:, stored[i]] if i in stored else None
                                     for i in range(max(stored) + 1))
    return jax.lax.stop_gradient(out)


def teacher_finetune_config(config: ml_collections.ConfigDict,
                             seed: int) -> ml_collections.ConfigDict:
    ft = config_lib.finetune_config()
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
    ft.train.holdout_every = config.train.get("holdout_every", 0)
    ft.train.patience = config.teacher.get("patience", 0)
    ft.train.check_export = config.train.get("check_export", False)
    return ft


def _is_task_model(name: str, label_names: list[str], class_names: list[str]) -> bool:
    """True when `name` is a classifier already fine-tuned for a task with these labels: its
    id2label holds the class names, or (saved before kdjax named classes) the label values."""
    try:
        directory = hf.resolve_checkpoint(name)
    except hf.CheckpointError:
        return False
    return hf.label_names_of(directory) in (label_names, class_names)


def prepare_teachers(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     label_names: list[str], class_names: list[str] | None = None, *,
                     progress: bool = True) -> list[pathlib.Path]:
    """The fine-tuned teacher directories: teacher.name itself when it is already a classifier
    for this task, else one fine-tuning run per seed in WORKDIR/teacher-seedN (reused when
    finished); then teacher.extra. `class_names` (`data.class_names`) are the names such a
    classifier's id2label may give the labels; default: the labels themselves."""
    class_names = class_names or label_names
    if _is_task_model(config.teacher.name, label_names, class_names):
        dirs = [hf.resolve_checkpoint(config.teacher.name)]
    else:
        dirs = []
        for seed in config.teacher.seeds:
            run_dir = workdir / f"teacher-seed{seed}"
            if not (run_dir / "eval.json").is_file():
                print(f"fine-tuning teacher {config.teacher.name} (seed {seed}) into {run_dir}",
                      flush=True)
                result = train.fine_tune(teacher_finetune_config(config, seed), run_dir,
                                         progress=progress)
                if not result["finished"]:
                    raise DistillError(f"teacher fine-tuning in {run_dir} stopped early "
                                       "(train.stop_after_steps); rerun to finish it")
            else:
                result = json.loads((run_dir / "eval.json").read_text())
            # The teacher's quality bounds the student's: say it before distillation starts.
            metric = data.task_metric(config.data.task)
            print(f"teacher {run_dir.name}: dev {metric} {result[metric]:.4f} "
                  f"({result.get('examples', '?')} examples)", flush=True)
            dirs.append(run_dir / "model")
    first_vocabulary = None
    for extra in config.teacher.extra:
        directory = hf.resolve_checkpoint(extra)
        if hf.label_names_of(directory) not in (label_names, class_names):
            raise DistillError(f"teacher.extra {extra} is not fine-tuned for this task's labels "
                               f"{label_names}")
        # The data are tokenised once, with the first teacher's tokenizer, and every teacher
        # reads those ids: another vocabulary would silently read other words.
        first_vocabulary = first_vocabulary or _vocabulary(dirs[0])
        vocabulary = _vocabulary(directory)
        if vocabulary != first_vocabulary:
            differing = sorted(set(vocabulary.items()) ^ set(first_vocabulary.items()))
            raise DistillError(
                f"teacher.extra {extra} has another tokenizer than the first teacher {dirs[0]} "
                f"({len(vocabulary)} vs {len(first_vocabulary)} tokens, e.g. {differing[0][0]!r} "
                "differs); every teacher reads the first teacher's token ids, so all need its "
                "vocabulary")
        dirs.append(directory)
    return dirs


def _vocabulary(directory) -> dict[str, int]:
    """token -> id of a checkpoint directory's tokenizer."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory)).get_vocab()


def load_teachers(directories, *, dtype: str, mlm_head: bool = False) -> list:
    """The fine-tuned teachers as `BertClassifier`s; with `mlm_head`, with their MLM heads where
    the checkpoint has one (a student's MLM head starts from the first teacher's)."""
    teachers = []
    for directory in directories:
        try:
            model, _, _ = hf.load_pretrained(str(directory), dtype=dtype, mlm_head=mlm_head)
        except hf.CheckpointError:
            if not mlm_head:
                raise
            model, _, _ = hf.load_pretrained(str(directory), dtype=dtype)
        teachers.append(model)
    return teachers

"""Python configs with validated command-line overrides.

A config is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision
style); `arg` picks a variant, as in `configs/finetune.py:quick`. Overrides such as
`--config.optim.lr=3e-5` may only touch keys the config already has and must keep their type;
`validate` then checks ranges. Every refusal is a `ConfigError` naming the key.

The sections every run has (model, data, optim, train) are built here; the distillation sections
and the recipes are built by `kdjax.recipes` from the methods' own defaults.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Any, Callable, Sequence

import ml_collections


# ------------------------------------------------------------------------------------------------
# The sections every run has


def finetune_config() -> ml_collections.ConfigDict:
    """model / data / optim / train: everything `kdjax fine-tune` reads."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "sentence-transformers/all-MiniLM-L6-v2"  # A path or a hub name.
    config.model.dtype = "float32"  # Computation dtype; parameters stay float32.

    config.data = data_config()
    config.optim = optim_config()

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 1.0
    config.train.max_steps = 0  # 0 = run for `epochs`.
    config.train.stop_after_steps = 0  # End this invocation after N steps (resume later); 0 = off.
    config.train.seed = 0
    config.train.log_every = 50
    config.train.checkpoint_every = 500  # 0 = only at the end.
    config.train.keep_checkpoints = 2
    config.train.holdout_every = 0  # Steps between held-out evaluations; 0 = 10 per run.
    # Stop after this many held-out evaluations without improvement; 0 = never stop early.
    config.train.patience = 0
    config.train.num_devices = 0  # 0 = every device.
    # FSDP: parameters and optimizer state split over the devices by a shape rule
    # (kdjax.sharding.state_shardings) instead of replicated: the same updates, and each device
    # holds 1/N of every large array.
    config.train.fsdp = False
    # Micro-batches per update: the batch is split k ways, gradients accumulated, one update
    # (data.batch_size must be a multiple of k x the devices).
    config.train.grad_accum_steps = 1
    config.train.tensorboard = False
    # After saving model/, reload it with transformers' PyTorch model and compare logits on dev
    # examples (as `kdjax export` does); needs torch, else the check is skipped with a message.
    config.train.check_export = False
    # With a held-out slice: at each evaluation that improves on it, write the state to
    # WORKDIR/best_model/ (a Hugging Face directory), so a long run has a model to ship before
    # it ends.
    config.train.export_every_eval = False
    return config


def data_config() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.task = "sst2"  # A GLUE task name, or any name when files are given.
    data.train_file = ""  # Local .tsv/.csv/.jsonl; empty = the GLUE task.
    data.dev_file = ""
    data.text_columns = ("sentence",)  # One column, or two for sentence pairs.
    data.label_column = "label"
    # Whether `"` quotes a TSV/CSV field: none (quotes are text, GLUE's convention), csv (a
    # quoted field may hold delimiters, quotes and line breaks), auto (none for .tsv, csv for .csv).
    data.quoting = "auto"
    # Class names saved with models (id2label), in label-index order (integers ascending, else
    # sorted); () = the task's known names (GLUE) or the labels as written in the files.
    data.label_names = ()
    # Tokens per example; 0 = the smallest length bucket holding 99 % of the training set whole.
    data.max_length = 64
    data.buckets = ()  # Padded lengths jit compiles for; () = the default ladder.
    data.batch_size = 32
    data.eval_batch_size = 128
    data.train_limit = 0  # Train on a seeded random subset of this size (0 = all).
    data.subset_seed = 0
    # A seeded slice of the labelled training examples set aside to choose the checkpoint and
    # stop training (train.holdout_every, train.patience); dev is then only evaluated at the end.
    # 0 = off (the last checkpoint is the result).
    data.holdout_fraction = 0.0
    data.dev_limit = 0
    return data


def augment_config(augment: str = "none") -> ml_collections.ConfigDict:
    """The `augment` section: the generator of augmented transfer examples (`kdjax.augment`):
    tang, tinybert or none. The Distilled BiLSTM trains on them; any transformer-student
    recipe adds them to its task stages when set (TinyBERT's task distillation)."""
    section = ml_collections.ConfigDict()
    section.method = augment  # tang | tinybert | none
    # Copies per example before duplicates are dropped: Tang's n_iter, TinyBERT's N_a (20 both).
    section.n_iter = 20
    # Cap on new examples (0 = none). SST-2 x 20 would be ~1.3 M examples for the teacher to
    # label and the student to train on; 200k keeps a 2-core CPU run in hours, not days.
    section.max_examples = 200_000
    section.seed = 0
    section.p_mask = 0.1  # Tang: [MASK] a word.
    section.p_pos = 0.1  # Tang: replace a word by one of the same POS tag.
    section.p_ng = 0.25  # Tang: keep only a random n-gram of the copy.
    section.max_ngram = 5
    section.p_t = 0.4  # TinyBERT: replace a candidate word.
    section.k = 15  # TinyBERT: candidates per word.
    section.pair_sides = "random"  # Pairs: first | second | both | random.
    return section


# The generators of kdjax.augment; none = no augmented examples.
AUGMENT_METHODS = ("tang", "tinybert", "none")


def optim_config(lr: float = 1e-4) -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict()
    optim.lr = lr
    optim.warmup_ratio = 0.1
    optim.weight_decay = 0.01
    optim.grad_clip = 1.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    return optim


# ------------------------------------------------------------------------------------------------
# Loading, overriding and validating


class ConfigError(ValueError):
    """An invalid config file, key or value; the message names the key."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` and returns its locked ConfigDict."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"kdjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg=None) function")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:
        raise ConfigError(f"{spec}: {e}") from None
    config.lock()  # Unknown keys now raise instead of silently creating new fields.
    return config


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # Let the type check below report it.
    if isinstance(current, tuple):
        if isinstance(value, str):  # Bare words: `q1,q2` or `(q1,q2)`.
            value = tuple(v.strip() for v in value.strip("()[]").split(",") if v.strip())
        elif isinstance(value, list):
            value = tuple(value)
        elif not isinstance(value, tuple):
            value = (value,)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `key.path=value` overrides (the `--config.` prefix is optional).

    Raises:
      ConfigError: unknown key, or a value of the wrong type.
    """
    for item in overrides:
        key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --config.{key}=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} "
                                  f"(in override {item!r})")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            known = ", ".join(sorted(node.keys())) if isinstance(
                node, ml_collections.ConfigDict) else ""
            raise ConfigError(f"unknown config key {key!r}" + (f"; known here: {known}"
                                                                if known else ""))
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; set one of its fields")
        value = _parse_value(text, current)
        if current is not None and value is not None and type(value) is not type(current):
            raise ConfigError(f"config key {key!r} expects {type(current).__name__}, "
                              f"got {text!r}")
        with node.unlocked():
            node[leaf] = value
    return config


# (key, check, what the check demands) for the sections every run has and the engine's; keys a
# config lacks are skipped. Each method brings the rules of its own keys (kdjax/methods/).
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("optim.lr", lambda v: v > 0, "must be > 0"),
    ("optim.warmup_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("optim.grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    ("optim.b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "must be > 0"),
    ("data.max_length", lambda v: v == 0 or 2 <= v <= 512, "must be 0 for auto, or in [2, 512]"),
    ("data.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("data.eval_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("data.train_limit", lambda v: v >= 0, "must be >= 0 (0 = all)"),
    ("data.dev_limit", lambda v: v >= 0, "must be >= 0 (0 = all)"),
    ("data.holdout_fraction", lambda v: 0 <= v <= 0.5,
     "must be in [0, 0.5] (the share of labelled training examples held out; 0 = off)"),
    ("data.quoting", lambda v: v in ("auto", "none", "csv"), "must be 'auto', 'none' or 'csv'"),
    ("data.text_columns", lambda v: len(v) in (0, 1, 2), "must name 1 or 2 columns"),
    ("data.buckets", lambda v: all(b >= 1 for b in v), "must be positive lengths"),
    ("model.dtype", lambda v: v in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16'"),
    ("model.name", lambda v: bool(v), "must name a checkpoint"),
    ("train.epochs", lambda v: v > 0, "must be > 0"),
    ("train.max_steps", lambda v: v >= 0, "must be >= 0 (0 = from epochs)"),
    ("train.stop_after_steps", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("train.log_every", lambda v: v >= 1, "must be >= 1"),
    ("train.checkpoint_every", lambda v: v >= 0, "must be >= 0 (0 = only at the end)"),
    ("train.keep_checkpoints", lambda v: v >= 1, "must be >= 1"),
    ("train.holdout_every", lambda v: v >= 0, "must be >= 0 (0 = 10 evaluations per run)"),
    ("train.patience", lambda v: v >= 0, "must be >= 0 (0 = never stop early)"),
    ("teacher.patience", lambda v: v >= 0, "must be >= 0 (0 = never stop early)"),
    ("train.num_devices", lambda v: v >= 0, "must be >= 0 (0 = all devices)"),
    ("train.fsdp", lambda v: isinstance(v, bool), "must be True or False"),
    ("train.check_export", lambda v: isinstance(v, bool), "must be True or False"),
    ("train.export_every_eval", lambda v: isinstance(v, bool), "must be True or False"),
    ("train.grad_accum_steps", lambda v: isinstance(v, int) and v >= 1,
     "must be an integer >= 1 (micro-batches per update; 1 = off)"),
    # Distillation configs.
    ("augment.method", lambda v: v in AUGMENT_METHODS, f"must be one of {AUGMENT_METHODS}"),
    ("augment.n_iter", lambda v: v >= 0, "must be >= 0"),
    ("augment.max_examples", lambda v: v >= 0, "must be >= 0 (0 = no cap)"),
    ("augment.max_ngram", lambda v: v >= 1, "must be >= 1"),
    ("augment.k", lambda v: v >= 1, "must be >= 1"),
    ("augment.pair_sides", lambda v: v in ("random", "first", "second", "both"),
     "must be 'random', 'first', 'second' or 'both'"),
    *((f"augment.{p}", lambda v: 0 <= v <= 1, "must be in [0, 1]")
      for p in ("p_mask", "p_pos", "p_ng", "p_t")),
    ("teacher.name", lambda v: bool(v), "must name a checkpoint"),
    ("teacher.seeds", lambda v: len(v) >= 1 and len(set(v)) == len(v),
     "must list at least one seed, without repeats"),
    ("teacher.epochs", lambda v: v > 0, "must be > 0"),
    ("teacher.cache", lambda v: isinstance(v, bool), "must be True or False"),
    ("teacher.cache_hidden", lambda v: isinstance(v, bool), "must be True or False"),
    ("teacher.cache_dir", lambda v: isinstance(v, str), "must be a path ('' = WORKDIR/cache)"),
    ("teacher.cache_max_gb", lambda v: v > 0, "must be > 0 (gigabytes)"),
    ("student.layers", lambda v: v >= 1, "must be >= 1"),
    ("student.hidden", lambda v: v >= 0, "must be >= 0 (0 = the teacher's)"),
    ("student.heads", lambda v: v >= 0, "must be >= 0 (0 = the teacher's)"),
    ("student.intermediate", lambda v: v >= 0, "must be >= 0 (0 = default)"),
    ("student.init", lambda v: v in ("teacher", "random"), "must be 'teacher' or 'random'"),
    ("student.init_layers", lambda v: v in ("spread", "first", "explicit"),
     "must be 'spread', 'first' or 'explicit'"),
    ("student.mlm_head_init", lambda v: v in ("teacher", "random"),
     "must be 'teacher' or 'random'"),
    ("stages", lambda v: len(v) >= 1, "must name at least one stage"),
]

# Rules for every stage section named in `stages`.
_STAGE_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("epochs", lambda v: v > 0, "must be > 0"),
    ("lr", lambda v: v >= 0, "must be >= 0 (0 = optim.lr)"),
    ("teacher", lambda v: v in ("finetuned", "pretrained"), "must be 'finetuned' or 'pretrained'"),
    ("data", lambda v: v in ("train", "unlabelled"), "must be 'train' or 'unlabelled'"),
]


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def validate(config: ml_collections.ConfigDict,
             extra_rules: Sequence[tuple[str, Callable[[Any], bool], str]] = (),
             ) -> ml_collections.ConfigDict:
    """Checks value ranges and cross-field constraints.

    Args:
      config: the config.
      extra_rules: `(dotted key, check, what it demands)` of the methods the config names
        (`kdjax.methods.config_rules`); keys the config lacks are skipped.

    Raises:
      ConfigError: the first invalid value, naming its key.
    """
    rules = list(_RULES) + list(extra_rules)
    stages = _get(config, "stages")
    if stages is not _MISSING:
        for name in stages:
            if not isinstance(_get(config, name), ml_collections.ConfigDict):
                raise ConfigError(f"config key 'stages' names {name!r}, but the config has no "
                                  f"section {name!r}")
            rules += [(f"{name}.{key}", ok, demand) for key, ok, demand in _STAGE_RULES]
    for key, ok, demand in rules:
        value = _get(config, key)
        if value is _MISSING or value is None:
            continue
        try:
            passed = ok(value)
        except TypeError:
            passed = False
        if not passed:
            raise ConfigError(f"config key {key!r} {demand}, got {value!r}")
    buckets, max_length = _get(config, "data.buckets"), _get(config, "data.max_length")
    if buckets not in (_MISSING, ()) and max_length is not _MISSING:
        if max(buckets) < max_length:
            raise ConfigError(f"config key 'data.buckets' must reach data.max_length "
                              f"({max_length}), got {buckets!r}")
    if not _get(config, "data.holdout_fraction"):
        if _get(config, "train.export_every_eval") is True:
            raise ConfigError("config key 'train.export_every_eval' exports at each held-out "
                              "evaluation, which data.holdout_fraction=0 turns off; set a "
                              "fraction (e.g. 0.05) or export_every_eval to False")
        for key in ("train.patience", "teacher.patience"):
            if _get(config, key) not in (_MISSING, None, 0):
                raise ConfigError(f"config key {key!r} stops on the held-out slice, which "
                                  "data.holdout_fraction=0 turns off; set a fraction (e.g. "
                                  "0.05) or the patience to 0")
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-able copy (saved with every run)."""
    return config.to_dict()

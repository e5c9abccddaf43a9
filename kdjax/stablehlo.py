"""A trained classifier as a serialized `jax.export` artifact (StableHLO) that runs without kdjax.

`export_classifier` traces the model's deterministic forward pass
`(input_ids, attention_mask, token_type_ids) -> logits` with a symbolic batch size and sequence
length (`jax.export.symbolic_shape`), so one artifact serves every batch and length, and writes

  OUT/model.stablehlo   the bytes of `jax.export.Exported.serialize()`; the weights are inside
  OUT/labels.json       {"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}
  OUT/signature.json    inputs, outputs, the length limit, platforms, jax version
  OUT/<tokenizer files> the model's own tokenizer (transformers' save_pretrained)

`load_artifact` is the whole of what a user needs to run it: `jax.export.deserialize` and a call;
no model code. Works for the BERT classifiers and the BiLSTM student (anything whose call returns
an object with float32 `logits`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ARTIFACT_FILE = "model.stablehlo"
LABELS_FILE = "labels.json"
SIGNATURE_FILE = "signature.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Lowered for each so the same file runs on a CPU, an NVIDIA GPU or a TPU (jax.export lowers
# for platforms it is not running on).
PLATFORMS = ("cpu", "cuda", "tpu")
# The artifact runs the same float32 program as the model; only XLA's fusion choices differ.
CHECK_TOLERANCE = 1e-5


class ExportError(ValueError):
    """An artifact that cannot be written or read; the message names the file and the problem."""


def _serialization_available() -> None:
    try:
        import flatbuffers  # noqa: F401  (jax.export's serializer needs it)
    except ImportError:
        raise ExportError("writing or reading a StableHLO artifact needs the flatbuffers "
                          "package: pip install 'kdjax[export]'") from None


def export_forward(model, *, platforms=PLATFORMS) -> jax.export.Exported:
    """`model`'s deterministic forward pass, exported with batch and length symbolic.

    The length is bounded by the position table when the model has one (BERT's
    `max_position_embeddings`), so the shape check in the embeddings is decided at export time.
    """
    max_length = getattr(model.config, "max_position_embeddings", None)
    constraints = (f"length <= {max_length}",) if max_length else ()
    batch, length = jax.export.symbolic_shape("batch, length", constraints=constraints)
    token_spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def forward(input_ids, attention_mask, token_type_ids):  # each [batch, length] int32
        return model(input_ids, attention_mask, token_type_ids).logits  # [batch, labels] f32

    return jax.export.export(jax.jit(forward), platforms=platforms)(
        token_spec, token_spec, token_spec)


def export_classifier(model, out_dir: str | os.PathLike, *, label_names: list[str],
                      tokenizer=None, platforms=PLATFORMS) -> pathlib.Path:
    """Writes `model` as a StableHLO artifact directory (layout in the module docstring).

    Written next to its destination and renamed into place, like `hf.save_pretrained`.

    Args:
      model: a classifier module (`BertClassifier`, `BiLSTMClassifier`).
      out_dir: destination (replaced if it exists).
      label_names: index -> class name.
      tokenizer: a transformers tokenizer whose files are saved alongside.
      platforms: what the artifact is lowered for.

    Returns:
      The output path.
    """
    from kdjax import hf

    _serialization_available()
    num_labels = getattr(model, "num_labels", None) or model.config.num_labels
    if len(label_names) != num_labels:
        raise ExportError(f"{len(label_names)} label names for a {num_labels}-label model")
    exported = export_forward(model, platforms=platforms)
    out_dir = pathlib.Path(out_dir)
    with hf.staged_directory(out_dir, LABELS_FILE) as staging:
        labels = {"id2label": {str(i): name for i, name in enumerate(label_names)},
                  "label2id": {name: i for i, name in enumerate(label_names)}}
        (staging / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
        signature = {
            "inputs": [{"name": name, "dtype": "int32", "shape": ["batch", "length"]}
                       for name in INPUT_NAMES],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", num_labels]}],
            "max_length": getattr(model.config, "max_position_embeddings", None),
            "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
            "jax_version": jax.__version__,
        }
        (staging / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2) + "\n")
        (staging / ARTIFACT_FILE).write_bytes(exported.serialize())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return out_dir


def load_artifact(directory: str | os.PathLike) -> tuple[Callable, dict[int, str]]:
    """The exported forward pass of an artifact directory and its id2label.

    Returns:
      (forward, id2label): `forward(input_ids, attention_mask, token_type_ids)` takes int32
      [batch, length] arrays and returns float32 [batch, labels] logits.
    """
    _serialization_available()
    directory = pathlib.Path(directory)
    for name in (ARTIFACT_FILE, LABELS_FILE):
        if not (directory / name).is_file():
            raise ExportError(f"{directory / name} not found; is {directory} a directory written "
                              "by `kdjax export --format stablehlo`?")
    exported = jax.export.deserialize(bytearray((directory / ARTIFACT_FILE).read_bytes()))
    id2label = {int(k): v for k, v in
                json.loads((directory / LABELS_FILE).read_text())["id2label"].items()}
    return exported.call, id2label


def check_artifact(model, directory: str | os.PathLike, batch: dict[str, np.ndarray],
                   *, tolerance: float = CHECK_TOLERANCE) -> float:
    """The largest absolute difference between the artifact's logits and `model`'s on `batch`
    (the three inputs as numpy arrays).

    Raises:
      ExportError: the difference exceeds `tolerance`.
    """
    forward, _ = load_artifact(directory)
    inputs = [np.asarray(batch[name], np.int32) for name in INPUT_NAMES]
    theirs = np.asarray(forward(*inputs))
    ours = np.asarray(model(*map(jnp.asarray, inputs)).logits)
    difference = float(np.max(np.abs(theirs - ours)))
    if not difference <= tolerance:
        raise ExportError(f"{directory / ARTIFACT_FILE}: the artifact's logits differ from the "
                          f"model's (max |difference| {difference:.3g} > {tolerance:g})")
    return difference

"""`kdjax export`: a run's checkpoint or a saved model as something a user can ship, checked.

- `--format hf` (a fine-tuning workdir's checkpoint): a Hugging Face directory
  (`hf.save_pretrained`), then reloaded by transformers' PyTorch
  `AutoModelForSequenceClassification` and compared on dev examples (`hf.check_with_transformers`)
  when torch is installed.
- `--format stablehlo` (a workdir's checkpoint, or a saved BERT or BiLSTM model directory): a
  serialized `jax.export` artifact (`kdjax.stablehlo`), reloaded and compared the same way.

Each check prints the largest logit difference, or says why it was skipped.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np

from kdjax import data, hf, stablehlo, train

# Dev examples each check runs (a few batches' worth of tokens on a CPU: seconds).
CHECK_EXAMPLES = 16


def dev_texts(data_config: ml_collections.ConfigDict | dict | None, limit: int = CHECK_EXAMPLES
              ) -> tuple[list[str] | None, list[str] | None, str]:
    """The first `limit` dev texts of a run's task, as (texts_a, texts_b or None, where from).

    Falls back to `hf.CHECK_SENTENCES` (texts_a None) when the data is not at hand: a check is
    still worth running on fixed sentences.
    """
    fallback = None, None, f"{len(hf.CHECK_SENTENCES)} fixed sentences"
    if not data_config:
        return fallback
    cfg = dict(data_config)
    task_name = str(cfg.get("task", "")).lower().replace("-", "")
    if not (cfg.get("train_file") or cfg.get("dev_file")) and (
            task_name not in data.GLUE_TASKS or data.find_local_glue_dir(task_name) is None):
        return fallback  # Only local data: a check must not wait on a hub download.
    try:
        task = data.load_task(cfg.get("task", ""), train_file=cfg.get("train_file", ""),
                              dev_file=cfg.get("dev_file", ""),
                              text_columns=tuple(cfg.get("text_columns", ())),
                              label_column=cfg.get("label_column", "label"), splits=("dev",))
    except (data.DataError, OSError):
        return fallback
    examples = task.splits["dev"][:limit]
    if not examples:
        return fallback
    texts_b = [e.text_b for e in examples] if task.is_pair else None
    return [e.text_a for e in examples], texts_b, f"{len(examples)} dev examples of {task.name}"


def _saved_model(model_dir: pathlib.Path):
    """(model, class names, tokenizer, the kdjax config it was trained with or None)."""
    import transformers

    from kdjax.models import bilstm

    saved = model_dir / "kdjax.json"
    config = json.loads(saved.read_text()).get("kdjax_config") if saved.is_file() else None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    if (model_dir / bilstm.CONFIG_FILE).is_file():
        model = bilstm.load_bilstm(model_dir)
        names = list(model.config.label_names) or [str(i) for i in range(model.config.num_labels)]
        return model, names, tokenizer, config
    model, _, _ = hf.load_pretrained(str(model_dir))
    names = hf.label_names_of(model_dir) or [str(i) for i in range(model.num_labels)]
    return model, names, tokenizer, config


def _run_checkpoint(workdir: pathlib.Path, step: int | None):
    """(model, class names, tokenizer, config, step) of a fine-tuning run's checkpoint."""
    import transformers

    model, label_values, config, step = train.load_run(workdir, step)
    names = data.class_names(config.data.task, label_values,
                             tuple(config.data.get("label_names", ()) or ()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(hf.resolve_checkpoint(config.model.name)))
    return model, names, tokenizer, config.to_dict(), step


def export(*, workdir: str | None = None, model_dir: str | None = None, step: int | None = None,
           fmt: str = "hf", out: str | None = None, check: bool = True) -> dict:
    """Writes the export and checks it.

    Returns:
      {"out": path, "step": step or None, "check": {"max_abs_difference": float or None,
      "reference": what it was compared with, "inputs": what it ran on} or {"skipped": why}}.

    Raises:
      stablehlo.ExportError: --model with --format hf, or an export that does not reproduce
        its model.
      hf.CheckpointError: the same for a Hugging Face directory.
    """
    if model_dir is not None:
        if fmt == "hf":
            raise stablehlo.ExportError(f"{model_dir} is already a saved model; --model exports "
                                        "to --format stablehlo (--format hf exports a run's "
                                        "checkpoint: --workdir)")
        source = pathlib.Path(model_dir)
        model, names, tokenizer, config = _saved_model(source)
        out_dir = pathlib.Path(out) if out else source.parent / f"{source.name}-stablehlo"
    else:
        source = pathlib.Path(workdir)
        model, names, tokenizer, config, step = _run_checkpoint(source, step)
        suffix = "" if fmt == "hf" else "-stablehlo"
        out_dir = pathlib.Path(out) if out else source / f"export-{step}{suffix}"

    if fmt == "hf":
        hf.save_pretrained(model, out_dir, label_names=names, tokenizer=tokenizer)
    else:
        stablehlo.export_classifier(model, out_dir, label_names=names, tokenizer=tokenizer)
    result = {"out": str(out_dir), "step": step}
    if not check:
        result["check"] = {"skipped": "--no-check"}
        return result

    texts_a, texts_b, inputs = dev_texts((config or {}).get("data"))
    if fmt == "hf":
        difference = hf.check_with_transformers(model, out_dir, texts_a, texts_b)
        if difference is None:
            result["check"] = {"skipped": "torch is not installed, so transformers' PyTorch "
                                          "model could not be loaded"}
        else:
            result["check"] = {"max_abs_difference": difference, "tolerance":
                               hf.EXPORT_TOLERANCE, "inputs": inputs, "reference":
                               "transformers AutoModelForSequenceClassification (PyTorch)"}
        return result
    batch = tokenizer(texts_a or list(hf.CHECK_SENTENCES), texts_b, padding=True,
                      truncation=True, return_tensors="np",
                      max_length=min(getattr(model.config, "max_position_embeddings", 512), 512))
    batch.setdefault("token_type_ids", np.zeros_like(batch["input_ids"]))
    difference = stablehlo.check_artifact(model, out_dir, batch)
    result["check"] = {"max_abs_difference": difference, "tolerance": stablehlo.CHECK_TOLERANCE,
                       "inputs": inputs, "reference": "the kdjax model it was exported from"}
    return result


def describe(result: dict) -> str:
    """The lines `kdjax export` prints."""
    lines = [f"wrote {result['out']}" + (f" (step {result['step']})" if result["step"] is not None
                                         else "")]
    check = result["check"]
    if "skipped" in check:
        lines.append(f"check skipped: {check['skipped']}")
    else:
        lines.append(f"check passed: max |logit difference| {check['max_abs_difference']:.2e} "
                     f"<= {check['tolerance']:g} against {check['reference']} on "
                     f"{check['inputs']}")
    return "\n".join(lines)

"""Checkpoints a new user brings: sharded safetensors, gelu_python, heads that are not a sentence
classifier. Each against transformers' PyTorch model built and saved by transformers itself."""

import json

import numpy as np
import pytest
import torch
import transformers

from kdjax import hf


def _tiny_config(**changes):
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=40, num_labels=3)
    values.update(changes)
    return transformers.BertConfig(**values)


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # Padding in one row.
    types = np.zeros_like(ids)
    types[2, 5:] = 1  # A sentence pair in another.
    return ids, mask, types


def _max_logit_difference(model, reference):
    ids, mask, types = _inputs()
    with torch.no_grad():
        theirs = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           token_type_ids=torch.from_numpy(types)).logits.numpy()
    ours = np.asarray(model(ids.astype(np.int32), mask.astype(np.int32),
                            types.astype(np.int32)).logits)
    return float(np.max(np.abs(ours - theirs)))


def test_sharded_safetensors_are_read(tmp_path):
    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification(_tiny_config()).eval()
    reference.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    shards = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())[
        "weight_map"].values())
    assert len(shards) > 2  # Really split.
    model, report, _ = hf.load_pretrained(str(tmp_path))
    assert report.unused == [] and report.newly_initialized == []
    assert _max_logit_difference(model, reference) <= 1e-5


def test_a_missing_shard_is_named(tmp_path):
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_tiny_config()).save_pretrained(
        tmp_path, max_shard_size="30KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(hf.CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        hf.load_pretrained(str(tmp_path))


def test_gelu_python_is_the_exact_gelu(tmp_path):
    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification(
        _tiny_config(hidden_act="gelu_python")).eval()
    reference.save_pretrained(tmp_path)
    model, _, _ = hf.load_pretrained(str(tmp_path))
    assert model.config.hidden_act == "gelu_python"
    assert _max_logit_difference(model, reference) <= 1e-5
    # Saved back, transformers reads the same activation.
    hf.save_pretrained(model, tmp_path / "again")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "again").hidden_act == "gelu_python"


@pytest.mark.parametrize("head, what", [
    (transformers.BertForTokenClassification, "a token classifier (one label per token)"),
    (transformers.BertForMultipleChoice, "a multiple-choice scorer"),
    (transformers.BertForQuestionAnswering, "a span (question answering) predictor"),
])
def test_other_task_heads_are_refused_in_one_line(tmp_path, head, what):
    torch.manual_seed(0)
    head(_tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointError) as error:
        hf.load_pretrained(str(tmp_path), num_labels=2)
    message = str(error.value)
    assert f"architecture {head.__name__} is {what}, not a sequence classifier" in message
    assert "\n" not in message

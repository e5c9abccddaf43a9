"""The Flax BERT against transformers' PyTorch implementation (the independent reference)."""

import csv

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kdjax import hf

TOL = 1e-4


def _sst2_batch(sst2_dir, tokenizer, n=16):
    with open(sst2_dir / "dev.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    # Mixed lengths so that most rows carry padding.
    sentences = [rows[i][0] for i in range(0, 8 * n, 8)]
    return tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="np")


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _assert_encoder_matches(ours, theirs, mask):
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    worst = 0.0
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        worst = max(worst, _max_abs(a, b.numpy()))
    for a, b in zip(ours.attention_probs, theirs.attentions):
        worst = max(worst, _max_abs(a, b.numpy()))
    assert worst <= TOL, f"max |delta| {worst:.3g} > {TOL}"
    assert _max_abs(ours.pooled, theirs.pooler_output.numpy()) <= TOL
    return worst


def test_minilm_matches_transformers_on_padded_sst2(minilm_dir, sst2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = _sst2_batch(sst2_dir, tokenizer)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    ref = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(**{k: torch.from_numpy(v) for k, v in batch.items()},
                     output_hidden_states=True, output_attentions=True)
    model, report, _ = hf.load_pretrained(str(minilm_dir), num_labels=2)
    assert report.unused == []  # MiniLM has exactly a BertModel (pooler included).
    assert report.newly_initialized == ["classifier.weight", "classifier.bias"]
    ours = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                 jnp.asarray(batch["token_type_ids"]),
                 output_hidden_states=True, output_attentions=True)
    worst = _assert_encoder_matches(ours, theirs, batch["attention_mask"])
    print(f"MiniLM parity: max |delta| over hidden states and attention probs = {worst:.2e}")
    # Padded keys get exactly zero attention.
    probs = np.asarray(ours.attention_probs[0])
    assert np.all(probs[np.broadcast_to(batch["attention_mask"][:, None, None, :] == 0,
                                        probs.shape)] == 0)


def test_minilm_round_trip_to_pytorch_classifier(minilm_dir, sst2_dir, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = _sst2_batch(sst2_dir, tokenizer)
    model, _, _ = hf.load_pretrained(str(minilm_dir), num_labels=2, seed=3)
    out_dir = hf.save_pretrained(model, tmp_path / "export", label_names=["negative", "positive"],
                                 tokenizer=tokenizer)
    ref, info = transformers.BertForSequenceClassification.from_pretrained(
        out_dir, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert ref.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        theirs = ref.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    ours = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                 jnp.asarray(batch["token_type_ids"])).logits
    assert np.abs(theirs).max() > 1e-3  # A non-trivial classifier, so the check means something.
    assert _max_abs(ours, theirs) <= TOL
    # The tokenizer travelled with it.
    assert transformers.AutoTokenizer.from_pretrained(out_dir)("a b").input_ids == \
        tokenizer("a b").input_ids


def test_tiny_transformers_model_loads_and_agrees(tiny_hf_dir, tmp_path):
    ref = transformers.BertForSequenceClassification.from_pretrained(
        tiny_hf_dir, attn_implementation="eager").eval()
    model, report, _ = hf.load_pretrained(str(tiny_hf_dir))
    assert model.num_labels == 3 and report.label_names == ["neg", "neu", "pos"]
    assert report.unused == [] and report.newly_initialized == []
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = np.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types),
                     output_hidden_states=True, output_attentions=True)
        base = ref.bert(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))
    ours = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types),
                 output_hidden_states=True, output_attentions=True)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert _max_abs(a, b.numpy()) <= TOL
    for a, b in zip(ours.attention_probs, theirs.attentions):
        assert _max_abs(a, b.numpy()) <= TOL
    assert _max_abs(ours.pooled, base.pooler_output.numpy()) <= TOL
    assert _max_abs(ours.logits, theirs.logits.numpy()) <= TOL

    # And back again: our export loads in PyTorch with the same logits.
    out_dir = hf.save_pretrained(model, tmp_path / "again", label_names=report.label_names)
    again = transformers.BertForSequenceClassification.from_pretrained(out_dir).eval()
    with torch.no_grad():
        logits = again(torch.from_numpy(ids), torch.from_numpy(mask),
                       torch.from_numpy(types)).logits.numpy()
    assert _max_abs(ours.logits, logits) <= TOL


def test_mlm_head_matches_transformers(tmp_path, minilm_dir):
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    ref = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # A non-zero decoder bias so the bias mapping is tested.
        ref.cls.predictions.bias.normal_()
    ref.save_pretrained(tmp_path / "mlm")
    model, report, _ = hf.load_pretrained(str(tmp_path / "mlm"), num_labels=2, mlm_head=True)
    ids = np.random.default_rng(0).integers(0, 120, size=(2, 7))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids)).logits.numpy()
    ours = model(jnp.asarray(ids), mlm=True).mlm_logits
    assert _max_abs(ours, theirs) <= TOL


@pytest.mark.parametrize("problem", ["missing", "shape", "arch"])
def test_bad_checkpoints_are_refused_with_a_clear_message(tiny_hf_dir, tmp_path, problem):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "bert.encoder.layer.1.attention.self.key.weight"
    if problem == "missing":
        del tensors[name]
        expected = f"tensor '{name}' is missing"
    elif problem == "shape":
        tensors[name] = np.zeros((32, 31), np.float32)
        expected = f"tensor '{name}' has shape (32, 31), expected (32, 32)"
    else:
        config = json.loads((bad / "config.json").read_text())
        config["model_type"] = "roberta"
        (bad / "config.json").write_text(json.dumps(config))
        expected = "model_type 'roberta' is not supported"
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        hf.load_pretrained(str(bad))


def test_no_mlm_head_in_checkpoint_is_refused(minilm_dir):
    with pytest.raises(hf.CheckpointError, match="has no MLM head"):
        hf.load_pretrained(str(minilm_dir), num_labels=2, mlm_head=True)

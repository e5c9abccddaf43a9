"""Distilled BiLSTM with TinyBERT's augmentation instead of Tang's: every alphabetic non-stopword
word has K = 15 candidates, its nearest neighbours (cosine) in the teacher's word-piece embedding
table (all-MiniLM-L6-v2 ships no MLM head for TinyBERT's single-piece candidates); each of
N_a = 20 copies replaces each such word with probability p_t = 0.4. Same student, loss and
optimizer as configs/bilstm.py; the same 200,000-example cap.

  kdjax distill --config configs/bilstm_tinybert_aug.py --workdir runs/bilstm-tinybert-aug
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.bilstm_config("tinybert")
    config.recipe = "bilstm_tinybert_aug"
    return config

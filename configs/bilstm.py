"""Distilled BiLSTM (Tang et al. 2019) with Tang's augmentation: the fine-tuned MiniLM teacher
labels the SST-2 training set plus augmented copies (masking p_mask = 0.1, POS-guided
replacement p_pos = 0.1, n-gram sampling p_ng = 0.25; n_iter = 20 copies per sentence, capped at
augment.max_examples = 200,000 new examples) once; a one-layer BiLSTM (150 per direction, MLP
200, embeddings copied from the teacher's word pieces) learns 0.5 CE + 0.5 logit MSE with
Adadelta (lr 1.0, rho 0.95), batch 50.

POS tags come from spaCy's English tagger: pip install 'kdjax[augment]'.

  kdjax distill --config configs/bilstm.py --workdir runs/bilstm
  kdjax distill --config configs/bilstm.py --workdir runs/bilstm --config.augment.max_examples=0
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.bilstm_config("tang")
    config.recipe = "bilstm"
    return config

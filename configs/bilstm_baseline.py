"""The plain BiLSTM of Tang et al.'s comparison: the same student (embeddings copied from the
fine-tuned teacher), trained with cross-entropy on the labelled SST-2 training set only, no
teacher terms, no augmentation. The teacher is still fine-tuned (or reused, with
teacher.name=DIR) so eval.json reports its accuracy and speed beside the student's.

  kdjax distill --config configs/bilstm_baseline.py --workdir runs/bilstm-baseline
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.bilstm_config("none", teacher_terms=False)
    config.recipe = "bilstm_baseline"
    return config

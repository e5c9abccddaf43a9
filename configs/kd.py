"""Hinton soft-target KD (Hinton et al. 2015): alpha * T^2 KL(teacher || student) + (1 - alpha) CE.

alpha = 0.5, T = 2 (the peer measurement quoted in the README); the student copies the
fine-tuned teacher's layers spread evenly (0, 2, 5 of 6) in the half_depth and few_labels
settings. The variant after the colon picks the setting: half_depth (default), tenth_size,
few_labels.

  kdjax distill --config configs/kd.py --workdir runs/kd
  kdjax distill --config configs/kd.py:tenth_size --config.distill.loss.temperature=4 ...
"""

from kdjax import recipes


def get_config(arg=None):
    return recipes.kd_config(arg)

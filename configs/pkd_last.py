"""Patient KD, PKD-Last (Sun et al. 2019): (1 - alpha) CE + alpha T^2 KL + beta L_PT.

L_PT compares normalised [CLS] vectors of the student's intermediate layers with the teacher's
last layers (6 -> 3: teacher layers 4, 5). Settings in `kdjax.recipes.pkd_config`.

  kdjax distill --config configs/pkd_last.py[:tenth_size|:few_labels] --workdir runs/pkd_last
"""

from kdjax import recipes


def get_config(arg=None):
    return recipes.pkd_config(arg, layer_map="last")

"""Patient KD, PKD-Last (Sun et al. 2019): (1 - alpha) CE + alpha T^2 KL + beta L_PT.

L_PT is the mean squared distance of L2-normalised [CLS] vectors between the student's
intermediate layers and the teacher's last layers (6 -> 3: teacher layers 4, 5).
alpha = 0.5, T = 5, beta = 100 (from the paper's grid); the student starts from the teacher's
first layers (0, 1, 2) where widths allow.

  kdjax distill --config configs/pkd_last.py[:tenth_size|:few_labels] --workdir runs/pkd_last
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.distill_config(arg)
    config.recipe = "pkd_last"
    config.student.init_layers = "first"
    alpha = 0.5
    config.distill.loss.ce = 1 - alpha
    config.distill.loss.soft = alpha
    config.distill.loss.temperature = 5.0
    config.distill.loss.pkd = 100.0
    config.distill.loss.layer_map = "last"
    return config

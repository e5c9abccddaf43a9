"""Multi-teacher KD: Hinton soft targets averaged over three teachers fine-tuned with different
seeds (TextBrewer's multi-teacher mode), alpha = 0.5, T = 2 as in configs/kd.py.

The teachers are fine-tuned into WORKDIR/teacher-seed0, -seed1, -seed2 (once each) when
teacher.name is a pretrained checkpoint; fine-tuned teachers can be given instead with
teacher.name=DIR and teacher.extra=(DIR2,DIR3). eval.json reports each teacher's dev accuracy
(teacher_accuracies), the best of them, and the ensemble's (teacher_accuracy).

  kdjax distill --config configs/kd_ensemble.py:few_labels --workdir runs/kd_ensemble
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.distill_config(arg)
    config.recipe = "kd_ensemble"
    config.teacher.seeds = (0, 1, 2)
    alpha = 0.5
    config.distill.loss.soft = alpha
    config.distill.loss.ce = 1 - alpha
    config.distill.loss.temperature = 2.0
    return config

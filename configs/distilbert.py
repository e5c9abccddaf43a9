"""DistilBERT (Sanh et al. 2019), task distillation: 5 * T^2 KL on the task logits + 2 * MLM
cross-entropy on dynamically masked input (15 %, 80/10/10) + 1 * (1 - cos) on last-layer hidden
states, T = 2 (the released model's weights). The student copies teacher layers spread evenly
(DistilBERT's [0, 2, 4, 7, 9, 11] of 12; here 0, 2, 5 of 6); teacher and student both see the
masked input.

all-MiniLM-L6-v2 ships no MLM head, so the student's head starts from random init
(student.mlm_head_init=random) and is learned by the MLM term; with a teacher that has a head,
set student.mlm_head_init=teacher to copy it, or run without the term with
--config.distill.loss.mlm=0. The cosine term needs equal widths: tenth_size is refused.

  kdjax distill --config configs/distilbert.py[:few_labels] --workdir runs/distilbert
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.distill_config(arg)
    config.recipe = "distilbert"
    config.student.mlm_head_init = "random"
    config.distill.loss.soft = 5.0
    config.distill.loss.mlm = 2.0
    config.distill.loss.cosine = 1.0
    config.distill.loss.temperature = 2.0
    return config

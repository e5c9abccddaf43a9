"""MiniLM (Wang et al. 2020): the student's last layer learns the teacher's last-layer attention
distributions and value relations (KL each, per head), then the task logits: a first stage of
the two MiniLM terms alone (task-agnostic in the paper, here on the task's training sentences),
then Hinton KD as configs/kd.py. Student and teacher need equal head counts (12 and 12 in every
setting here); MiniLMv2 (configs/minilm_v2.py) does not.

  kdjax distill --config configs/minilm.py[:tenth_size|:few_labels] --workdir runs/minilm
"""

from kdjax import recipes


def get_config(arg=None):
    alpha = 0.5
    config = recipes.distill_config(arg, stages={
        "relations": recipes.stage_config(minilm_attention=1.0, minilm_value=1.0),
        "distill": recipes.stage_config(soft=alpha, ce=1 - alpha, temperature=2.0),
    })
    config.recipe = "minilm"
    return config

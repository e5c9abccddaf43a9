"""MiniLMv2 (Wang et al. 2021): the student's last layer learns the Q-Q, K-K and V-V
self-attention relations of a teacher layer, split into relation heads (so student and teacher
may differ in width and head count), then the task logits: a relations stage, then Hinton KD as
configs/kd.py. With the 6-layer MiniLM teacher (small) the teacher layer is its last, as the
paper does for small teachers; 12 relation heads divide 384 and 168, so every setting runs.

  kdjax distill --config configs/minilm_v2.py[:tenth_size|:few_labels] --workdir runs/minilm_v2
  kdjax distill --config configs/minilm_v2.py --config.relations.loss.minilm_v2_heads=24 ...
"""

from kdjax import recipes


def get_config(arg=None):
    alpha = 0.5
    config = recipes.distill_config(arg, stages={
        "relations": recipes.stage_config(minilm_v2=1.0, minilm_v2_heads=12),
        "distill": recipes.stage_config(soft=alpha, ce=1 - alpha, temperature=2.0),
    })
    config.recipe = "minilm_v2"
    return config

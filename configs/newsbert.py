"""NewsBERT (Wu et al. 2021): teacher and student trained jointly, sharing the pooler and the
classifier, with momentum distillation (kdjax/methods/newsbert.py, METHODS.md section 7).

The teacher starts from the pretrained teacher.name and is fine-tuned by the joint training
itself (no separate teacher run); the student copies its first layers (3 of 6 for MiniLM, so
K = 2: student layer k learns from teacher layers 2k-1 and 2k). Teacher loss: CE. Student loss:
embedding MSE + hidden MSE (H_t[iK] vs H_s[i]) + pooled MSE + soft CE at temperature t + CE.
Momentum distillation: g_s_k <- beta * mean(g_t over block k) + (1 - beta) * g_s_k.

Settings: half_depth (default) and few_labels. tenth_size is refused at run time: sharing the
pooler and mixing layer gradients need the teacher's width (no projections are implemented).

  kdjax distill --config configs/newsbert.py --workdir runs/newsbert
  kdjax distill --config configs/newsbert.py:few_labels --config.newsbert.beta=0.3 --workdir ...

Outputs: model/ (student) and teacher_model/ (the jointly fine-tuned teacher), eval.json.
"""

from kdjax import recipes


def get_config(arg=None):
    return recipes.newsbert_config(arg)

"""The control: the same student as every recipe, trained on hard labels only, no teacher terms.

The teacher is still fine-tuned when the setting initialises the student from its layers (the
"same init" of the comparison). In few_labels it trains on the 1,000 labelled examples only, for
as many epochs as the teacher, since unlabelled examples teach nothing without a teacher.

  kdjax distill --config configs/baseline.py[:tenth_size|:few_labels] --workdir runs/baseline
"""

from kdjax import recipes


def get_config(arg=None):
    config = recipes.distill_config(arg)
    config.recipe = "baseline"
    config.distill.loss.ce = 1.0
    if config.setting == "few_labels":
        config.distill.epochs = config.teacher.epochs
    return config

"""TinyBERT (Jiao et al. 2020): embedding + attention + hidden losses through a learned
projection, then the prediction loss, in two stages.

1. general: the pretrained (not fine-tuned) teacher on unlabelled text: every training sentence
   with its label dropped, or data.unlabelled_file (one sentence per line) for a larger corpus.
2. task distillation with the fine-tuned teacher: `intermediate` (embedding + attention scores +
   hidden states, uniform layer map m <-> 2m) then `prediction` (soft cross-entropy, t = 1).

TinyBERT's data augmentation belongs to the BiLSTM/augmentation issue; here the task stages see
the training set as it is.

  kdjax distill --config configs/tinybert.py:tenth_size --workdir runs/tinybert
"""

from kdjax import recipes


def get_config(arg=None):
    intermediate_terms = dict(embedding=1.0, attention=1.0, hidden=1.0, layer_map="uniform")
    config = recipes.distill_config(arg, stages={
        "general": recipes.stage_config(teacher="pretrained", data="unlabelled",
                                        **intermediate_terms),
        "intermediate": recipes.stage_config(**intermediate_terms),
        "prediction": recipes.stage_config(soft_ce=1.0, temperature=1.0),
    })
    config.recipe = "tinybert"
    return config

"""kdjax: knowledge distillation of BERT-family models in JAX/Flax NNX."""

import os

# kdjax uses transformers for tokenizers, configs and checkpoint files only, never its PyTorch
# models; without this, importing transformers where torch is absent prints "PyTorch was not
# found ..." on every command. Advice-level messages only: real warnings still show.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

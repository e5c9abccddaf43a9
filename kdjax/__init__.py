"""kdjax: knowledge distillation of BERT-family models in JAX/Flax NNX."""

__version__ = "0.1.0"

"""BERT encoder in Flax NNX, numerically equivalent to Hugging Face's `BertModel`.

Parameter names follow the Hugging Face layout closely (see `kdjax.hf` for the explicit key map),
parameters are float32 and computation runs in `BertConfig.dtype` (float32 by default, bfloat16 as
an option). LayerNorm statistics and the attention softmax always run in float32.

The forward pass returns only what is asked for: hidden states of every layer (embedding output
first), pre-softmax attention scores and attention probabilities, pooled output, classifier and MLM
logits, and each layer's query, key and value projections (MiniLM's relations). Distillation
losses need all of them; a plain forward pass pays for none.

Dropout takes an explicit PRNG key (`dropout_key`); `dropout_key=None` means deterministic, which is
how a frozen teacher is always run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form.
    # transformers' pure-Python implementation of the same exact erf GELU.
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (the subset of HF `BertConfig` that changes the math)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    # Computation dtype; parameters stay float32.
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class BertOutput:
    """What a forward pass returns; fields not requested are None.

    Attributes:
      last_hidden_state: [B, L, H] output of the last layer.
      pooled: [B, H] tanh(dense([CLS])), when the model has a pooler.
      logits: [B, num_labels] classifier logits (float32), for `BertClassifier`.
      mlm_logits: [B, L, vocab] masked-LM logits (float32), when asked for with `mlm=True`.
      hidden_states: tuple of num_layers + 1 arrays [B, L, H]; index 0 is the embedding output.
      attention_scores: tuple of num_layers arrays [B, heads, L, L]: scaled q·k before the mask and
        softmax (float32). Padded key positions hold real numbers; losses mask them.
      attention_probs: tuple of num_layers arrays [B, heads, L, L]: softmax probabilities with
        padded keys at exactly zero (float32, before dropout).
      queries, keys, values: tuples of num_layers arrays [B, L, H]: each layer's query, key and
        value projections before they are split into heads (compute dtype, biases included).
    """

    last_hidden_state: jax.Array
    pooled: jax.Array | None = None
    logits: jax.Array | None = None
    mlm_logits: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attention_scores: tuple[jax.Array, ...] | None = None
    attention_probs: tuple[jax.Array, ...] | None = None
    queries: tuple[jax.Array, ...] | None = None
    keys: tuple[jax.Array, ...] | None = None
    values: tuple[jax.Array, ...] | None = None


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (deterministic) or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _sub_key(key: jax.Array | None, index: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, index)


def _normal(config: BertConfig):
    return nnx.initializers.normal(stddev=config.initializer_range)


def _linear(config: BertConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=config.compute_dtype, kernel_init=_normal(config),
                      rngs=rngs)


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance (use_fast_variance=False) matches PyTorch to float32 rounding.
    # dtype float32: normalisation statistics stay in full precision under bfloat16 compute.
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


class BertEmbeddings(nnx.Module):

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        make = lambda n: nnx.Embed(n, config.hidden_size, dtype=jnp.float32,
                                   embedding_init=_normal(config), rngs=rngs)
        self.word_embeddings = make(config.vocab_size)
        self.position_embeddings = make(config.max_position_embeddings)
        self.token_type_embeddings = make(config.type_vocab_size)
        self.layer_norm = _layer_norm(config, rngs)

    def __call__(self, input_ids, token_type_ids, dropout_key):
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings.embedding[...][None, :seq_len]
             + self.token_type_embeddings(token_type_ids))
        x = self.layer_norm(x).astype(self.config.compute_dtype)
        return dropout(x, self.config.hidden_dropout_prob, dropout_key)


class BertSelfAttention(nnx.Module):
    """Multi-head self-attention plus the output projection and residual LayerNorm."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        h = config.hidden_size
        self.query = _linear(config, h, h, rngs)
        self.key = _linear(config, h, h, rngs)
        self.value = _linear(config, h, h, rngs)
        self.output = _linear(config, h, h, rngs)
        self.layer_norm = _layer_norm(config, rngs)

    def __call__(self, x, attention_mask, dropout_key):
        cfg = self.config
        batch, seq_len, _ = x.shape
        split_heads = lambda t: t.reshape(batch, seq_len, cfg.num_attention_heads, cfg.head_dim)
        qkv = self.query(x), self.key(x), self.value(x)
        q, k, v = map(split_heads, qkv)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim)  # [B, heads, L, L]
        key_is_real = attention_mask[:, None, None, :].astype(bool)
        probs = jax.nn.softmax(jnp.where(key_is_real, scores, jnp.finfo(jnp.float32).min), axis=-1)
        dropped = dropout(probs, cfg.attention_probs_dropout_prob, _sub_key(dropout_key, 0))
        context = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(cfg.compute_dtype), v)
        context = context.reshape(batch, seq_len, cfg.hidden_size)
        out = dropout(self.output(context), cfg.hidden_dropout_prob, _sub_key(dropout_key, 1))
        out = self.layer_norm(out + x).astype(cfg.compute_dtype)
        return out, scores, probs, qkv


class BertLayer(nnx.Module):

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.attention = BertSelfAttention(config, rngs=rngs)
        self.intermediate = _linear(config, config.hidden_size, config.intermediate_size, rngs)
        self.output = _linear(config, config.intermediate_size, config.hidden_size, rngs)
        self.layer_norm = _layer_norm(config, rngs)

    def __call__(self, x, attention_mask, dropout_key):
        cfg = self.config
        x, scores, probs, qkv = self.attention(x, attention_mask, _sub_key(dropout_key, 0))
        y = self.output(ACTIVATIONS[cfg.hidden_act](self.intermediate(x)))
        y = dropout(y, cfg.hidden_dropout_prob, _sub_key(dropout_key, 1))
        return self.layer_norm(y + x).astype(cfg.compute_dtype), scores, probs, qkv


class BertPooler(nnx.Module):

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.hidden_size, rngs)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertMLMHead(nnx.Module):
    """HF `BertOnlyMLMHead`: transform (dense, act, LayerNorm), decoder tied to word embeddings."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dense = _linear(config, config.hidden_size, config.hidden_size, rngs)
        self.layer_norm = _layer_norm(config, rngs)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32))

    def __call__(self, hidden, word_embeddings: jax.Array):
        x = self.layer_norm(ACTIVATIONS[self.config.hidden_act](self.dense(hidden)))
        dt = self.config.compute_dtype
        logits = jnp.einsum("blh,vh->blv", x.astype(dt), word_embeddings.astype(dt))
        return logits.astype(jnp.float32) + self.bias[...]


class BertModel(nnx.Module):
    """Embeddings, `num_hidden_layers` encoder layers and an optional pooler."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, add_pooler: bool = True):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.pooler = BertPooler(config, rngs=rngs) if add_pooler else None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 dropout_key: jax.Array | None = None, output_hidden_states: bool = False,
                 output_attentions: bool = False, output_qkv: bool = False) -> BertOutput:
        """Encodes a batch.

        Args:
          input_ids: [B, L] int token ids.
          attention_mask: [B, L], 1 for real tokens and 0 for padding; all ones when None.
          token_type_ids: [B, L] segment ids; zeros when None.
          dropout_key: PRNG key enabling dropout; None runs deterministically.
          output_hidden_states: also return every layer's hidden states.
          output_attentions: also return pre-softmax scores and attention probabilities.
          output_qkv: also return every layer's query, key and value projections.

        Returns:
          A `BertOutput` (logits and mlm_logits are None at this level).
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, _sub_key(dropout_key, 0))
        hidden_states, scores, probs, qkv = [x], [], [], []
        for i, layer in enumerate(self.layers):
            x, layer_scores, layer_probs, layer_qkv = layer(x, attention_mask,
                                                            _sub_key(dropout_key, i + 1))
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                scores.append(layer_scores)
                probs.append(layer_probs)
            if output_qkv:
                qkv.append(layer_qkv)
        queries, keys, values = (tuple(t) for t in zip(*qkv)) if output_qkv else (None,) * 3
        return BertOutput(
            last_hidden_state=x,
            pooled=None if self.pooler is None else self.pooler(x),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attention_scores=tuple(scores) if output_attentions else None,
            attention_probs=tuple(probs) if output_attentions else None,
            queries=queries, keys=keys, values=values,
        )


class BertClassifier(nnx.Module):
    """HF `BertForSequenceClassification`, optionally with the MLM head of `BertForPreTraining`."""

    def __init__(self, config: BertConfig, num_labels: int, *, rngs: nnx.Rngs,
                 mlm_head: bool = False):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config, rngs=rngs, add_pooler=True)
        self.classifier = _linear(config, config.hidden_size, num_labels, rngs)
        self.mlm = BertMLMHead(config, rngs=rngs) if mlm_head else None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 dropout_key: jax.Array | None = None, output_hidden_states: bool = False,
                 output_attentions: bool = False, output_qkv: bool = False,
                 mlm: bool = False) -> BertOutput:
        """Like `BertModel.__call__`, plus float32 `logits` and, with `mlm=True`, `mlm_logits`."""
        out = self.bert(input_ids, attention_mask, token_type_ids,
                        dropout_key=_sub_key(dropout_key, 0),
                        output_hidden_states=output_hidden_states,
                        output_attentions=output_attentions, output_qkv=output_qkv)
        rate = self.config.classifier_dropout
        rate = self.config.hidden_dropout_prob if rate is None else rate
        pooled = dropout(out.pooled, rate, _sub_key(dropout_key, 1))
        logits = self.classifier(pooled).astype(jnp.float32)
        mlm_logits = None
        if mlm:
            if self.mlm is None:
                raise ValueError("mlm=True but this model has no MLM head")
            mlm_logits = self.mlm(out.last_hidden_state,
                                  self.bert.embeddings.word_embeddings.embedding[...])
        return out.replace(logits=logits, mlm_logits=mlm_logits)


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree."""
    return sum(x.size for x in jax.tree.leaves(tree))

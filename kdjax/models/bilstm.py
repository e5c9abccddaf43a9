"""The distilled-BiLSTM student of Tang et al. (2019) in Flax NNX.

word-piece embeddings -> one bidirectional LSTM layer -> [final forward state ; final backward
state] -> ReLU MLP -> logits. Sentence pairs share the encoder and classify
`[h1, h2, h1 * h2, |h1 - h2|]`.

The model reads the batches of the BERT data pipeline (`input_ids`, `attention_mask`,
`token_type_ids` from `kdjax.data`), so the teacher's WordPiece tokenizer, length buckets and
sharding are reused as they are. Only word pieces feed the LSTM: [CLS], [SEP] and padding are
masked out, and a masked step leaves the LSTM state unchanged. Hence the final states depend only
on the real tokens (appending padding changes nothing), and a pair's two segments are encoded
separately even though they sit in one row.

The LSTM follows PyTorch's gate layout (input, forget, cell, output; h' = o * tanh(c')), which
the tests check against `torch.nn.LSTM`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.models.bert import dropout


@dataclasses.dataclass(frozen=True)
class BiLSTMConfig:
    """Architecture of the BiLSTM student (Tang et al.: hidden 150, MLP 200 on SST-2)."""

    vocab_size: int = 30522
    embedding_dim: int = 384
    hidden_size: int = 150
    mlp_size: int = 200
    num_labels: int = 2
    pair: bool = False  # Sentence pairs: shared encoder, [h1, h2, h1*h2, |h1-h2|].
    dropout: float = 0.1  # On the embeddings and the MLP's input and hidden layer.
    # Token ids that never reach the LSTM (besides padding, which the attention mask removes).
    skip_token_ids: tuple[int, ...] = (0, 101, 102)
    label_names: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "embedding_dim", "hidden_size", "mlp_size", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"BiLSTMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"BiLSTMConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_labels} labels")

    @property
    def feature_size(self) -> int:
        return 2 * self.hidden_size * (4 if self.pair else 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BiLSTMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in values.items() if k in known}
        return cls(**values)


@flax.struct.dataclass
class BiLSTMOutput:
    """What the forward pass returns. The BERT-only fields stay None so that
    `kdjax.distill.combined_loss` (which reads them only for BERT terms) accepts it."""

    logits: jax.Array  # [B, num_labels] float32
    features: jax.Array  # [B, feature_size]: the MLP's input
    last_hidden_state: None = None
    hidden_states: None = None
    attention_scores: None = None
    attention_probs: None = None


class MaskedBiLSTM(nnx.Module):
    """One bidirectional LSTM layer whose final states ignore masked positions.

    Both directions run in one `lax.scan` (the backward one over the reversed sequence), with
    their weights stacked on a leading axis of 2. At a masked step the carry is kept, so any
    mask works, including a pair's second segment in the middle of a row.
    """

    def __init__(self, input_size: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.hidden_size = hidden_size
        gates = 4 * hidden_size
        lecun = nnx.initializers.lecun_normal()
        orthogonal = nnx.initializers.orthogonal()
        self.input_kernel = nnx.Param(jnp.stack(
            [lecun(rngs.params(), (input_size, gates)) for _ in range(2)]))  # [2, E, 4H]
        self.recurrent_kernel = nnx.Param(jnp.stack(
            [orthogonal(rngs.params(), (hidden_size, gates)) for _ in range(2)]))  # [2, H, 4H]
        # Forget-gate bias 1: the usual LSTM init, so early gradients flow through time.
        bias = jnp.zeros((2, gates)).at[:, hidden_size:2 * hidden_size].set(1.0)
        self.bias = nnx.Param(bias)  # [2, 4H]

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Final states of both directions.

        Args:
          x: [B, L, E] inputs.
          mask: [B, L], True where a token is read.

        Returns:
          [B, 2H]: the forward direction's state after the last read token, then the backward
          direction's state after the first (zeros for a row with nothing to read).
        """
        batch = x.shape[0]
        h_size = self.hidden_size
        w_in, w_rec = self.input_kernel[...], self.recurrent_kernel[...]
        # All input projections at once, outside the sequential scan: [2, B, L, 4H].
        projected = jnp.einsum("ble,deg->dblg", x.astype(jnp.float32), w_in)
        projected = projected + self.bias[...][:, None, None, :]
        projected = jnp.stack([projected[0], projected[1][:, ::-1]])  # Backward reads reversed.
        read = mask.astype(bool)
        read = jnp.stack([read, read[:, ::-1]])  # [2, B, L]
        time_major = (jnp.moveaxis(projected, 2, 0), jnp.moveaxis(read, 2, 0))

        def step(carry, inputs):
            h, c = carry  # [2, B, H] each
            gates_in, read_t = inputs  # [2, B, 4H], [2, B]
            gates = gates_in + jnp.einsum("dbh,dhg->dbg", h, w_rec)
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
            keep = read_t[..., None]
            return (jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)), None

        zeros = jnp.zeros((2, batch, h_size), jnp.float32)
        (h, _), _ = jax.lax.scan(step, (zeros, zeros), time_major)
        return jnp.concatenate([h[0], h[1]], axis=-1)


class BiLSTMClassifier(nnx.Module):
    """Tang et al.'s student: embeddings, masked BiLSTM, ReLU MLP, logits."""

    def __init__(self, config: BiLSTMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.embedding_dim,
                               embedding_init=nnx.initializers.normal(0.1), rngs=rngs)
        self.encoder = MaskedBiLSTM(config.embedding_dim, config.hidden_size, rngs=rngs)
        self.hidden = nnx.Linear(config.feature_size, config.mlp_size, rngs=rngs)
        self.classifier = nnx.Linear(config.mlp_size, config.num_labels, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 dropout_key: jax.Array | None = None) -> BiLSTMOutput:
        """Classifies a batch laid out like BERT's input.

        Args:
          input_ids: [B, L] word-piece ids.
          attention_mask: [B, L], 1 for real tokens; all ones when None.
          token_type_ids: [B, L] segment ids (pairs: 0 first sentence, 1 second).
          dropout_key: PRNG key enabling dropout; None runs deterministically.

        Returns:
          A `BiLSTMOutput` with float32 logits.
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        words = attention_mask.astype(bool) & ~jnp.isin(input_ids,
                                                        jnp.asarray(cfg.skip_token_ids))
        x = dropout(self.embed(input_ids), cfg.dropout, keys[0])  # [B, L, E]
        if cfg.pair:
            # One encoder call over both segments: [2B, L, E] with each segment's mask.
            both = self.encoder(jnp.concatenate([x, x]),
                                jnp.concatenate([words & (token_type_ids == 0),
                                                 words & (token_type_ids == 1)]))
            h1, h2 = jnp.split(both, 2)
            features = jnp.concatenate([h1, h2, h1 * h2, jnp.abs(h1 - h2)], axis=-1)
        else:
            features = self.encoder(x, words)  # [B, 2H]
        hidden = jax.nn.relu(self.hidden(dropout(features, cfg.dropout, keys[1])))
        logits = self.classifier(dropout(hidden, cfg.dropout, keys[2]))
        return BiLSTMOutput(logits=logits.astype(jnp.float32), features=features)


def non_embedding_params(model: BiLSTMClassifier) -> int:
    """Parameters outside the embedding table: the LSTM, the MLP and the output layer."""
    params = nnx.state(model, nnx.Param)
    return sum(x.size for x in jax.tree.leaves(params)) - model.embed.embedding[...].size


# ------------------------------------------------------------------------------------------------
# Saving and loading

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "bilstm_config.json"


def save_bilstm(model: BiLSTMClassifier, directory: str | os.PathLike, *, tokenizer=None,
                extra: dict | None = None) -> pathlib.Path:
    """Writes the student as `params.safetensors` (flat dotted names), `bilstm_config.json`
    (architecture and label names), the tokenizer files and optional `kdjax.json` metadata.

    Written next to `directory` and renamed into place, so an interrupted save never leaves a
    half-written model where a finished one is expected.
    """
    from safetensors.numpy import save_file

    from kdjax.hf import staged_directory

    directory = pathlib.Path(directory)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {".".join(str(k) for k in path): np.ascontiguousarray(
        np.asarray(jax.device_get(variable[...]), np.float32)) for path, variable in flat}
    with staged_directory(directory, CONFIG_FILE) as staging:
        save_file(tensors, str(staging / PARAMS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if extra is not None:
            (staging / "kdjax.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return directory


def load_bilstm(directory: str | os.PathLike) -> BiLSTMClassifier:
    """The student saved by `save_bilstm` (label names in `model.config.label_names`).

    Raises:
      FileNotFoundError: `directory` is not a saved BiLSTM.
      ValueError: a parameter is missing or has the wrong shape.
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; is {directory} a BiLSTM "
                                    "student saved by kdjax?")
    config = BiLSTMConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    abstract = nnx.eval_shape(lambda: BiLSTMClassifier(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    tensors = load_file(str(directory / PARAMS_FILE))
    flat = []
    for path, variable in nnx.to_flat_state(state):
        name = ".".join(str(k) for k in path)
        if name not in tensors:
            raise ValueError(f"{directory / PARAMS_FILE}: parameter {name!r} is missing")
        if tuple(tensors[name].shape) != tuple(variable.shape):
            raise ValueError(f"{directory / PARAMS_FILE}: {name!r} has shape "
                             f"{tuple(tensors[name].shape)}, expected {tuple(variable.shape)}")
        flat.append((path, variable.replace(value=jnp.asarray(tensors[name]))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

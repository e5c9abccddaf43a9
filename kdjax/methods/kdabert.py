"""KDABert: adversarial distillation of hidden states against per-layer discriminators.

The seed's idea (shared/METHODS.md section 6): instead of (or besides) pulling each student
hidden state towards the teacher's with an MSE, let one discriminator per mapped layer tell
teacher features from student features, and train the student to fool it, so the student
matches the teacher's *distribution* of representations.

- Features: for a layer pair (student m, teacher g(m)) of TinyBERT's map, `[masked mean-pool(h) ;
  h[CLS]]` ([B, 2d]); the student's hidden states go through its shared projection W_h
  (`DistillStudent.projection`) when widths differ.
- Discriminator D_l: MLP 2d -> hidden -> 1, LeakyReLU 0.2, float32, optional spectral norm.
- Losses (kdjax/losses.py): non-saturating BCE with one-sided label smoothing (default), hinge,
  or WGAN with gradient penalty.
- Student loss: the stage's `combined_loss` (KD, CE, optionally gamma * hidden MSE) plus
  `lambda_adv(step) * sum_l L_G(D_l(h_s))`; lambda_adv is 0 for a warm-up, then ramps in.
- Updates alternate within each loop step: n_D discriminator steps, then one student step, each
  a pure jitted function differentiating only its own parameters with its own optax optimizer.
  The teacher runs once per loop step (`game_inputs`), outside every gradient.

Everything runs through the engine: `KDABert` is a method that changes the update
(`changes_update`), so for a stage with an `adversarial` weight the engine's `build_stage` calls
its `make_update`, and trains the returned `AdversarialState` (checkpointed and resumed like any
state) with the returned `AlternatingStep` in the one training loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import losses, sharding, train
from kdjax.engine.loss import LossSpec, combined_loss
from kdjax.engine.method import DistillError, Method, Needs
from kdjax.engine.step import step_batch_and_dropout, student_forward, student_step_metrics
from kdjax.engine.students import DistillStudent
from kdjax.engine.teachers import Teachers, teacher_forward
from kdjax.methods.tinybert import check_projection

LOSS_KINDS = ("bce", "hinge", "wgan_gp")
# Salt for the discriminator's random stream (gradient-penalty interpolation), so it never
# coincides with the student's dropout keys derived from the same base key.
_DISCRIMINATOR_STREAM = 0x0D15C


def discriminator_config(loss: str = "bce") -> ml_collections.ConfigDict:
    """The `discriminator` config section, with defaults that suit `loss`.

    bce / hinge: Adam lr 2e-4, betas (0.5, 0.999) (DCGAN's), spectral norm on, one D step per
    student step. wgan_gp: Adam lr 1e-4, betas (0.0, 0.9), no spectral norm (the gradient
    penalty is the Lipschitz constraint), 5 critic steps per student step, penalty weight 10
    (Gulrajani et al. 2017).
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"unknown discriminator loss {loss!r}; choose {', '.join(LOSS_KINDS)}")
    wgan = loss == "wgan_gp"
    section = ml_collections.ConfigDict()
    section.loss = loss  # bce (non-saturating) | hinge | wgan_gp
    section.hidden = 256  # Width of each discriminator's hidden layer.
    section.lr = 1e-4 if wgan else 2e-4  # Constant: D keeps pace with the student throughout.
    section.b1 = 0.0 if wgan else 0.5
    section.b2 = 0.9 if wgan else 0.999
    # Discriminator updates per student update; 0 = by loss (1 for bce/hinge, 5 for wgan_gp), so
    # --config.discriminator.loss=wgan_gp alone gets the usual 5.
    section.steps_per_student_step = 0
    section.spectral_norm = not wgan
    # One-sided: the teacher features' BCE target is 1 - label_smoothing (0.9); students' is 0.
    section.label_smoothing = 0.1
    section.gp_weight = 10.0  # wgan_gp only.
    # Warn when D wins (accuracy >= 0.99) or collapses for this many consecutive steps.
    section.health_window = 200
    return section


@dataclasses.dataclass(frozen=True)
class GameSpec:
    """Static description of the adversarial game (hashable: the jitted steps specialise on it).
    """

    loss: str = "bce"
    label_smoothing: float = 0.1
    gp_weight: float = 10.0
    discriminator_steps: int = 1

    def __post_init__(self):
        if self.loss not in LOSS_KINDS:
            raise DistillError(f"discriminator.loss must be one of {LOSS_KINDS}, got "
                                       f"{self.loss!r}")
        if self.discriminator_steps < 1:
            raise DistillError("discriminator steps per student step must be >= 1, got "
                                       f"{self.discriminator_steps}")

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict) -> "GameSpec":
        steps = section.steps_per_student_step or (5 if section.loss == "wgan_gp" else 1)
        return cls(loss=section.loss, label_smoothing=section.label_smoothing,
                   gp_weight=section.gp_weight, discriminator_steps=steps)


# ------------------------------------------------------------------------------------------------
# Discriminators


class PowerVector(nnx.Variable):
    """Spectral normalisation's running singular-vector estimate: discriminator state that the
    discriminator step advances by one power iteration, never an optimizer."""


def _l2_normalize(v: jax.Array) -> jax.Array:
    return v / jnp.maximum(jnp.linalg.norm(v), 1e-12)


class DiscriminatorDense(nnx.Module):
    """A float32 dense layer, optionally spectrally normalised (Miyato et al. 2018): the kernel
    is divided by its largest singular value, estimated with the stored vector `u`."""

    def __init__(self, d_in: int, d_out: int, *, spectral_norm: bool, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_in, d_out),
                                                                 jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32))
        self.u = (PowerVector(_l2_normalize(jax.random.normal(rngs.params(), (d_out,))))
                  if spectral_norm else None)

    def effective_kernel(self) -> jax.Array:
        """The kernel the layer applies: W / sigma(W) with spectral norm, else W. sigma = v^T W u
        with v = normalize(W u); u and v are constants for the gradient, as in Miyato et al."""
        kernel = self.kernel[...]
        if self.u is None:
            return kernel
        u = jax.lax.stop_gradient(self.u[...])
        v = jax.lax.stop_gradient(_l2_normalize(kernel @ u))
        sigma = v @ kernel @ u
        return kernel / jnp.maximum(sigma, 1e-12)

    def power_iteration(self) -> None:
        """Advances `u` by one power-iteration step on the current kernel, in place."""
        if self.u is None:
            return
        kernel = jax.lax.stop_gradient(self.kernel[...])
        v = _l2_normalize(kernel @ self.u[...])
        self.u[...] = _l2_normalize(kernel.T @ v)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.effective_kernel() + self.bias[...]


class LayerDiscriminator(nnx.Module):
    """D_l: features [B, F] -> logits [B]; an MLP F -> hidden -> 1 with LeakyReLU 0.2, float32."""

    def __init__(self, features: int, hidden: int, *, spectral_norm: bool, rngs: nnx.Rngs):
        self.hidden_layer = DiscriminatorDense(features, hidden, spectral_norm=spectral_norm,
                                               rngs=rngs)
        self.output_layer = DiscriminatorDense(hidden, 1, spectral_norm=spectral_norm, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.hidden_layer(x.astype(jnp.float32)), 0.2)
        return self.output_layer(h)[..., 0]


class Discriminators(nnx.Module):
    """One `LayerDiscriminator` per mapped layer pair, each seeing `[mean-pool ; CLS]` features
    (2 * `width` wide)."""

    def __init__(self, num_layers: int, width: int, hidden: int = 256, *,
                 spectral_norm: bool = False, rngs: nnx.Rngs):
        self.layers = nnx.List([LayerDiscriminator(2 * width, hidden,
                                                   spectral_norm=spectral_norm, rngs=rngs)
                                for _ in range(num_layers)])

    def __call__(self, features: jax.Array) -> jax.Array:
        """[P, B, 2d] features of P layers -> [P, B] logits."""
        return jnp.stack([d(f) for d, f in zip(self.layers, features)])

    def power_iteration(self) -> None:
        for d in self.layers:
            d.hidden_layer.power_iteration()
            d.output_layer.power_iteration()


# ------------------------------------------------------------------------------------------------
# States


@flax.struct.dataclass
class DiscriminatorState(train.TrainState):
    """A `TrainState` for the discriminators plus their spectral-norm vectors (empty without
    spectral norm), which are checkpointed but not optimised."""

    power_vectors: nnx.State = None

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation,
               ) -> "DiscriminatorState":
        graphdef, params, power_vectors = nnx.split(model, nnx.Param, PowerVector)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   graphdef=graphdef, tx=tx, power_vectors=power_vectors)

    def model(self) -> Discriminators:
        return nnx.merge(self.graphdef, self.params, self.power_vectors)

    def arrays(self) -> dict:
        return {**super().arrays(), "power_vectors": self.power_vectors}

    def with_arrays(self, arrays: dict) -> "DiscriminatorState":
        return super().with_arrays(arrays).replace(power_vectors=arrays["power_vectors"])


@flax.struct.dataclass
class AdversarialState:
    """What `train.train_loop` carries for a KDABert stage: the student's and the
    discriminators' states, each with its own optimizer state, checkpointed together."""

    student: train.TrainState
    discriminator: DiscriminatorState
    # The adaptive gate of lambda_adv (`new_gate`; None = the fixed schedule alone).
    gate: dict | None = None

    @property
    def step(self) -> jax.Array:
        """The loop's step: student updates."""
        return self.student.step

    def model(self) -> DistillStudent:
        """The student (what the stage trains; the discriminators are discarded at the end)."""
        return self.student.model()

    def arrays(self) -> dict:
        arrays = {"student": self.student.arrays(), "discriminator": self.discriminator.arrays()}
        if self.gate is not None:
            arrays["gate"] = self.gate
        return arrays

    def with_arrays(self, arrays: dict) -> "AdversarialState":
        return self.replace(student=self.student.with_arrays(arrays["student"]),
                            discriminator=self.discriminator.with_arrays(arrays["discriminator"]),
                            gate=arrays.get("gate", self.gate))


# The adaptive gate's running means: exponential, over about 1 / (1 - decay) = 50 steps.
_GATE_DECAY = 0.98


def new_gate() -> dict:
    """The gate's state before the first step: the student's first task loss (unset: -1), the
    running means of its task loss and of D's accuracy, and whether the gate has opened."""
    # Explicit dtypes: a weakly typed scalar would come back strongly typed from the first
    # step and make every step function compile twice.
    return {"start_loss": jnp.full((), -1.0, jnp.float32), "loss_mean": jnp.zeros((), jnp.float32),
            "d_accuracy_mean": jnp.full((), 0.5, jnp.float32), "opened": jnp.zeros((), jnp.bool_)}


def gate_factor(method: "KDABert", gate: dict | None) -> jax.Array:
    """The factor the gate puts on lambda_adv: 0 until the student's running task loss has
    fallen `adversarial_after_loss_drop` of the way below its first value (once open, it stays
    open); then scaled down linearly as D's running accuracy climbs from 0.5 to
    `adversarial_max_d_accuracy`, 0 beyond it. 1 when both are off or there is no gate."""
    factor = jnp.ones(())
    if gate is None:
        return factor
    if method.adversarial_after_loss_drop > 0:
        factor = factor * gate["opened"].astype(jnp.float32)
    if method.adversarial_max_d_accuracy < 1:
        top = method.adversarial_max_d_accuracy
        factor = factor * jnp.clip((top - gate["d_accuracy_mean"]) / (top - 0.5), 0.0, 1.0)
    return factor


def _gate_after_student(method: "KDABert", gate: dict, task_loss: jax.Array) -> dict:
    first = gate["start_loss"] < 0
    start = jnp.where(first, task_loss, gate["start_loss"])
    mean = jnp.where(first, task_loss,
                     _GATE_DECAY * gate["loss_mean"] + (1 - _GATE_DECAY) * task_loss)
    opened = gate["opened"] | (mean <= (1 - method.adversarial_after_loss_drop) * start)
    return {**gate, "start_loss": start, "loss_mean": mean, "opened": opened}


def make_discriminator_optimizer(section: ml_collections.ConfigDict,
                                 ) -> optax.GradientTransformation:
    """Adam at a constant `section.lr` with `section.b1`, `section.b2` (no weight decay)."""
    return optax.adam(section.lr, b1=section.b1, b2=section.b2)


# ------------------------------------------------------------------------------------------------
# Features, schedule, objectives


def pooled_features(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """`[masked mean-pool(h), h[CLS]]` in float32: [B, L, H] -> [B, 2, H]."""
    hidden = hidden.astype(jnp.float32)
    real = attention_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    mean = jnp.sum(hidden * real, 1) / jnp.maximum(jnp.sum(real, 1), 1.0)
    return jnp.stack([mean, hidden[:, 0]], axis=1)


def layer_features(hidden_states, indices: tuple[int, ...], attention_mask: jax.Array,
                   projection: Callable | None = None) -> jax.Array:
    """The discriminators' inputs for layers `indices` of `hidden_states`: [P, B, 2d].

    `projection` (the student's W_h) is applied after pooling: mean-pooling and taking [CLS] are
    linear and the pooling weights sum to 1, so this equals projecting every token first.
    """
    features = []
    for index in indices:
        pooled = pooled_features(hidden_states[index], attention_mask)
        if projection is not None:
            pooled = projection(pooled).astype(jnp.float32)
        features.append(pooled.reshape(pooled.shape[0], -1))
    return jnp.stack(features)


def adversarial_weight(spec: LossSpec, step: jax.Array) -> jax.Array:
    """lambda_adv at `step`: 0 during the first `adversarial_warmup` of the stage, then a linear
    ramp to `adversarial` over the next `adversarial_ramp` (a step at once when 0)."""
    method = spec.method(KDABert)
    progress = jnp.asarray(step, jnp.float32) / max(spec.total_steps, 1)
    if method.adversarial_ramp > 0:
        factor = jnp.clip((progress - method.adversarial_warmup) / method.adversarial_ramp,
                          0.0, 1.0)
    else:
        factor = (progress >= method.adversarial_warmup).astype(jnp.float32)
    return method.adversarial * factor


def generator_loss(game: GameSpec, fake_logits: jax.Array) -> jax.Array:
    """The student's adversarial loss per layer and example: [P, B] -> [P, B]."""
    if game.loss == "bce":
        return losses.bce_generator_loss(fake_logits)
    if game.loss == "hinge":
        return losses.hinge_generator_loss(fake_logits)
    return losses.wasserstein_generator_loss(fake_logits)


def discriminator_objective(discriminators: Discriminators, real: jax.Array, fake: jax.Array,
                            game: GameSpec, key: jax.Array,
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every discriminator's loss, summed over layers, per example.

    Args:
      discriminators: the P per-layer discriminators.
      real, fake: [P, B, 2d] teacher and (stop-gradient) student features.
      game: the loss kind and its settings.
      key: draws the gradient penalty's interpolation weights.

    Returns:
      ([B] losses, [P, B] real logits, [P, B] fake logits).
    """
    real_logits, fake_logits = discriminators(real), discriminators(fake)
    if game.loss == "bce":
        per_layer = losses.bce_discriminator_loss(real_logits, fake_logits,
                                                  label_smoothing=game.label_smoothing)
    elif game.loss == "hinge":
        per_layer = losses.hinge_discriminator_loss(real_logits, fake_logits)
    else:
        per_layer = losses.wasserstein_critic_loss(real_logits, fake_logits)
        if game.gp_weight:
            mix = jax.random.uniform(key, real.shape[:2])  # [P, B]
            penalty = jnp.stack([losses.gradient_penalty(d, r, f, e) for d, r, f, e in
                                 zip(discriminators.layers, real, fake, mix)])
            per_layer = per_layer + game.gp_weight * penalty
    return jnp.sum(per_layer, 0), real_logits, fake_logits


# ------------------------------------------------------------------------------------------------
# The steps


def _model_inputs(batch: dict) -> tuple:
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def game_inputs(state: AdversarialState, teachers: Teachers, batch: dict,
                dropout_base_key: jax.Array, *, spec: LossSpec) -> dict:
    """The loop step's shared forward passes, all outside any gradient: the teacher's outputs
    (for the student's loss) and both sides' discriminator features.

    Returns:
      `teacher_out` (see `kdjax.engine.teachers.teacher_forward`), `real` and `fake` features [P, B, 2d], and
      the row `weights` [B].
    """
    batch, dropout_key = step_batch_and_dropout(spec, batch, dropout_base_key,
                                                 state.student.step)
    teacher_out = teacher_forward(teachers, batch, spec.needs)
    student = state.student.model()
    out = student.model(*_model_inputs(batch), dropout_key=dropout_key, output_hidden_states=True)
    student_layers, teacher_layers = zip(*spec.layer_pairs)
    mask = batch["attention_mask"]
    fake = layer_features(out.hidden_states, student_layers, mask, student.projection)
    real = layer_features(teacher_out["hidden_states"], teacher_layers, mask)
    return {"teacher_out": teacher_out, "real": real, "fake": jax.lax.stop_gradient(fake),
            "weights": batch["weights"]}


def discriminator_step(state: AdversarialState, inputs: dict, dropout_base_key: jax.Array, *,
                       game: GameSpec) -> tuple[AdversarialState, dict]:
    """One update of every discriminator on fixed features; the student is passed through.

    Spectral norm's vectors advance by one power iteration first (outside the gradient); the
    gradient is taken with respect to the discriminators' parameters only.

    Args:
      state: the composite state (donated by the jitted version).
      inputs: `real`, `fake` [P, B, 2d] and `weights` [B] (see `game_inputs`).
      dropout_base_key: the run's key; the step's key is folded from it and D's step counter.

    Returns:
      (new state, metric sums: d_loss, d_real_accuracy (teacher features called real),
      d_fake_accuracy (student features called fake), d_grad_norm).
    """
    d = state.discriminator
    key = jax.random.fold_in(jax.random.fold_in(dropout_base_key, _DISCRIMINATOR_STREAM), d.step)
    module = d.model()
    module.power_iteration()
    power_vectors = nnx.state(module, PowerVector)
    rows = inputs["weights"]
    count = jnp.sum(rows)

    def loss_fn(params):
        discriminators = nnx.merge(d.graphdef, params, power_vectors)
        per_example, real_logits, fake_logits = discriminator_objective(
            discriminators, inputs["real"], inputs["fake"], game, key)
        loss = jnp.sum(per_example * rows) / jnp.maximum(count, 1.0)
        return loss, (real_logits, fake_logits)

    (loss, (real_logits, fake_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        d.params)
    layers = real_logits.shape[0]
    metrics = {
        "d_loss_sum": loss * count, "d_loss_count": count,
        "d_real_accuracy_sum": jnp.sum((real_logits > 0) * rows),
        "d_real_accuracy_count": count * layers,
        "d_fake_accuracy_sum": jnp.sum((fake_logits < 0) * rows),
        "d_fake_accuracy_count": count * layers,
        "d_grad_norm_sum": optax.tree.norm(grads), "d_grad_norm_count": jnp.ones(()),
    }
    new_d = train.apply_gradients(d, grads, power_vectors=power_vectors)
    gate = state.gate
    if gate is not None:
        accuracy = ((metrics["d_real_accuracy_sum"] + metrics["d_fake_accuracy_sum"])
                    / jnp.maximum(2 * count * layers, 1.0))
        gate = {**gate, "d_accuracy_mean": _GATE_DECAY * gate["d_accuracy_mean"]
                + (1 - _GATE_DECAY) * accuracy}
    return state.replace(discriminator=new_d, gate=gate), metrics


def student_step(state: AdversarialState, inputs: dict, batch: dict,
                 dropout_base_key: jax.Array, *, spec: LossSpec, game: GameSpec,
                 grad_accum_steps: int = 1, layout: sharding.Layout | None = None,
                 ) -> tuple[AdversarialState, dict]:
    """One student update: the stage's `combined_loss` plus lambda_adv * the adversarial loss against
    the current (fixed) discriminators; the discriminators are passed through.

    Args:
      state: the composite state (donated by the jitted version).
      inputs: from `game_inputs` on this batch (the teacher's outputs are read from it).
      batch: the (global) batch.
      dropout_base_key: the run's key; the step's keys are folded from it and the student step.
      grad_accum_steps: micro-batches per update (`train.accumulate_gradients`); the teacher's
        outputs, computed once per loop step by `game_inputs`, are split with the batch.

    Returns:
      (new state, metric sums as `kdjax.engine.step.distill_step`'s plus `adversarial` (the unweighted
      student loss against D, summed over layers) and `adversarial_weight`).
    """
    s = state.student
    batch, dropout_key = step_batch_and_dropout(spec, batch, dropout_base_key, s.step)
    # Constants here: the gradient below is with respect to the student's parameters only.
    discriminators = jax.lax.stop_gradient(state.discriminator).model()
    method = spec.method(KDABert)
    weight = adversarial_weight(spec, s.step) * gate_factor(method, state.gate)
    student_layers = tuple(m for m, _ in spec.layer_pairs)
    # The teacher's outputs travel with the batch, batch dimension first (logits [K, B, C] ->
    # [B, K, C]), so that micro-batches split them along with the rows.
    teacher_out = dict(inputs["teacher_out"])
    if "logits" in teacher_out:
        teacher_out["logits"] = jnp.moveaxis(teacher_out["logits"], 0, 1)

    def micro_step(params, batch, dropout_key):
        teacher_out = dict(batch["teacher_out"])
        if "logits" in teacher_out:
            teacher_out["logits"] = jnp.moveaxis(teacher_out["logits"], 1, 0)  # [K, B, C]
        rows = batch["weights"]

        def loss_fn(params):
            student = nnx.merge(s.graphdef, params)
            # KDABert's needs ask for the student's hidden states: the features read them.
            out = student_forward(student, batch, dropout_key, spec)
            loss, metrics = combined_loss(spec, out, teacher_out, batch, s.step, student)
            fake = layer_features(out.hidden_states, student_layers, batch["attention_mask"],
                                  student.projection)
            per_example = jnp.sum(generator_loss(game, discriminators(fake)), 0)  # [B]
            total, count = jnp.sum(per_example * rows), jnp.sum(rows)
            loss = loss + weight * total / jnp.maximum(count, 1.0)
            metrics.update(adversarial_sum=total, adversarial_count=count,
                           adversarial_weight_sum=weight * count, adversarial_weight_count=count)
            return loss, (metrics, out.logits)

        (loss, (metrics, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, student_step_metrics(metrics, loss, logits, batch, grads)

    grads, metrics = train.accumulate_gradients(
        micro_step, s.params, {**batch, "teacher_out": teacher_out}, grad_accum_steps,
        dropout_key, layout)
    gate = state.gate
    if gate is not None:
        # The task loss the gate follows: the hard-label CE where the stage has one, else the
        # whole loss without the adversarial term.
        if "ce_sum" in metrics:
            task_loss = metrics["ce_sum"] / jnp.maximum(metrics["ce_count"], 1.0)
        else:
            task_loss = (metrics["loss_sum"] - weight * metrics["adversarial_sum"]) / jnp.maximum(
                metrics["count"], 1.0)
        gate = _gate_after_student(method, gate, task_loss)
    return state.replace(student=train.apply_gradients(s, grads), gate=gate), metrics


# ------------------------------------------------------------------------------------------------
# The loop's step and the health monitor


class DiscriminatorMonitor:
    """Warns when the game goes wrong, from D's per-step accuracies.

    - wins: mean accuracy (teacher features called real, student features called fake)
      >= `win_accuracy` for `window` consecutive steps: the student gets no useful signal.
    - collapses: mean accuracy within `collapse_band` of 0.5 while D either predicts a single
      class (|real acc - fake acc| >= 0.95) or has a ~0 gradient, for `window` consecutive
      steps: D no longer tells the two apart (or the student matches the teacher perfectly).

    Each warning is printed once per stretch (again only after the condition has broken) and
    written to the metric log (split "warning"). Steps are fetched from the device once every
    `check_every` steps (the log interval), never per step. For wgan_gp the accuracies are by the
    critic's sign, which is only a rough guide.
    """

    def __init__(self, *, window: int = 200, check_every: int = 50, log=None,
                 description: str = "distill", win_accuracy: float = 0.99,
                 collapse_band: float = 0.05, dead_grad_norm: float = 1e-6):
        self.window, self.check_every, self.log = window, check_every, log
        self.description = description
        self.win_accuracy, self.collapse_band = win_accuracy, collapse_band
        self.dead_grad_norm = dead_grad_norm
        self.stretch = {"wins": 0, "collapses": 0}
        self.warnings: list[tuple[int, str, str]] = []
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        """Queues step `step`'s D metric sums (device arrays); checks every `check_every`."""
        self._pending.append((step, {k: metrics[k] for k in (
            "d_real_accuracy_sum", "d_real_accuracy_count", "d_fake_accuracy_sum",
            "d_fake_accuracy_count", "d_grad_norm_sum", "d_grad_norm_count")}))
        if len(self._pending) >= self.check_every:
            self.flush()

    def flush(self) -> None:
        """Fetches the queued steps (one host transfer) and checks them in order."""
        pending, self._pending = self._pending, []
        for (step, _), m in zip(pending, jax.device_get([m for _, m in pending])):
            mean = lambda name: float(m[f"{name}_sum"] / max(m[f"{name}_count"], 1e-9))
            self.observe(step, real_accuracy=mean("d_real_accuracy"),
                         fake_accuracy=mean("d_fake_accuracy"), grad_norm=mean("d_grad_norm"))

    def observe(self, step: int, *, real_accuracy: float, fake_accuracy: float,
                grad_norm: float) -> list[str]:
        """Checks one step; returns the warnings it raised (usually none)."""
        accuracy = (real_accuracy + fake_accuracy) / 2
        one_class = abs(real_accuracy - fake_accuracy) >= 0.95
        conditions = {
            "wins": accuracy >= self.win_accuracy,
            "collapses": (abs(accuracy - 0.5) <= self.collapse_band
                          and (one_class or grad_norm <= self.dead_grad_norm)),
        }
        raised = []
        for kind, holds in conditions.items():
            self.stretch[kind] = self.stretch[kind] + 1 if holds else 0
            if self.stretch[kind] == self.window:
                raised.append(self._warn(step, kind, real_accuracy, fake_accuracy, grad_norm))
        return raised

    def _warn(self, step, kind, real_accuracy, fake_accuracy, grad_norm) -> str:
        what = {"wins": "the discriminator wins completely (the student's adversarial gradient "
                        "carries little signal; consider a smaller discriminator.lr, spectral "
                        "norm, or more label smoothing)",
                "collapses": "the discriminator has collapsed to ~0.5 accuracy (one class or no "
                             "gradient; check discriminator.lr, or the student already matches)"}
        message = (f"warning [{self.description}] step {step + 1}: {what[kind]} for "
                   f"{self.window} steps: accuracy on teacher features {real_accuracy:.3f}, on "
                   f"student features {fake_accuracy:.3f}, D gradient norm {grad_norm:.2e}")
        print(message, flush=True)
        self.warnings.append((step, kind, message))
        if self.log is not None:
            self.log.write(step + 1, "warning", {"stage": self.description,
                                                 "warning": f"discriminator_{kind}",
                                                 "message": message})
        return message


class AlternatingStep:
    """`train.train_loop`'s step for a KDABert stage: `(state, batch, key) -> (state, metrics)`.

    Runs the jitted `game_inputs` once (teacher forward and features), then the jitted
    `discriminator_step` n_D times on those features, then the jitted `student_step`, all on the
    same batch. Metrics merge both sides (the D sums accumulate over the n_D steps); a non-finite
    D loss is reported through the student's `grad_norm`, so the loop's NaN check stops the run.
    """

    def __init__(self, mesh: Mesh, spec: LossSpec, game: GameSpec,
                 teachers: Teachers, *, monitor: DiscriminatorMonitor | None = None,
                 inputs_fn: Callable = game_inputs,
                 discriminator_fn: Callable = discriminator_step,
                 student_fn: Callable = student_step, fsdp: bool = False,
                 grad_accum_steps: int = 1):
        self.game, self.teachers, self.monitor = game, teachers, monitor
        state_, batch_, rep_, as_is = (sharding.STATE, sharding.BATCH, sharding.REPLICATED,
                                       sharding.AS_IS)
        # State and teachers keep the layout `sharding.place_state` gave them (replicated or
        # FSDP-split, `fsdp`) in and out; batch split; features keep the sharding they come with.
        self.inputs = sharding.jit_step(functools.partial(inputs_fn, spec=spec), mesh,
                                        (state_, state_, batch_, rep_), fsdp=fsdp,
                                        returns_state=False, donate_state=False)
        # The discriminators see pooled features only (no BERT activations): one pass over the
        # whole batch, no micro-batches.
        self.discriminator = sharding.jit_step(functools.partial(discriminator_fn, game=game),
                                               mesh, (state_, as_is, rep_), fsdp=fsdp)
        student_fn = sharding.with_accumulation(
            functools.partial(student_fn, spec=spec, game=game), grad_accum_steps, mesh, fsdp=fsdp)
        self.student = sharding.jit_step(student_fn, mesh, (state_, as_is, batch_, rep_),
                                         fsdp=fsdp)
        self._step: int | None = None

    def __call__(self, state: AdversarialState, batch: dict, dropout_key: jax.Array,
                 ) -> tuple[AdversarialState, dict]:
        if self._step is None:
            self._step = int(state.step)  # Once per run (a resumed run starts mid-stage).
        inputs = self.inputs(state, self.teachers, batch, dropout_key)
        features = {k: inputs[k] for k in ("real", "fake", "weights")}
        d_metrics = None
        for _ in range(self.game.discriminator_steps):
            state, metrics = self.discriminator(state, features, dropout_key)
            d_metrics = metrics if d_metrics is None else jax.tree.map(jnp.add, d_metrics,
                                                                         metrics)
        state, metrics = self.student(state, inputs, batch, dropout_key)
        metrics = {**metrics, **d_metrics}
        metrics["grad_norm"] = jnp.where(jnp.isfinite(d_metrics["d_loss_sum"]),
                                         metrics["grad_norm"], jnp.nan)
        if self.monitor is not None:
            self.monitor.add(self._step, d_metrics)
        self._step += 1
        return state, metrics


def setup_stage(config: ml_collections.ConfigDict, spec: LossSpec,
                student_state: train.TrainState, teachers: Teachers, mesh: Mesh, *,
                log=None, description: str = "distill",
                ) -> tuple[AdversarialState, AlternatingStep]:
    """The state and loop step of a stage whose loss has an `adversarial` weight
    (`KDABert.make_update`).

    Builds one discriminator per layer pair of `spec` (width: the teacher's, which is what the
    student's projection maps to), their optimizer and state from `config.discriminator`
    (defaults of `discriminator_config()` when the config has no such section), and the
    alternating step.

    Returns:
      (the `AdversarialState`, placed by `sharding.place_state` (replicated, or FSDP-split with
      `train.fsdp`), and the loop's step function).
    """
    section = config.get("discriminator") or discriminator_config()
    game = GameSpec.from_config(section)
    if not spec.layer_pairs:
        raise DistillError("loss.adversarial needs layer pairs (loss.layer_map)")
    if teachers is None:
        raise DistillError("loss.adversarial needs the teacher's hidden states")
    student = student_state.model()
    width = (student.projection.out_features if student.projection is not None
             else student.model.config.hidden_size)
    discriminators = Discriminators(len(spec.layer_pairs), width, section.hidden,
                                    spectral_norm=section.spectral_norm,
                                    rngs=nnx.Rngs(config.train.seed + 2))
    fsdp = config.train.get("fsdp", False)
    d_state = sharding.place_state(
        DiscriminatorState.create(discriminators, make_discriminator_optimizer(section)), mesh,
        fsdp=fsdp)
    print(f"discriminators: {len(spec.layer_pairs)} x ({2 * width} -> {section.hidden} -> 1), "
          f"loss {game.loss}, {game.discriminator_steps} D step(s) per student step, spectral "
          f"norm {'on' if section.spectral_norm else 'off'}, lambda_adv "
          f"{spec.method(KDABert).adversarial}",
          flush=True)
    monitor = DiscriminatorMonitor(window=section.health_window,
                                   check_every=config.train.log_every, log=log,
                                   description=description)
    method = spec.method(KDABert)
    gate = None
    if method.adversarial_after_loss_drop > 0 or method.adversarial_max_d_accuracy < 1:
        gate = sharding.replicate(new_gate(), mesh)
    state = AdversarialState(student=student_state, discriminator=d_state, gate=gate)
    return state, AlternatingStep(mesh, spec, game, teachers, monitor=monitor, fsdp=fsdp,
                                  grad_accum_steps=config.train.get("grad_accum_steps", 1))


# ------------------------------------------------------------------------------------------------
# The method


@dataclasses.dataclass(frozen=True)
class KDABert(Method):
    """The adversarial term's settings. The term itself is added by `student_step`, which (with
    the discriminators' step) replaces the plain student update: `changes_update`."""

    # lambda_adv on the student's adversarial loss against per-layer discriminators
    # (config.discriminator); 0 for the first `adversarial_warmup` of the stage, then a linear
    # ramp to full over the next `adversarial_ramp` (0 = at once).
    adversarial: float = 0.0
    adversarial_warmup: float = 0.1
    adversarial_ramp: float = 0.1
    # The adaptive gate on top of that schedule (`gate_factor`): the term waits until the
    # student's running task loss has fallen this fraction below its first value (0 = off), and
    # backs off as the discriminator's running accuracy nears this bound (1 = off).
    adversarial_after_loss_drop: float = 0.0
    adversarial_max_d_accuracy: float = 1.0

    TERMS = ("adversarial",)
    RULES = (("adversarial_warmup", lambda v: 0 <= v < 1, "must be in [0, 1)"),
             ("adversarial_ramp", lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = no ramp)"),
             ("adversarial_after_loss_drop", lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)"),
             ("adversarial_max_d_accuracy", lambda v: 0.5 < v <= 1,
              "must be in (0.5, 1] (1 = off)"))
    changes_update = True

    def uses_layer_map(self) -> bool:
        return True

    def needs(self, spec) -> Needs:
        return Needs(teacher_hidden=tuple(sorted({t for _, t in spec.layer_pairs})),
                     student_hidden=True,
                     uncacheable="KDABert's discriminators read teacher features inside their "
                                 "own step (kdjax/methods/kdabert.py)")

    def check(self, spec, student, teacher, *, projection: bool) -> None:
        check_projection("adversarial", spec, student, teacher, projection=projection)

    def make_update(self, stage) -> tuple[AdversarialState, AlternatingStep]:
        return setup_stage(stage.config, stage.spec, stage.state, stage.teachers, stage.mesh,
                           log=stage.log, description=stage.name)


# The discriminator section (configs/kdabert.py).
CONFIG_RULES = (
    ("discriminator.loss", lambda v: v in ("bce", "hinge", "wgan_gp"),
     "must be 'bce', 'hinge' or 'wgan_gp'"),
    ("discriminator.hidden", lambda v: v >= 1, "must be >= 1"),
    ("discriminator.lr", lambda v: v > 0, "must be > 0"),
    ("discriminator.b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("discriminator.b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("discriminator.steps_per_student_step", lambda v: v >= 0,
     "must be >= 0 (0 = by loss: 1 for bce/hinge, 5 for wgan_gp)"),
    ("discriminator.label_smoothing", lambda v: 0 <= v < 0.5,
     "must be in [0, 0.5) (the teacher features' target is 1 - label_smoothing)"),
    ("discriminator.gp_weight", lambda v: v >= 0, "must be >= 0"),
    ("discriminator.health_window", lambda v: v >= 1, "must be >= 1 (steps)"),
)

METHODS = (KDABert,)

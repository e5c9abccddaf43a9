"""The distilled BiLSTM on tiny models: the LSTM against torch.nn.LSTM, padding invariance, pair
features, the jitted step (one trace on 8 devices, loss goes down, teacher untouched), the
teacher-label cache, save/load, config refusals, and end-to-end BiLSTM runs."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, write_toy_task
from kdjax import config as config_lib, data, distill, sharding, train
from kdjax import methods
from kdjax.methods import bilstm
from kdjax.models.bert import BertClassifier, BertConfig
from kdjax.models.bilstm import BiLSTMClassifier, BiLSTMConfig, load_bilstm, save_bilstm

SMALL = BiLSTMConfig(vocab_size=64, embedding_dim=8, hidden_size=6, mlp_size=5, num_labels=3,
                     dropout=0.0, skip_token_ids=(0, 1, 2))
TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=0.5)


def _batch(seed, batch_size=16, length=12, pair=False):
    """Rows [CLS] words [SEP] (pairs: [CLS] a [SEP] b [SEP]), ids 0 pad, 1 CLS, 2 SEP."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch_size, length), np.int32)
    types = np.zeros((batch_size, length), np.int32)
    for r in range(batch_size):
        if pair:
            a, b = rng.integers(1, (length - 3) // 2 + 1, 2)
            row = [1, *rng.integers(3, 64, a), 2, *rng.integers(3, 64, b), 2]
            types[r, a + 2:len(row)] = 1
        else:
            row = [1, *rng.integers(3, 64, rng.integers(1, length - 1)), 2]
        ids[r, :len(row)] = row
    mask = (ids > 0).astype(np.int32)
    labels = rng.integers(0, 3, batch_size).astype(np.int32)
    labels[:4] = -1  # Augmented rows: the teacher's argmax is their label.
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
            "weights": np.r_[np.ones(batch_size - 2), np.zeros(2)].astype(np.float32),
            "example_index": np.arange(batch_size, dtype=np.int32)}


def _torch_bilstm(encoder):
    import torch

    lstm = torch.nn.LSTM(SMALL.embedding_dim, SMALL.hidden_size, bidirectional=True,
                         batch_first=True)
    with torch.no_grad():
        for d, suffix in enumerate(("", "_reverse")):
            getattr(lstm, f"weight_ih_l0{suffix}").copy_(
                torch.tensor(np.asarray(encoder.input_kernel[...][d]).T))
            getattr(lstm, f"weight_hh_l0{suffix}").copy_(
                torch.tensor(np.asarray(encoder.recurrent_kernel[...][d]).T))
            getattr(lstm, f"bias_ih_l0{suffix}").copy_(torch.tensor(np.asarray(encoder.bias[...][d])))
            getattr(lstm, f"bias_hh_l0{suffix}").zero_()
    return lstm


def test_final_states_match_torch_lstm_on_the_real_tokens_only():
    import torch

    model = BiLSTMClassifier(SMALL, rngs=nnx.Rngs(0))
    lstm = _torch_bilstm(model.encoder)
    batch = _batch(0)
    x = np.asarray(model.embed(jnp.asarray(batch["input_ids"])))
    words = (batch["attention_mask"] == 1) & (batch["input_ids"] > 2)
    ours = np.asarray(model.encoder(jnp.asarray(x), jnp.asarray(words)))
    for r in range(len(x)):
        real = torch.tensor(x[r][words[r]][None])  # Words only, no [CLS]/[SEP]/padding.
        _, (h, _) = lstm(real)
        np.testing.assert_allclose(ours[r], torch.cat([h[0, 0], h[1, 0]]).detach().numpy(),
                                   atol=1e-5)


@pytest.mark.parametrize("pair", [False, True])
def test_appending_padding_does_not_change_the_logits(pair):
    model = BiLSTMClassifier(dataclasses_replace(SMALL, pair=pair), rngs=nnx.Rngs(0))
    batch = _batch(1, pair=pair)
    padded = {k: np.pad(batch[k], ((0, 0), (0, 9))) for k in
              ("input_ids", "attention_mask", "token_type_ids")}
    run = lambda b: np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                                     jnp.asarray(b["token_type_ids"])).logits)
    np.testing.assert_allclose(run(padded), run(batch), rtol=1e-6, atol=1e-6)
    # Garbage under the padding is ignored too: only the attention mask decides.
    padded["input_ids"][:, -9:] = 17
    np.testing.assert_allclose(run(padded), run(batch), rtol=1e-6, atol=1e-6)


def dataclasses_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_pair_features_encode_each_sentence_alone():
    pair_model = BiLSTMClassifier(dataclasses_replace(SMALL, pair=True), rngs=nnx.Rngs(0))
    batch = _batch(2, pair=True)
    out = pair_model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                     jnp.asarray(batch["token_type_ids"]))
    assert out.features.shape == (16, 8 * SMALL.hidden_size)
    # Independent: each sentence as its own single-sentence row, left-aligned.
    h = []
    for segment in (0, 1):
        rows = np.zeros_like(batch["input_ids"])
        for r in range(len(rows)):
            keep = ((batch["token_type_ids"][r] == segment) & (batch["attention_mask"][r] == 1)
                    & (batch["input_ids"][r] > 2))
            words = batch["input_ids"][r][keep]
            rows[r, :len(words)] = words
        x = pair_model.embed(jnp.asarray(rows))
        h.append(np.asarray(pair_model.encoder(x, jnp.asarray(rows > 0))))
    h1, h2 = h
    np.testing.assert_allclose(np.asarray(out.features),
                               np.concatenate([h1, h2, h1 * h2, np.abs(h1 - h2)], -1), atol=1e-6)


def test_step_traces_once_learns_and_leaves_the_teacher_untouched(tmp_path):
    mesh = sharding.make_mesh(8)
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    teacher_before = jax.device_get(nnx.state(teacher, nnx.Param))
    batch = _batch(3)
    split = data.EncodedSplit(batch["input_ids"], batch["token_type_ids"],
                              batch["attention_mask"].sum(1).astype(np.int32), batch["labels"])
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    logits, _ = bilstm.teacher_logits([tmp_path / "teacher"], [teacher], split, batch_size=16,
                                      buckets=(12,), mesh=mesh, cache_dir=tmp_path / "cache")
    assert logits.shape == (16, 1, 3)
    spec = distill.loss_spec(ce=0.5, logit_mse=0.5, hard_labels_from_teacher=True)
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "bilstm.py"))
    state = sharding.replicate(train.TrainState.create(
        BiLSTMClassifier(SMALL, rngs=nnx.Rngs(1)), bilstm.make_optimizer(config.optim)), mesh)
    chex.clear_trace_counter()
    step = train.make_train_step(mesh, functools.partial(
        chex.assert_max_traces(bilstm.bilstm_step, n=1), spec=spec))
    batch["teacher_logits"] = logits[batch["example_index"]]
    sharded = sharding.shard_batch(batch, mesh)
    key = sharding.replicate(jax.random.key(0), mesh)
    losses = []
    for _ in range(40):
        state, metrics = step(state, sharded, key)
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    assert np.isfinite(losses).all()
    # Adadelta's step size grows from ~0 as its running averages fill: a slow, steady start.
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert float(metrics["ce_count"]) == 14  # Teacher labels fill in the 4 augmented rows.
    chex.assert_trees_all_equal(jax.device_get(nnx.state(teacher, nnx.Param)), teacher_before)


def test_logit_mse_step_loss_matches_numpy():
    spec = distill.loss_spec(ce=0.3, logit_mse=0.7, hard_labels_from_teacher=True)
    model = BiLSTMClassifier(SMALL, rngs=nnx.Rngs(1))
    batch = _batch(4)
    teacher = np.random.default_rng(0).normal(size=(16, 1, 3)).astype(np.float32)
    out = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    loss, _ = distill.combined_loss(spec, out, {"logits": jnp.moveaxis(teacher, 1, 0)},
                                    {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(0))
    z = np.asarray(out.logits, np.float64)
    w = batch["weights"].astype(bool)
    hard = np.where(batch["labels"] >= 0, batch["labels"], teacher[:, 0].argmax(-1))
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -log_p[np.arange(16), hard][w].mean()
    mse = ((z - teacher[:, 0]) ** 2).mean(-1)[w].mean()
    assert float(loss) == pytest.approx(0.3 * ce + 0.7 * mse, rel=1e-5)


def test_teacher_labels_are_cached_and_invalidated_when_the_data_change(tmp_path, monkeypatch):
    mesh = sharding.make_mesh(2)
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text("{}")
    batch = _batch(5)
    split = data.EncodedSplit(batch["input_ids"], batch["token_type_ids"],
                              batch["attention_mask"].sum(1).astype(np.int32), batch["labels"])
    label = functools.partial(bilstm.teacher_logits, [tmp_path / "t"], [teacher], batch_size=8,
                              buckets=(12,), mesh=mesh, cache_dir=tmp_path / "cache")
    first, info = label(split)
    assert not info["cached"]
    direct = np.asarray(teacher(jnp.asarray(batch["input_ids"]),
                                jnp.asarray(batch["attention_mask"])).logits)
    np.testing.assert_allclose(first[:, 0], direct, atol=1e-5)

    calls = []
    real_predict = train.predict
    monkeypatch.setattr(train, "predict", lambda *a, **k: calls.append(1) or real_predict(*a, **k))
    again, info = label(split)
    assert info["cached"] and not calls  # The teacher did not run.
    np.testing.assert_array_equal(again, first)
    changed = data.EncodedSplit(split.input_ids.copy(), split.token_type_ids, split.lengths,
                                split.labels)
    changed.input_ids[0, 1] = 5 if changed.input_ids[0, 1] != 5 else 6
    _, info = label(changed)
    assert not info["cached"] and calls
    # New teacher weights invalidate it too.
    (tmp_path / "t" / "config.json").write_text('{"changed": 1}')
    calls.clear()
    _, info = label(split)
    assert not info["cached"] and calls


def test_save_and_load_round_trip(tmp_path):
    model = BiLSTMClassifier(dataclasses_replace(SMALL, pair=True, label_names=("a", "b", "c")),
                             rngs=nnx.Rngs(3))
    save_bilstm(model, tmp_path / "model", extra={"note": 1})
    loaded = load_bilstm(tmp_path / "model")
    assert loaded.config == model.config and loaded.config.label_names == ("a", "b", "c")
    chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
    with pytest.raises(FileNotFoundError, match="not a BiLSTM|not found"):
        load_bilstm(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("augment.method=eda", "augment.method"),
    ("augment.p_ng=1.5", "augment.p_ng"),
    ("optim.rho=1.0", "optim.rho"),
    ("student.mlp=0", "student.mlp"),
    ("augment.pair_sides=left", "augment.pair_sides"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "bilstm.py"))
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        methods.validate(config_lib.apply_overrides(config, [override]))


@pytest.mark.parametrize("override, message", [
    ("augment.p_mask=0.6", "augment.p_mask' \\+ 'augment.p_pos"),
    ("distill.loss.hidden=1.0", "distill.loss.hidden"),
    ("student.hidden=0", "student.hidden"),
    ("optim.name=adamw", "optim.name"),
])
def test_cross_field_refusals_come_before_any_work(tmp_path, override, message):
    overrides = [override] + (["augment.p_pos=0.6"] if "p_mask" in override else [])
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "bilstm.py"))
    config = config_lib.apply_overrides(config, overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        bilstm.check_config(config, methods.loss_methods())


# ------------------------------------------------------------------------------------------------
# End to end on the toy task


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_hf_dir):
    """The toy task and a teacher fine-tuned on it once (by the first run's prepare_teachers),
    which later runs reuse via teacher.name (an already fine-tuned task model is used as is)."""
    root = tmp_path_factory.mktemp("bilstm_toy")
    train_file, dev_file = write_toy_task(root / "data")
    return {"train": train_file, "dev": dev_file, "teacher": tiny_hf_dir,
            "finetuned": root / "first-run" / "teacher-seed0" / "model", "root": root}


def _toy(toy_run, recipe, *overrides):
    teacher = toy_run["finetuned"] if toy_run["finetuned"].is_dir() else toy_run["teacher"]
    config = config_lib.load_config(str(REPO_ROOT / "configs" / f"{recipe}.py"))
    # One bucket: every step and prediction compiles once.
    return config_lib.apply_overrides(config, [
        f"teacher.name={teacher}", "teacher.epochs=8", "teacher.optim.lr=1e-2",
        "data.task=toy", f"data.train_file={toy_run['train']}",
        f"data.dev_file={toy_run['dev']}", "data.max_length=16", "data.buckets=(16,)",
        "data.batch_size=16", "data.eval_batch_size=16", "student.hidden=16",
        "student.mlp=16", "train.log_every=5", "train.num_devices=2", *overrides])


def test_distill_bilstm_end_to_end_with_tang_augmentation(toy_run):
    config = _toy(toy_run, "bilstm", "augment.n_iter=3", "augment.max_examples=150",
                  "distill.epochs=6")
    run = toy_run["root"] / "first-run"
    result = distill.distill(config, run, progress=False, measure_throughput=True)
    assert result["finished"] and result["teacher_accuracy"] > 0.8
    assert result["accuracy"] > 0.7  # The toy task is learnable by the BiLSTM.
    assert result["augmented_examples"] == 150 and result["augmented_examples_per_s"] > 0
    assert result["transfer_examples"] == 96 + 150
    assert result["student_layers"] == 1 and result["student_hidden"] == 16
    assert result["student_non_embedding_params"] < result["student_params"]
    assert result["student_examples_per_s"] > 0 and result["teacher_examples_per_s"] > 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    assert {p.name.split("-")[0] for p in (run / "cache").iterdir()} == {"augmented", "teacher"}
    student = load_bilstm(run / "model")
    assert student.config.label_names == ("0", "1")
    # The saved student reproduces the reported accuracy.
    inputs = train.prepare_task(config_lib.apply_overrides(
        config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py")),
        [f"model.name={run / 'model'}", "data.task=toy",
         f"data.train_file={config.data.train_file}", f"data.dev_file={config.data.dev_file}",
         "data.max_length=16"]))
    logits = student(jnp.asarray(inputs.dev.input_ids),
                     jnp.asarray(np.arange(16)[None] < inputs.dev.lengths[:, None]),
                     jnp.asarray(inputs.dev.token_type_ids)).logits
    assert np.mean(np.asarray(logits).argmax(-1) == inputs.dev.labels) == \
        pytest.approx(result["accuracy"])
    # Run again: everything is reused (teacher run, augmentation, labels, the stage).
    again = distill.distill(config, run, progress=False, measure_throughput=False)
    assert again["accuracy"] == result["accuracy"]


@pytest.mark.parametrize("recipe", ["bilstm_tinybert_aug", "bilstm_baseline"])
def test_other_bilstm_recipes_run(tmp_path, toy_run, recipe):
    # Run after the end-to-end test (same module), the teacher it fine-tuned is used as is.
    finetuned_exists = toy_run["finetuned"].is_dir()
    config = _toy(toy_run, recipe, "augment.n_iter=2", "augment.max_examples=40",
                  "train.max_steps=4")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert result["finished"] and result["stages"]["distill"]["steps"] == 4
    assert (tmp_path / "run" / "teacher-seed0").exists() != finetuned_exists
    if recipe == "bilstm_baseline":
        assert result["augmented_examples"] == 0 and result["transfer_examples"] == 96
        assert not (tmp_path / "run" / "cache").exists()
    else:
        assert result["augmented_examples"] == 40

"""The train step, the mesh, checkpoints and resume, on a tiny model."""

import json

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import checkpoint, config as config_lib, data, optim, sharding, train
from kdjax import metrics as metrics_lib
from kdjax.models.bert import BertClassifier, BertConfig

TINY = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32)


def _batch(seed, batch_size=16, length=12):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, batch_size)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (rng.integers(1, 64, (batch_size, length)) * mask).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch_size, length), np.int32),
        "labels": rng.integers(0, 3, batch_size).astype(np.int32),
        "weights": np.r_[np.ones(batch_size - 2), np.zeros(2)].astype(np.float32),
    }


def _state(mesh, lr=1e-3):
    optim_config = config_lib.load_config("configs/finetune.py").optim
    with optim_config.unlocked():
        optim_config.lr = lr
    tx = optim.make_optimizer(optim_config, total_steps=20)
    model = BertClassifier(TINY, 3, rngs=nnx.Rngs(0))
    return sharding.replicate(train.TrainState.create(model, tx), mesh)


def _run(mesh, steps, step_fn=train.train_step, lr=1e-3):
    state = _state(mesh, lr)
    jitted = train.make_train_step(mesh, step_fn)
    key = sharding.replicate(jax.random.key(1), mesh)
    losses = []
    for i in range(steps):
        state, metrics = jitted(state, sharding.shard_batch(_batch(i % 2), mesh), key)
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return state, losses


def test_eight_devices_give_the_same_parameters_as_one():
    assert len(jax.devices()) == 8, "conftest must fake 8 CPU devices"
    one, _ = _run(sharding.make_mesh(1), steps=3)
    eight, _ = _run(sharding.make_mesh(8), steps=3)
    leaf = jax.tree.leaves(eight.params)[0]
    assert len(leaf.sharding.device_set) == 8  # Really replicated over the 8-device mesh.
    chex.assert_trees_all_close(jax.device_get(one.params), jax.device_get(eight.params),
                                atol=2e-6, rtol=1e-5)


def test_step_compiles_once_per_shape_and_learns():
    mesh = sharding.make_mesh(1)
    traced = chex.assert_max_traces(train.train_step, n=1)
    # Same shapes every step: one trace for all steps (raises on a retrace).
    _, losses = _run(mesh, steps=12, step_fn=traced, lr=1e-2)
    # Two fixed batches seen six times each: the loss must fall.
    assert losses[-1] < losses[0] - 0.1, losses


def test_padding_rows_do_not_change_the_update():
    mesh = sharding.make_mesh(1)
    batch = _batch(0)
    other = dict(batch)
    other["labels"] = batch["labels"].copy()
    other["input_ids"] = batch["input_ids"].copy()
    other["input_ids"][-2:] = 7  # The two weight-0 rows get different content.
    other["labels"][-2:] = 0
    key = jax.random.key(0)
    step = jax.jit(train.train_step)
    a, _ = step(_state(mesh), batch, key)
    b, _ = step(_state(mesh), other, key)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-7)


def test_dropout_is_active_in_training_and_off_in_prediction():
    model = BertClassifier(TINY, 3, rngs=nnx.Rngs(0))
    batch = _batch(0)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    a = model(*inputs, dropout_key=jax.random.key(0)).logits
    b = model(*inputs, dropout_key=jax.random.key(1)).logits
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model(*inputs).logits, model(*inputs).logits)


def test_resume_continues_exactly(toy_config, tmp_path):
    config_lib.apply_overrides(toy_config, ["train.max_steps=8", "train.checkpoint_every=2"])
    straight = train.fine_tune(toy_config, tmp_path / "straight", progress=False)
    assert straight["finished"] and straight["steps"] == 8

    config_lib.apply_overrides(toy_config, ["train.stop_after_steps=4"])
    first = train.fine_tune(toy_config, tmp_path / "resumed", progress=False)
    assert not first["finished"] and first["steps"] == 4
    config_lib.apply_overrides(toy_config, ["train.stop_after_steps=0"])
    second = train.fine_tune(toy_config, tmp_path / "resumed", progress=False)
    assert second["finished"] and second["steps"] == 8

    a, _, _, step_a = train.load_run(tmp_path / "straight")
    b, _, _, step_b = train.load_run(tmp_path / "resumed")
    assert step_a == step_b == 8
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # Bitwise.
    assert straight["accuracy"] == second["accuracy"]
    # The checkpoint records where the data iterator stood (toy train: 96 rows = 6 batches).
    with checkpoint.Checkpointer(tmp_path / "resumed" / "checkpoints") as ckpt:
        assert ckpt.read_meta(8)["epoch"] == 1 and ckpt.read_meta(8)["batch_in_epoch"] == 2
        assert ckpt.all_steps() == [6, 8]  # keep_checkpoints=2


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    mesh = sharding.make_mesh(1)
    state = _state(mesh)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, state.arrays(), {"step": 4, "epoch": 0, "batch_in_epoch": 4})
    # What a kill in the middle of saving step 8 leaves behind: Orbax's temporary directory.
    partial = tmp_path / "ckpt" / "8.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 4
        arrays, meta = ckpt.restore(state.arrays())
    assert meta["batch_in_epoch"] == 4
    chex.assert_trees_all_equal(jax.device_get(arrays["params"]), jax.device_get(state.params))


def damage_checkpoint(step_dir):
    """Truncates every array data file of an Orbax checkpoint to half its size (what a full
    disk or an unfinished copy leaves), keeping its commit markers."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(toy_config, tmp_path, capsys):
    config_lib.apply_overrides(toy_config, ["train.max_steps=6", "train.checkpoint_every=2"])
    straight = train.fine_tune(toy_config, tmp_path / "straight", progress=False)
    config_lib.apply_overrides(toy_config, ["train.stop_after_steps=4"])
    train.fine_tune(toy_config, tmp_path / "resumed", progress=False)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    damage_checkpoint(checkpoints / "4")
    capsys.readouterr()
    # Reading (kdjax export) skips it and moves nothing.
    assert train.load_run(tmp_path / "resumed")[3] == 2
    assert f"checkpoint step 4 in {checkpoints} cannot be read" in capsys.readouterr().out
    assert (checkpoints / "4").is_dir()
    config_lib.apply_overrides(toy_config, ["train.stop_after_steps=0"])
    resumed = train.fine_tune(toy_config, tmp_path / "resumed", progress=False)
    out = capsys.readouterr()
    (aside,) = (tmp_path / "resumed" / "damaged-checkpoints").iterdir()
    assert (f"checkpoint step 4 in {checkpoints} cannot be read (ValueError: " in out.out
            and f"moved it to {aside}; resuming from step 2" in out.out), out.out
    assert "Traceback" not in out.err, out.err
    assert resumed["finished"] and resumed["accuracy"] == straight["accuracy"]
    a, _, _, _ = train.load_run(tmp_path / "straight")
    b, _, _, _ = train.load_run(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # Bitwise.


def test_no_readable_checkpoint_is_one_clear_error_and_moves_nothing(tmp_path):
    state = _state(sharding.make_mesh(1))
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        for step in (2, 4):
            ckpt.save(step, state.arrays(), {"step": step})
            ckpt.wait()
    for step in (2, 4):
        damage_checkpoint(tmp_path / "ckpt" / str(step))
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(checkpoint.CheckpointError) as error:
            ckpt.restore_latest_good(state.arrays())
    message = str(error.value)
    assert message.startswith(f"no checkpoint in {tmp_path / 'ckpt'} can be read (step 4: ")
    assert "move" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "4"]


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(toy_config, tmp_path):
    # An absurd learning rate overflows float32 within a few steps.
    config_lib.apply_overrides(toy_config, ["optim.lr=1e30", "optim.grad_clip=0.0",
                                            "optim.warmup_ratio=0.0", "train.max_steps=40",
                                            "train.checkpoint_every=1", "train.log_every=1"])
    with pytest.raises(train.TrainingDiverged, match=r"at step \d+.*last good checkpoint"):
        train.fine_tune(toy_config, tmp_path / "run", progress=False)
    # The saved checkpoint holds finite numbers.
    model, _, _, step = train.load_run(tmp_path / "run")
    assert step >= 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_fine_tune_learns_the_toy_task_and_exports_for_pytorch(toy_config, tmp_path):
    import torch
    import transformers

    config_lib.apply_overrides(toy_config, ["train.epochs=8.0", "train.num_devices=8",
                                         "optim.lr=1e-2"])
    result = train.fine_tune(toy_config, tmp_path / "run", progress=False)
    assert result["accuracy"] >= 0.9, result
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {l["split"] for l in lines} == {"train", "dev"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["task"] == "toy"

    # The exported directory is a PyTorch classifier that agrees with kdjax's evaluation.
    export = tmp_path / "run" / "model"
    ref = transformers.BertForSequenceClassification.from_pretrained(export).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    rows = [l.split("\t") for l in open(toy_config.data.dev_file).read().splitlines()[1:]]
    enc = tokenizer([r[0] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = ref(**enc).logits.argmax(-1).numpy()
    accuracy = float(np.mean(predictions == np.array([int(r[1]) for r in rows])))
    assert accuracy == pytest.approx(result["accuracy"])
    assert ref.config.id2label == {0: "0", 1: "1"}


def test_batch_size_must_divide_over_devices():
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharding.check_batch_size(12, sharding.make_mesh(8))


def test_auto_max_length_follows_the_training_lengths(toy_config, capsys):
    from kdjax import data

    config = config_lib.apply_overrides(toy_config, ["data.max_length=0"])
    inputs = train.prepare_task(config)
    whole = [len(ids) for ids in inputs.tokenizer(
        [e.text_a for e in inputs.task.splits["train"]])["input_ids"]]
    expected = min(b for b in data.default_buckets(512) if np.mean(np.array(whole) <= b) >= 0.99)
    assert inputs.max_length == expected < 64
    assert inputs.train.input_ids.shape[1] == inputs.dev.input_ids.shape[1] == expected
    assert max(inputs.buckets) == expected
    assert f"data.max_length=0 (auto): {expected} tokens" in capsys.readouterr().out


def _toy_split(n=64, length=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, n).astype(np.int32)
    mask = np.arange(length)[None] < lengths[:, None]
    return data.EncodedSplit((rng.integers(1, 64, (n, length)) * mask).astype(np.int32),
                                   np.zeros((n, length), np.int32), lengths,
                                   rng.integers(0, 3, n).astype(np.int32))


def _selected_run(tmp_path, scores, *, patience=0, stop_after=0, total_steps=12,
                  checkpoint_every=2):
    """The training loop on the tiny model with a scripted held-out score per step: which
    steps were scored, the result, and each scored step's parameters."""
    mesh = sharding.make_mesh(1)
    scored, params_at = [], {}

    def score(state):
        step = int(state.step)
        scored.append(step)
        params_at[step] = jax.device_get(state.params)
        return {"accuracy": scores[step], "examples": 8}

    train_config = config_lib.load_config("configs/finetune.py").train
    config_lib.apply_overrides(train_config, [
        f"checkpoint_every={checkpoint_every}", f"stop_after_steps={stop_after}",
        "log_every=2"])
    result = train.train_loop(
        _state(mesh), train.make_train_step(mesh), data.Batcher(
            _toy_split(), 16, buckets=(12,), shuffle=True, seed=0),
        total_steps=total_steps, train_config=train_config,
        checkpoint_dir=tmp_path / "checkpoints",
        log=metrics_lib.MetricLog(tmp_path), mesh=mesh,
        dropout_key=sharding.replicate(jax.random.key(1), mesh), progress=False,
        selection=train.Selection(score=score, every=2, patience=patience))
    return scored, result, params_at


def test_selection_returns_the_best_scored_state_and_resumes_to_the_same_choice(tmp_path):
    scores = {2: 0.5, 4: 0.8, 6: 0.7, 8: 0.8, 10: 0.6, 12: 0.75}
    scored, result, params_at = _selected_run(tmp_path / "straight", scores)
    assert scored == [2, 4, 6, 8, 10, 12]
    # The first step with the best score (a tie later does not move it), and its parameters.
    assert result.finished and result.steps == 12 and not result.stopped_early
    assert result.selected_step == 4 and result.holdout == {"accuracy": 0.8, "examples": 8}
    chex.assert_trees_all_equal(jax.device_get(result.state.params), params_at[4])
    assert result.selection_record()["selected_step"] == 4

    # Stopped after 5 steps, then resumed: steps 2 and 4 are not scored again, and the choice
    # and the parameters are the same.
    first, partial, _ = _selected_run(tmp_path / "resumed", scores, stop_after=5)
    assert first == [2, 4] and not partial.finished and partial.selected_step is None
    second, resumed, _ = _selected_run(tmp_path / "resumed", scores)
    assert second == [6, 8, 10, 12] and resumed.selected_step == 4
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), params_at[4])


def test_a_kill_after_a_best_save_and_before_a_checkpoint_replays_to_the_same_choice(
        tmp_path):
    import shutil

    scores = {2: 0.5, 4: 0.8, 6: 0.7, 8: 0.8, 10: 0.6, 12: 0.75}
    _, straight, params_at = _selected_run(tmp_path / "straight", scores)
    # Killed at step 3: best/ holds step 2, no regular checkpoint was written (the one the
    # stop writes is removed), so the rerun starts from step 0 and replays step 2.
    _selected_run(tmp_path / "killed", scores, stop_after=3, checkpoint_every=100)
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "3")
    assert [p.name for p in (tmp_path / "killed" / "best").iterdir()] == ["2"]
    scored, resumed, _ = _selected_run(tmp_path / "killed", scores, checkpoint_every=100)
    assert scored == [2, 4, 6, 8, 10, 12] and resumed.selected_step == 4
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), params_at[4])


def test_patience_stops_training_and_a_rerun_does_not_train_on(tmp_path):
    # Best at step 4, then two evaluations without improvement: patience 2 stops at step 8.
    scores = {2: 0.5, 4: 0.8, 6: 0.7, 8: 0.8, 10: 0.9, 12: 0.9}
    scored, result, params_at = _selected_run(tmp_path, scores, patience=2, total_steps=40)
    assert scored == [2, 4, 6, 8]
    assert result.finished and result.stopped_early and result.steps == 8
    assert result.selected_step == 4
    chex.assert_trees_all_equal(jax.device_get(result.state.params), params_at[4])
    again, rerun, _ = _selected_run(tmp_path, scores, patience=2, total_steps=40)
    assert again == [] and rerun.steps == 8 and rerun.selected_step == 4


def test_holdout_slice_is_never_trained_on_and_the_same_for_every_seed(toy_config):
    config_lib.apply_overrides(toy_config, ["data.holdout_fraction=0.25"])
    inputs = train.prepare_task(toy_config)
    config_lib.apply_overrides(toy_config, ["train.seed=3"])
    again = train.prepare_task(toy_config)
    np.testing.assert_array_equal(inputs.holdout.input_ids, again.holdout.input_ids)
    assert len(inputs.train) == 72 and len(inputs.holdout) == 24
    # Every training row is in exactly one of the two, as the indices say.
    full = data.encode(inputs.task.splits["train"], inputs.tokenizer, inputs.max_length)
    held = np.setdiff1d(np.arange(96), inputs.train_indices)
    assert len(held) == 24
    np.testing.assert_array_equal(inputs.train.input_ids, full.input_ids[inputs.train_indices])
    np.testing.assert_array_equal(inputs.holdout.input_ids, full.input_ids[held])
    np.testing.assert_array_equal(inputs.holdout.labels, full.labels[held])
    assert inputs.train_examples == [inputs.task.splits["train"][i]
                                     for i in inputs.train_indices]


def test_patience_without_a_holdout_slice_is_refused(toy_config):
    config_lib.apply_overrides(toy_config, ["train.patience=3"])
    with pytest.raises(config_lib.ConfigError, match="train.patience.*holdout_fraction"):
        config_lib.validate(toy_config)

"""The teacher-output cache on tiny random models: stored outputs equal the teachers' own (and
read back with the `safetensors` package), reuse and invalidation, partial directories, the size
limit, which stages are cached, and the same student with and without the cache (one step
kind at a time, and a whole `distill` run)."""

import dataclasses
import json
import os

import chex
import optax
import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from conftest import REPO_ROOT, write_toy_task
from kdjax import config as config_lib, data, distill, hf, sharding, teacher_cache, train
from kdjax import methods
from kdjax.models.bert import BertClassifier, BertConfig

# initializer_range 0.5: the random teachers' outputs differ clearly between examples.
TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=0.5)
WIDTH = 12


def _split(seed: int, n: int = 20) -> data.EncodedSplit:
    """n random examples of 3..12 tokens: [CLS]=1 ... [SEP]=2, then padding 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, WIDTH + 1, n).astype(np.int32)
    ids = rng.integers(4, 64, (n, WIDTH)).astype(np.int32)
    ids[:, 0] = 1
    ids[np.arange(n), lengths - 1] = 2
    ids[np.arange(WIDTH)[None] >= lengths[:, None]] = 0
    types = np.zeros((n, WIDTH), np.int32)
    labels = rng.integers(0, 3, n).astype(np.int32)
    return data.EncodedSplit(ids, types, lengths, labels)


def _save_teacher(directory, model):
    """A checkpoint directory whose files the cache key hashes (safetensors + config.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(dict(hf.to_hf_tensors(model)),
                                str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    return directory


def _direct(model, split):
    """The model's own outputs on the unpadded-width split (the independent reference)."""
    out = model(split.input_ids, (np.arange(WIDTH)[None] < split.lengths[:, None]).astype(
        np.int32), split.token_type_ids, output_hidden_states=True)
    return np.asarray(out.logits), [np.asarray(h) for h in out.hidden_states]


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(8)


@pytest.fixture
def teachers(tmp_path):
    models = [BertClassifier(TEACHER, 3, rngs=nnx.Rngs(i)) for i in range(2)]
    dirs = [_save_teacher(tmp_path / f"teacher{i}", m) for i, m in enumerate(models)]
    return dirs, models


def _build(dirs, models, split, mesh, cache_dir, layers=(), **kw):
    return teacher_cache.load_or_compute(dirs, models, split, mesh=mesh, cache_dir=cache_dir,
                                         batch_size=8, buckets=(WIDTH,), hidden_layers=layers,
                                         **kw)


# ------------------------------------------------------------------------------------------------
# What is stored


def test_stored_outputs_equal_the_teachers_and_are_standard_safetensors(tmp_path, mesh,
                                                                        teachers):
    dirs, models = teachers
    split = _split(0)
    cache = _build(dirs, models, split, mesh, tmp_path / "cache", layers=(4, 0, 2))
    assert cache.computed and cache.hidden_layers == (0, 2, 4)
    assert cache.directory.parent == tmp_path / "cache"
    assert cache.directory.name.startswith("teacher-outputs-")
    direct = [_direct(m, split) for m in models]
    assert cache.logits.shape == (20, 2, 3)
    for k, (logits, _) in enumerate(direct):
        np.testing.assert_allclose(cache.logits[:, k], logits, atol=1e-5)
    # Ragged: exactly the real tokens of each example, nothing of the padding.
    assert cache.hidden.shape == (int(split.lengths.sum()), 3, 16)
    hidden = direct[0][1]
    for i, n in enumerate(split.lengths):
        rows = cache.hidden[cache.offsets[i]:cache.offsets[i + 1]]
        for j, layer in enumerate((0, 2, 4)):
            np.testing.assert_allclose(rows[:, j], hidden[layer][i, :n], atol=1e-5)
    # The file is plain safetensors: the reference reader gets the same tensors.
    loaded = safetensors.numpy.load_file(str(cache.directory / "outputs.safetensors"))
    assert set(loaded) == {"logits", "offsets", "hidden"}
    np.testing.assert_array_equal(loaded["logits"], cache.logits)
    np.testing.assert_array_equal(loaded["hidden"], np.asarray(cache.hidden))
    np.testing.assert_array_equal(loaded["offsets"], np.r_[0, np.cumsum(split.lengths)])
    manifest = json.loads((cache.directory / "manifest.json").read_text())
    assert manifest["version"] == teacher_cache.CACHE_VERSION
    assert manifest["hidden_layers"] == [0, 2, 4] and manifest["examples"] == 20
    assert manifest["bytes"] == 20 * 2 * 3 * 4 + split.lengths.sum() * 3 * 16 * 4 + 21 * 8


def test_batches_carry_their_rows_outputs_padded_to_the_bucket(tmp_path, mesh, teachers):
    dirs, models = teachers
    split = _split(1, n=13)
    cache = _build(dirs[:1], models[:1], split, mesh, tmp_path / "cache", layers=(0, 2, 4))
    logits, hidden = _direct(models[0], split)
    batcher = teacher_cache.CachedTeacherBatcher(
        data.Batcher(split, 8, buckets=(8, 12), shuffle=True, seed=3), cache)
    assert batcher.num_batches == 2 and batcher.batch_size == 8  # Delegated.
    seen = set()
    for batch in batcher.epoch(0):
        index, length = batch["example_index"], batch["input_ids"].shape[1]
        assert batch["teacher_logits"].shape == (8, 1, 3)
        assert batch["teacher_hidden"].shape == (8, 3, length, 16)  # [B, S, L, H]
        for row, i in enumerate(index):
            if i < 0:  # A padding row: zeros, weight 0.
                assert not batch["teacher_logits"][row].any()
                assert not batch["teacher_hidden"][row].any()
                continue
            seen.add(int(i))
            n = split.lengths[i]
            np.testing.assert_allclose(batch["teacher_logits"][row, 0], logits[i], atol=1e-5)
            for j, layer in enumerate((0, 2, 4)):
                np.testing.assert_allclose(batch["teacher_hidden"][row, j, :n],
                                           hidden[layer][i, :n], atol=1e-5)
            assert not batch["teacher_hidden"][row, :, n:].any()
    assert seen == set(range(13))
    with pytest.raises(teacher_cache.CacheError, match="13 examples"):
        teacher_cache.CachedTeacherBatcher(data.Batcher(_split(2, n=5), 8, buckets=(12,),
                                                        shuffle=False), cache)


# ------------------------------------------------------------------------------------------------
# Reuse, invalidation, partial directories, the size limit


def _count_computations(monkeypatch):
    calls = []
    real = teacher_cache._compute
    monkeypatch.setattr(teacher_cache, "_compute",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_cache_is_reused_and_invalidated_by_new_weights_or_data(tmp_path, mesh, teachers,
                                                               monkeypatch):
    dirs, models = teachers
    split = _split(0)
    calls = _count_computations(monkeypatch)
    first = _build(dirs, models, split, mesh, tmp_path / "cache")
    manifest = first.directory / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    again = _build(dirs, models, split, mesh, tmp_path / "cache")
    assert len(calls) == 1 and not again.computed  # The teachers did not run again.
    assert again.directory == first.directory and manifest.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.logits, first.logits)

    # New weights in the same directory: a new key, recomputed, the new teacher's logits.
    retrained = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(7))
    _save_teacher(dirs[1], retrained)
    changed = _build(dirs, [models[0], retrained], split, mesh, tmp_path / "cache")
    assert changed.computed and changed.directory != first.directory and len(calls) == 2
    np.testing.assert_allclose(changed.logits[:, 1], _direct(retrained, split)[0], atol=1e-5)

    # Changed data: one token of one example.
    edited = dataclasses.replace(split, input_ids=split.input_ids.copy())
    edited.input_ids[3, 1] = 5 if edited.input_ids[3, 1] != 5 else 6
    assert _build(dirs, [models[0], retrained], edited, mesh, tmp_path / "cache").computed
    # Storing hidden states is another key too; the logits-only cache stays as it was.
    with_hidden = _build(dirs, [models[0], retrained], split, mesh, tmp_path / "cache",
                         layers=(0, 2, 4))
    assert with_hidden.computed and with_hidden.directory != changed.directory
    assert len(calls) == 4
    assert len(list((tmp_path / "cache").iterdir())) == 4  # No temporary directory left.


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "wrong_shape", "foreign_key"])
def test_partial_or_mismatching_directories_are_never_read(tmp_path, mesh, teachers, damage,
                                                          monkeypatch):
    dirs, models = teachers
    split = _split(0)
    good = _build(dirs[:1], models[:1], split, mesh, tmp_path / "cache", layers=(0, 2, 4))
    outputs = good.directory / "outputs.safetensors"
    manifest_path = good.directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "no_manifest":  # A directory copied or written only in part.
        manifest_path.unlink()
    elif damage == "truncated":
        with open(outputs, "r+b") as f:
            f.truncate(outputs.stat().st_size // 2)
    elif damage == "wrong_shape":
        manifest["shapes"]["hidden"][0] += 1
        manifest_path.write_text(json.dumps(manifest))
    else:
        manifest["key_parts"]["data"] = "0" * 16
        manifest_path.write_text(json.dumps(manifest))
    calls = _count_computations(monkeypatch)
    again = _build(dirs[:1], models[:1], split, mesh, tmp_path / "cache", layers=(0, 2, 4))
    assert again.computed and calls and again.directory == good.directory
    np.testing.assert_allclose(again.logits, good.logits, atol=1e-6)
    np.testing.assert_allclose(np.asarray(again.hidden)[:, 1], _direct(models[0], split)[1][2][
        np.arange(WIDTH)[None] < split.lengths[:, None]], atol=1e-5)
    # And the repaired directory is read from now on.
    assert not _build(dirs[:1], models[:1], split, mesh, tmp_path / "cache",
                      layers=(0, 2, 4)).computed


def test_values_overwritten_in_place_are_caught_by_the_checksum(tmp_path, mesh, teachers,
                                                                  capsys):
    """Same size, same header, other numbers: only the manifest's checksum can tell."""
    dirs, models = teachers
    split = _split(0)
    good = _build(dirs, models, split, mesh, tmp_path / "cache")
    outputs = good.directory / "outputs.safetensors"
    assert set(good.manifest["checksums"]) == {"logits"}
    size, header = outputs.stat().st_size, outputs.read_bytes()[:64]
    with open(outputs, "r+b") as f:  # The last example's logits of both teachers.
        f.seek(size - 6 * 4)
        f.write(np.full(6, 123.0, np.float32).tobytes())
    assert outputs.stat().st_size == size and outputs.read_bytes()[:64] == header
    capsys.readouterr()
    again = _build(dirs, models, split, mesh, tmp_path / "cache")
    lines = [line for line in capsys.readouterr().out.splitlines() if "not usable" in line]
    assert lines == [f"teacher-output cache {good.directory} is not usable: the data of logits "
                     "in outputs.safetensors do not match the checksums in manifest.json "
                     "(changed or damaged after they were written); rebuilding it"]
    assert again.computed and again.directory == good.directory
    for k, model in enumerate(models):
        np.testing.assert_allclose(again.logits[:, k], _direct(model, split)[0], atol=1e-5)
    assert not _build(dirs, models, split, mesh, tmp_path / "cache").computed


def test_a_cache_without_checksums_is_rebuilt(tmp_path, mesh, teachers, capsys):
    dirs, models = teachers
    good = _build(dirs[:1], models[:1], _split(0), mesh, tmp_path / "cache")
    manifest_path = good.directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["checksums"]  # As an older kdjax wrote it.
    manifest_path.write_text(json.dumps(manifest))
    assert _build(dirs[:1], models[:1], _split(0), mesh, tmp_path / "cache").computed
    assert "manifest.json has no checksums" in capsys.readouterr().out


def test_too_large_a_cache_is_refused_naming_the_key(tmp_path, mesh, teachers):
    dirs, models = teachers
    split = _split(0)
    need = teacher_cache.estimate_bytes(split, num_teachers=2, num_labels=3,
                                        hidden_layers=(0, 2, 4), hidden_size=16)
    assert need["hidden"] == split.lengths.sum() * 3 * 16 * 4
    with pytest.raises(config_lib.ConfigError,
                       match=r"teacher\.cache_max_gb.*teacher\.cache_hidden=False"):
        _build(dirs, models, split, mesh, tmp_path / "cache", layers=(0, 2, 4),
               max_gb=0.9 * need["total"] / 1e9)
    assert not (tmp_path / "cache").exists()  # Refused before any work.
    assert _build(dirs, models, split, mesh, tmp_path / "cache", layers=(0, 2, 4),
                  max_gb=1.1 * need["total"] / 1e9).computed


@pytest.mark.parametrize("override, message", [
    ("teacher.cache_max_gb=0", "teacher.cache_max_gb"),
    ("teacher.cache_max_gb=-1", "teacher.cache_max_gb"),
])
def test_bad_cache_settings_are_refused(override, message):
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "kd.py"))
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        methods.validate(config_lib.apply_overrides(config, [override]))
    with pytest.raises(config_lib.ConfigError, match="teacher.cache' expects bool"):
        config_lib.apply_overrides(config, ["teacher.cache=maybe"])


# ------------------------------------------------------------------------------------------------
# Which stages are cached


def _stage_spec(recipe, stage, *overrides):
    config = config_lib.load_config(str(REPO_ROOT / "configs" / f"{recipe}.py"))
    config = config_lib.apply_overrides(config, list(overrides))
    return distill.LossSpec.from_config(config[stage].loss, methods=methods.loss_methods(),
                                        student_layers=2, teacher_layers=4,
                                        total_steps=1)


@pytest.mark.parametrize("recipe, stage, cache_hidden, reason", [
    ("kd", "distill", False, None),
    ("tinybert", "prediction", False, None),
    ("pkd_skip", "distill", False, "cache_hidden is off"),
    ("pkd_skip", "distill", True, None),
    ("distilbert", "distill", True, "mlm term"),
    ("kdabert", "distill", True, "discriminators"),
    ("tinybert", "intermediate", True, "attention"),
    ("baseline", "distill", True, "uses no teacher"),
])
def test_only_stages_with_fixed_inputs_are_cached(recipe, stage, cache_hidden, reason):
    spec = _stage_spec(recipe, stage)
    found = teacher_cache.uncacheable_reason(spec, cache_hidden=cache_hidden)
    if reason is None:
        assert found is None
    else:
        assert reason in found


def test_teacher_hidden_needs_are_exactly_the_layers_the_loss_indexes():
    # Uniform map 2 -> 4: student m <-> teacher 2m.
    spec = _stage_spec("kd", "distill", "distill.loss.embedding=1.0", "distill.loss.hidden=1.0")
    assert spec.needs.teacher_hidden == (0, 2, 4)
    # Patient KD skips the last pair: only teacher layer 2's [CLS].
    assert _stage_spec("pkd_skip", "distill").needs.teacher_hidden == (2,)
    assert distill.loss_spec(cosine=1.0, teacher_layers=4).needs.teacher_hidden == (4,)
    assert distill.loss_spec(soft=1.0, teacher_layers=4).needs.teacher_hidden == ()


# ------------------------------------------------------------------------------------------------
# The same student with and without the cache


STEP_SPECS = {
    # Hinton KD: logits only.
    "logits": dict(ce=0.5, soft=0.5, temperature=2.0),
    # Every hidden-state term: embedding, mapped layers, Patient KD's [CLS], last-layer cosine.
    "hidden": dict(embedding=1.0, hidden=1.0, pkd=10.0, cosine=1.0, soft_ce=1.0),
}


@pytest.mark.parametrize("kind", list(STEP_SPECS))
def test_steps_reading_the_cache_train_the_same_student(tmp_path, mesh, teachers, kind):
    dirs, models = teachers
    spec = distill.loss_spec(**STEP_SPECS[kind], total_steps=4, student_layers=2,
                             teacher_layers=TEACHER.num_hidden_layers,
                             layer_pairs=((1, 2), (2, 4)) if kind == "hidden" else ())
    layers = spec.needs.teacher_hidden
    split = _split(4, n=40)
    cache = _build(dirs, models, split, mesh, tmp_path / "cache", layers=layers)
    cached_spec = dataclasses.replace(spec, cached_hidden_layers=cache.hidden_layers)
    batcher = data.Batcher(split, 16, buckets=(12,), shuffle=True, seed=0)

    def train_student(step_spec, teacher_arg, batches):
        student = BertClassifier(distill.student_config(TEACHER, layers=2), 3,
                                 rngs=nnx.Rngs(1))
        module = distill.DistillStudent(student, None, rngs=nnx.Rngs(2))
        # Plain SGD: Adam would turn the float noise of gradients that are exactly zero in
        # exact arithmetic (the attention key bias: softmax ignores a shift shared by all
        # keys) into full learning-rate steps, in either run alike.
        state = sharding.replicate(train.TrainState.create(module, optax.sgd(0.1)), mesh)
        chex.clear_trace_counter()
        step = distill.make_distill_step(mesh, step_spec,
                                         chex.assert_max_traces(distill.distill_step, n=1))
        key = sharding.replicate(jax.random.key(0), mesh)
        for batch in batches:
            state, metrics = step(state, teacher_arg, sharding.shard_batch(batch, mesh), key)
        return jax.device_get(state.params), float(metrics["loss_sum"])

    batches = [b for e in range(2) for b in batcher.epoch(e)]  # 3 batches an epoch.
    with_teacher = sharding.replicate(distill.Teachers.create(models), mesh)
    reference, ref_loss = train_student(spec, with_teacher, batches)
    cached, cached_loss = train_student(cached_spec, None,  # No teacher at all.
                                        [cache.add_to_batch(b) for b in batches])
    assert cached_loss == pytest.approx(ref_loss, rel=1e-4)
    chex.assert_trees_all_close(cached, reference, rtol=1e-4, atol=1e-5)
    # The students did train: the parameters moved away from the initial ones.
    initial = nnx.state(BertClassifier(distill.student_config(TEACHER, layers=2), 3,
                                       rngs=nnx.Rngs(1)), nnx.Param)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(cached["model"]), jax.tree.leaves(initial)))
    assert moved > 1e-3


def test_distill_with_and_without_the_cache_gives_the_same_student(tmp_path, tiny_hf_dir,
                                                                  capsys):
    # A task teacher for the toy labels, used as it is (no fine-tuning run).
    teacher, _, _ = hf.load_pretrained(str(tiny_hf_dir), num_labels=2)
    teacher_dir = hf.save_pretrained(teacher, tmp_path / "teacher", label_names=["0", "1"],
                                     tokenizer=__import__("transformers").AutoTokenizer
                                     .from_pretrained(str(tiny_hf_dir)))
    train_file, dev_file = write_toy_task(tmp_path / "data", n_train=48, n_dev=16)
    base = config_lib.load_config(str(REPO_ROOT / "configs" / "kd.py"))

    def run(workdir, *overrides):
        config = config_lib.apply_overrides(base.copy_and_resolve_references(), [
            f"teacher.name={teacher_dir}", "data.task=toy", f"data.train_file={train_file}",
            f"data.dev_file={dev_file}", "data.max_length=16", "data.buckets=(16,)",
            "data.batch_size=16", "data.eval_batch_size=16", "optim.lr=1e-2",
            "train.max_steps=4", "train.log_every=2", "train.num_devices=2",
            "student.layers=1", "distill.loss.embedding=1.0", "distill.loss.hidden=1.0",
            "teacher.cache_hidden=True", *overrides])
        result = distill.distill(config, tmp_path / workdir, progress=False,
                                 measure_throughput=False)
        weights = safetensors.numpy.load_file(str(tmp_path / workdir / "model" /
                                                  "model.safetensors"))
        return result, weights, capsys.readouterr().out

    cached, cached_weights, out = run("cached")
    assert "stage distill: teacher outputs (logits and hidden layers [0, 2])" in out
    assert "computed now" in out
    directories = list((tmp_path / "cached" / "cache").iterdir())
    assert len(directories) == 1 and directories[0].name.startswith("teacher-outputs-")
    plain, plain_weights, out = run("plain", "teacher.cache=False")
    assert "no teacher-output cache" in out and "teacher.cache is off" in out
    assert not (tmp_path / "plain" / "cache").exists()
    assert cached["accuracy"] == plain["accuracy"]
    assert cached["teacher_accuracy"] == plain["teacher_accuracy"]
    # AdamW moves the attention key biases by float noise (their exact gradient is zero:
    # softmax ignores a shift shared by all keys), so they are left out; the outputs do not
    # depend on them.
    key_bias = [name for name in cached_weights if name.endswith("attention.self.key.bias")]
    assert key_bias
    for name in key_bias:
        del cached_weights[name], plain_weights[name]
    chex.assert_trees_all_close(cached_weights, plain_weights, rtol=1e-4, atol=1e-5)
    # Another seed sharing the cache directory: read back, the teacher does not run.
    mtime = (directories[0] / "manifest.json").stat().st_mtime_ns
    _, _, out = run("seed1", "train.seed=1",
                    f"teacher.cache_dir={tmp_path / 'cached' / 'cache'}")
    assert "reused" in out and "computing" not in out
    assert list((tmp_path / "cached" / "cache").iterdir()) == directories
    assert (directories[0] / "manifest.json").stat().st_mtime_ns == mtime
    assert not os.path.exists(tmp_path / "seed1" / "cache")

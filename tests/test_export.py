"""Exports a user can ship: named classes, the export self-check, the StableHLO artifact."""

import json

import numpy as np
import pytest

from conftest import write_toy_task
from kdjax import cli, data


# ------------------------------------------------------------------------------------------------
# Class names


def test_class_names_come_from_the_task_table_only_for_integer_labels():
    assert data.class_names("sst2", ["0", "1"]) == ["negative", "positive"]
    assert data.class_names("SST-2", ["0", "1"]) == ["negative", "positive"]
    assert data.class_names("cola", ["0", "1"]) == ["unacceptable", "acceptable"]
    # The local GLUE TSVs of RTE/MNLI hold the names themselves, sorted: kept as they are.
    assert data.class_names("mnli", ["contradiction", "entailment", "neutral"]) == [
        "contradiction", "entailment", "neutral"]
    # Integers that are not exactly 0..n-1 cannot be indices into the table.
    assert data.class_names("sst2", ["1", "2"]) == ["1", "2"]
    assert data.class_names("mytask", ["0", "1"]) == ["0", "1"]


def test_configured_class_names_override_and_are_checked():
    assert data.class_names("sst2", ["0", "1"], ("bad", "good")) == ["bad", "good"]
    with pytest.raises(data.DataError, match=r"has 3 names .* for 2 labels"):
        data.class_names("sst2", ["0", "1"], ("a", "b", "c"))
    with pytest.raises(data.DataError, match="distinct"):
        data.class_names("sst2", ["0", "1"], ("a", "a"))


# ------------------------------------------------------------------------------------------------
# One tiny fine-tuning run on an SST-2-like task, shared by the export tests


@pytest.fixture(scope="module")
def sst2_like_run(tmp_path_factory, tiny_hf_dir):
    """A 2-step fine-tune of the tiny model on toy files named as the task "sst2" (integer
    labels 0/1), so the exports must carry SST-2's class names."""
    root = tmp_path_factory.mktemp("sst2_like")
    train, dev = write_toy_task(root / "data", n_train=32, n_dev=8)
    args = [f"--config.model.name={tiny_hf_dir}", "--config.data.task=sst2",
            f"--config.data.train_file={train}", f"--config.data.dev_file={dev}",
            "--config.data.max_length=16", "--config.data.batch_size=16",
            "--config.data.eval_batch_size=16", "--config.train.num_devices=1"]
    workdir = root / "run"
    assert cli.main(["fine-tune", "--config", "configs/finetune.py", "--workdir", str(workdir),
                     "--no-progress", "--config.train.max_steps=2",
                     "--config.train.check_export=True", *args]) == 0
    return workdir, args, dev


def test_fine_tuned_model_answers_with_class_names_in_a_pipeline(sst2_like_run):
    import transformers

    workdir, _, _ = sst2_like_run
    config = json.loads((workdir / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    # train.check_export compared the saved model with transformers' PyTorch model.
    assert 0 <= json.loads((workdir / "eval.json").read_text())[
        "export_check_max_abs_difference"] <= 1e-4
    # The run's own label map keeps the values the files hold.
    assert json.loads((workdir / "labels.json").read_text()) == ["0", "1"]
    classify = transformers.pipeline("text-classification", model=str(workdir / "model"),
                                     device="cpu")
    answers = classify(["a wonderful film", "a dull boring film"])
    assert {a["label"] for a in answers} <= {"negative", "positive"}


# ------------------------------------------------------------------------------------------------
# kdjax export: the Hugging Face directory checks itself


def test_export_checks_itself_against_transformers(sst2_like_run, tmp_path, capsys):
    import torch
    import transformers

    from kdjax import train

    workdir, _, dev = sst2_like_run
    out = tmp_path / "hf"
    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check passed: max |logit difference|" in printed
    assert "transformers AutoModelForSequenceClassification (PyTorch)" in printed
    assert "8 dev examples of sst2" in printed
    # The same comparison, independently: the reloaded PyTorch model against the checkpoint.
    model, _, _, _ = train.load_run(workdir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sentences = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:]]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = reference(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    ours = np.asarray(model(batch["input_ids"], batch["attention_mask"],
                            batch["token_type_ids"]).logits)
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    assert json.loads((out / "config.json").read_text())["id2label"] == {
        "0": "negative", "1": "positive"}
    _assert_ordinary_modes(out)


def _assert_ordinary_modes(directory):
    """Every file has the mode open() gives under the umask (0644 under 022), the directory that
    plus search where readable (0755): not safetensors' 0600 or mkdtemp's 0700."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)  # Only read: restored at once.
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask


def test_export_check_fails_loudly_on_a_wrong_export(sst2_like_run, tmp_path):
    import transformers
    from safetensors.numpy import load_file, save_file

    from kdjax import hf, train

    workdir, _, _ = sst2_like_run
    model, _, _, _ = train.load_run(workdir)
    out = hf.save_pretrained(model, tmp_path / "hf", label_names=["negative", "positive"],
                             tokenizer=transformers.AutoTokenizer.from_pretrained(
                                 workdir / "model"))
    # A broken export: the classifier bias written 1e-3 off.
    tensors = load_file(str(out / "model.safetensors"))
    tensors["classifier.bias"] = tensors["classifier.bias"] + 1e-3
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"max \|difference\| 0\.001 > 0\.0001"):
        hf.check_with_transformers(model, out)


def test_export_says_the_check_was_skipped_without_torch(sst2_like_run, tmp_path, capsys,
                                                         monkeypatch):
    from kdjax import hf

    workdir, _, _ = sst2_like_run
    monkeypatch.setattr(hf, "import_torch", lambda: None)  # As where torch is not installed.
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf")]) == 0
    assert "check skipped: torch is not installed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# kdjax export --format stablehlo


def _run_artifact_without_kdjax(directory, input_ids, attention_mask, token_type_ids):
    """What a user's program does: jax.export.deserialize and a call; no kdjax model code."""
    import jax

    exported = jax.export.deserialize(bytearray((directory / "model.stablehlo").read_bytes()))
    return np.asarray(exported.call(input_ids, attention_mask, token_type_ids))


def test_stablehlo_artifact_reloads_and_matches_for_any_batch_and_length(sst2_like_run,
                                                                         tmp_path, capsys):
    import transformers

    from kdjax import train

    workdir, _, dev = sst2_like_run
    out = tmp_path / "shlo"
    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(workdir), "--format", "stablehlo",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check passed" in printed and "the kdjax model it was exported from" in printed
    assert json.loads((out / "labels.json").read_text())["id2label"] == {
        "0": "negative", "1": "positive"}
    signature = json.loads((out / "signature.json").read_text())
    assert [i["name"] for i in signature["inputs"]] == ["input_ids", "attention_mask",
                                                        "token_type_ids"]
    assert signature["max_length"] == 128 and "cpu" in signature["platforms"]
    _assert_ordinary_modes(out)

    model, _, _, _ = train.load_run(workdir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # Shipped beside the artifact.
    sentences = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:]]
    # Two batch sizes and lengths: one artifact serves them all (symbolic shapes).
    for texts, pad_to in ((sentences, None), (sentences[:3], 37)):
        batch = tokenizer(texts, padding="max_length" if pad_to else True, max_length=pad_to,
                          return_tensors="np")
        inputs = [batch[k].astype(np.int32)
                  for k in ("input_ids", "attention_mask", "token_type_ids")]
        theirs = _run_artifact_without_kdjax(out, *inputs)
        ours = np.asarray(model(*inputs).logits)
        assert theirs.shape == (len(texts), 2)
        np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_stablehlo_from_a_saved_bilstm_student(tmp_path, tiny_hf_dir):
    import transformers
    from flax import nnx

    from kdjax import export as export_lib
    from kdjax.models.bilstm import BiLSTMClassifier, BiLSTMConfig, save_bilstm

    config = BiLSTMConfig(vocab_size=30522, embedding_dim=8, hidden_size=6, mlp_size=10,
                          num_labels=2, pair=True, label_names=("negative", "positive"))
    student = BiLSTMClassifier(config, rngs=nnx.Rngs(0))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    saved = save_bilstm(student, tmp_path / "model", tokenizer=tokenizer)
    _assert_ordinary_modes(saved)
    result = export_lib.export(model_dir=str(saved), fmt="stablehlo")
    out = tmp_path / "model-stablehlo"
    assert result["out"] == str(out) and result["check"]["max_abs_difference"] <= 1e-5
    batch = tokenizer(["a fine film", "it was dull"], ["good", "the plot was boring and slow"],
                      padding=True, return_tensors="np")
    inputs = [batch[k].astype(np.int32) for k in ("input_ids", "attention_mask",
                                                    "token_type_ids")]
    np.testing.assert_allclose(_run_artifact_without_kdjax(out, *inputs),
                               np.asarray(student(*inputs).logits), atol=1e-5, rtol=0)
    assert json.loads((out / "labels.json").read_text())["id2label"]["1"] == "positive"


def test_export_refuses_hf_format_from_a_saved_model(sst2_like_run, capsys):
    workdir, _, _ = sst2_like_run
    assert cli.main(["export", "--model", str(workdir / "model")]) == 2
    err = capsys.readouterr().err
    assert "is already a saved model; --model exports to --format stablehlo" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# kdjax eval needs only the dev file


def test_eval_runs_with_only_a_dev_file(sst2_like_run, tmp_path, capsys):
    workdir, args, dev = sst2_like_run
    dev_only = [a for a in args if not a.startswith("--config.data.train_file=")]
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(workdir / "model"), *dev_only]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    fine_tuned = json.loads((workdir / "eval.json").read_text())
    assert evaluated["examples"] == fine_tuned["examples"] == 8
    assert evaluated["accuracy"] == fine_tuned["accuracy"]
    assert evaluated["loss"] == pytest.approx(fine_tuned["loss"], abs=1e-5)

    # A dev file holding one class only cannot give a two-class model's label map: one line.
    one_class = tmp_path / "dev.tsv"
    one_class.write_text("sentence\tlabel\ngood film\t1\n")
    assert cli.main(["eval", "--model", str(workdir / "model"), *dev_only,
                     f"--config.data.dev_file={one_class}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "read from the dev file alone: no data.train_file" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------
# eval.json: the student's and the teacher's metrics side by side


def _reference_metrics(predictions, labels):
    """Binary accuracy, F1 of class 1 and Matthews correlation, written out from the counts."""
    tp = np.sum((predictions == 1) & (labels == 1))
    tn = np.sum((predictions == 0) & (labels == 0))
    fp = np.sum((predictions == 1) & (labels == 0))
    fn = np.sum((predictions == 0) & (labels == 1))
    denominator = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return {"accuracy": (tp + tn) / len(labels), "f1": 2 * tp / (2 * tp + fp + fn),
            "mcc": (tp * tn - fp * fn) / denominator if denominator else 0.0}


def test_compare_on_dev_reports_student_and_teacher_symmetrically(sst2_like_run, tiny_hf_dir):
    from flax import nnx

    from kdjax import hf, sharding, train
    from kdjax.engine import run as engine_run

    workdir, args, _ = sst2_like_run
    config = cli_config(args)
    inputs = train.prepare_task(config)
    teacher, _, _ = hf.load_pretrained(str(workdir / "model"))
    student = hf.load_pretrained(str(tiny_hf_dir), num_labels=2, seed=3)[0]
    mesh = sharding.make_mesh(1)
    result = engine_run.compare_on_dev(student, [teacher], inputs, mesh, 16)
    assert result["student_metrics"].keys() == result["teacher_metrics"].keys() == {
        "accuracy", "f1", "mcc"}
    labels = inputs.dev.labels
    for model, key in ((student, "student_metrics"), (teacher, "teacher_metrics")):
        dev = inputs.dev
        mask = (np.arange(dev.input_ids.shape[1])[None] < dev.lengths[:, None]).astype(np.int32)
        logits = model(dev.input_ids, mask, dev.token_type_ids).logits
        expected = _reference_metrics(np.asarray(logits).argmax(-1), labels)
        for name, value in expected.items():
            assert result[key][name] == pytest.approx(value, abs=1e-6), (key, name)
    assert all(result[name] == result["student_metrics"][name] for name in ("accuracy", "mcc"))


def cli_config(args):
    from kdjax import config as config_lib

    return config_lib.apply_overrides(config_lib.load_config("configs/finetune.py"), args)


def test_the_check_compares_weights_not_bfloat16_rounding(tiny_hf_dir, tmp_path):
    import transformers

    from kdjax import hf

    # A bfloat16-computing model: its own logits carry bfloat16 rounding, but what it saved are
    # float32 weights, and the check runs them in float32.
    model, _, _ = hf.load_pretrained(str(tiny_hf_dir), dtype="bfloat16")
    out = hf.save_pretrained(model, tmp_path / "hf", label_names=["neg", "neu", "pos"],
                             tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_hf_dir))
    assert hf.check_with_transformers(model, out, ["a fine film"], ["a dull plot"]) <= 1e-4


# ------------------------------------------------------------------------------------------------
# train.export_every_eval


def test_export_every_eval_writes_the_best_model_so_far(sst2_like_run, tmp_path):
    import transformers

    from kdjax import config as config_lib, hf

    _, args, _ = sst2_like_run
    workdir = tmp_path / "run"
    assert cli.main(["fine-tune", "--config", "configs/finetune.py", "--workdir", str(workdir),
                     "--no-progress", "--config.train.max_steps=3", "--config.optim.lr=1e-3",
                     "--config.data.holdout_fraction=0.25", "--config.train.holdout_every=1",
                     "--config.train.export_every_eval=True", *args]) == 0
    best = json.loads((workdir / "eval.json").read_text())["selected_step"]
    saved = json.loads((workdir / "best_model" / "kdjax.json").read_text())
    assert saved["step"] == best
    # best_model/ is the selected state: the same weights as the run's final model/.
    final, _, _ = hf.load_pretrained(str(workdir / "model"))
    exported, _, _ = hf.load_pretrained(str(workdir / "best_model"))
    for a, b in zip(hf.to_hf_tensors(final), hf.to_hf_tensors(exported)):
        np.testing.assert_array_equal(a[1], b[1])
    assert transformers.AutoConfig.from_pretrained(workdir / "best_model").id2label[1] == (
        "positive")

    with pytest.raises(config_lib.ConfigError, match="export_every_eval' exports at each"):
        config_lib.validate(config_lib.apply_overrides(
            config_lib.load_config("configs/finetune.py"), ["train.export_every_eval=True"]))

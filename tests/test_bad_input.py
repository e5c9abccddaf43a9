"""Bad inputs, tried as a new user would: every one ends the command with one line on stderr that
names the problem (`kdjax CMD: error: ...`), exit status 2, and leaves every file that was there
before exactly as it was. A damaged teacher cache is the exception that is not an error: it is
rebuilt, with one line saying so.

The commands run in-process (`cli.main`, the same code as `bin/kdjax`) on a tiny random model
and files of a few lines, so the whole suite takes seconds; two real subprocesses check the exit
status of `bin/kdjax` itself.
"""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT
from kdjax import cli, hf, sharding, teacher_cache
from kdjax.models.bert import BertClassifier, BertConfig

# The tiny teacher (conftest.tiny_hf_dir) is a classifier for these labels, so a distillation
# on data with them uses it as it is instead of fine-tuning it first.
LABELS = ("neg", "neu", "pos")
TRAIN_TSV = "sentence\tlabel\n" + "".join(
    f"the film was {word}\t{label}\n"
    for word, label in [("bad", "neg"), ("fine", "neu"), ("good", "pos")] * 4)
DEV_TSV = "sentence\tlabel\nit was bad\tneg\nit was good\tpos\nit was fine\tneu\n"


# ------------------------------------------------------------------------------------------------
# Helpers


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `root` ("<dir>" for directories)."""
    return {str(p.relative_to(root)): "<dir>" if p.is_dir()
            else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def case(tmp_path, tiny_hf_dir):
    """A user's folder: data files, a copy of the tiny model and a workdir holding a file."""
    root = tmp_path / "user"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.tsv").write_text(TRAIN_TSV)
    (root / "data" / "dev.tsv").write_text(DEV_TSV)
    shutil.copytree(tiny_hf_dir, root / "model")
    (root / "run").mkdir()
    (root / "run" / "notes.txt").write_text("a file the user keeps in the run directory\n")
    return root


def fine_tune_args(root: pathlib.Path, *overrides: str) -> list[str]:
    return ["fine-tune", "--config", str(REPO_ROOT / "configs" / "finetune.py"),
            "--workdir", str(root / "run"), "--no-progress", *_task(root), *overrides]


def distill_args(root: pathlib.Path, *overrides: str, recipe: str = "kd") -> list[str]:
    return ["distill", "--config", str(REPO_ROOT / "configs" / f"{recipe}.py"),
            "--workdir", str(root / "run"), "--no-progress", *_task(root, "teacher"),
            "--config.student.layers=1", *overrides]


def _task(root: pathlib.Path, model_key: str = "model") -> list[str]:
    return [f"--config.{model_key}.name={root / 'model'}", "--config.data.task=toy",
            f"--config.data.train_file={root / 'data' / 'train.tsv'}",
            f"--config.data.dev_file={root / 'data' / 'dev.tsv'}",
            "--config.data.max_length=16", "--config.data.batch_size=8",
            "--config.data.eval_batch_size=8", "--config.train.num_devices=1"]


def refused(argv: list[str], root: pathlib.Path, capsys, *, may_add: tuple[str, ...] = ()
            ) -> str:
    """Runs `kdjax ARGV` in-process; asserts exit 2, one stderr line, no traceback and every
    file under `root` unchanged, none added but `may_add`; returns the message after 'error: '.
    """
    before = snapshot(root)
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    prefix = f"kdjax {argv[0]}: error: "
    assert lines[0].startswith(prefix), err
    after = snapshot(root)
    for added in may_add:
        after.pop(added, None)
    assert after == before
    return lines[0][len(prefix):]


def write(path: pathlib.Path, content: str | bytes) -> pathlib.Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# ------------------------------------------------------------------------------------------------
# Data files


DATA_CASES = {
    # name: (file name, content, extra overrides, message)
    "missing_file": ("absent.tsv", None, (), "{data}/absent.tsv: file not found"),
    "empty_file": ("train.tsv", "", (), "{data}/train.tsv: empty file (no header row)"),
    "header_only": ("train.tsv", "sentence\tlabel\n", (), "{data}/train.tsv: no data rows"),
    "missing_column": ("train.tsv", "text\tlabel\nhi\tpos\n", (),
                       "{data}/train.tsv line 1: missing column 'sentence' (columns present: "
                       "['text', 'label'])"),
    "non_utf8_byte": ("train.tsv", b"sentence\tlabel\nok\tpos\nbad \xff byte\tneg\n", (),
                      "{data}/train.tsv line 3: not valid UTF-8 (byte 0xff at column 5)"),
    "empty_label": ("train.tsv", "sentence\tlabel\nok\tpos\nno label\t\n", (),
                    "{data}/train.tsv line 3: empty label in column 'label'"),
    "stray_tab": ("train.tsv", "sentence\tlabel\nok\tpos\na\ttab inside\tneg\n", (),
                  "{data}/train.tsv line 3: 3 fields, expected 2 (a tab inside a text?)"),
    "broken_jsonl_line": ("train.jsonl", '{"sentence": "ok", "label": "pos"}\n'
                                         '{"sentence": "cut off", "label": \n', (),
                          "{data}/train.jsonl line 2: invalid JSON (Expecting value at "
                          "column 35)"),
    "jsonl_not_an_object": ("train.jsonl", '["ok", "pos"]\n', (),
                            "{data}/train.jsonl line 1: expected a JSON object, got list"),
    "unsupported_extension": ("train.txt", "ok pos\n", (),
                              "{data}/train.txt: unsupported file type '.txt'; expected one of "
                              "('.tsv', '.csv', '.jsonl')"),
    # The same two-line quoted field under each quoting rule: GLUE's `none` reads the quote as
    # text and finds a line cut short; `csv` reads it (see test_quoted_multiline_field_reads_
    # under_quoting_csv); and under `csv`, GLUE-style bare quotes are refused naming `none`.
    "multiline_field_quoting_none": (
        "train.tsv", 'sentence\tlabel\n"two\nlines"\tpos\n', ("--config.data.quoting=none",),
        "{data}/train.tsv line 2: 1 field, expected 2 (a quoted field holding a tab or a "
        "line break? set data.quoting=csv)"),
    "unclosed_quote_quoting_csv": (
        "train.tsv", 'sentence\tlabel\n"never closed\tpos\nok\tneg\n',
        ("--config.data.quoting=csv",),
        "{data}/train.tsv line 2: a quoted field is not closed before the end of the file "
        "(bare quote characters that are text? set data.quoting=none)"),
    "bare_quotes_quoting_csv": (
        "train.csv", 'sentence,label\n"Hi" he said,pos\n', (),
        "{data}/train.csv line 2: malformed quoted field (',' expected after '\"') (bare quote "
        "characters that are text? set data.quoting=none)"),
    "unknown_dev_label": ("dev.tsv", "sentence\tlabel\nfine\tneu\nodd\tmaybe\n", (),
                          'unknown label "maybe" in {data}/dev.tsv line 3; labels seen in '
                          "training: ['neg', 'neu', 'pos']"),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_file(case, capsys, name):
    file_name, content, overrides, message = DATA_CASES[name]
    split = "dev" if file_name.startswith("dev") else "train"
    path = case / "data" / file_name
    if content is not None:
        write(path, content)
    args = fine_tune_args(case, f"--config.data.{split}_file={path}", *overrides)
    assert refused(args, case, capsys) == message.format(data=case / "data")


def test_quoted_multiline_field_reads_under_quoting_csv(case):
    """The file refused under quoting=none above reads under csv (the data step only: a
    training run is not needed to show it)."""
    from kdjax import data

    path = write(case / "data" / "train.tsv",
                 'sentence\tlabel\n"two\nlines"\tpos\nok\tneg\n"a\ttab"\tneu\n')
    task = data.load_task("toy", train_file=str(path), dev_file=str(case / "data" / "dev.tsv"),
                          quoting="csv")
    assert [e.text_a for e in task.splits["train"]] == ["two\nlines", "ok", "a\ttab"]


def test_byte_order_mark_in_the_header_is_ignored(case):
    from kdjax import data

    path = write(case / "data" / "train.tsv", b"\xef\xbb\xbf" + TRAIN_TSV.encode())
    task = data.load_task("toy", train_file=str(path), dev_file=str(case / "data" / "dev.tsv"))
    assert task.label_names == list(LABELS)


# ------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("override, message", [
    ("--config.data.no_such_key=1", "unknown config key 'data.no_such_key'; known here: "),
    ("--config.optim.lr=-1", "config key 'optim.lr' must be > 0, got -1.0"),
    ("--config.data.max_length=1", "config key 'data.max_length' must be 0 for auto, or in "
                                   "[2, 512], got 1"),
    ("--config.data.quoting=tsv", "config key 'data.quoting' must be 'auto', 'none' or 'csv', "
                                  "got 'tsv'"),
    ("--config.data.batch_size=eight", "config key 'data.batch_size' expects int, got 'eight'"),
])
def test_bad_config_value(case, capsys, override, message):
    assert refused(fine_tune_args(case, override), case, capsys).startswith(message)


def test_missing_config_file(case, capsys):
    args = fine_tune_args(case)
    args[args.index("--config") + 1] = str(case / "no_such_config.py")
    assert refused(args, case, capsys) == f"config file {case / 'no_such_config.py'} not found"


def test_layer_map_that_does_not_fit(case, capsys):
    # The tiny teacher has 2 layers; PKD-Skip pairs student layer m with teacher layer m * 2 / M.
    message = refused(distill_args(case, "--config.student.layers=3", recipe="pkd_skip"),
                      case, capsys)
    assert message.startswith("layer map 'skip': the student has 3 layers, the teacher 2"), message


def test_teacher_cache_over_the_size_limit(case, capsys):
    # The size is known only once the stage's examples are, after the run has claimed its
    # workdir and written its records (a gap of the workdir's checks, not of this one): those
    # two files and the workdir's lock file (empty, left in place by every run) may appear.
    message = refused(distill_args(case, "--config.teacher.cache_max_gb=1e-9"), case, capsys,
                      may_add=("run/config.json", "run/labels.json", "run/.kdjax.lock"))
    assert message.startswith("the teacher-output cache for stage distill would take "), message
    assert "more than config key 'teacher.cache_max_gb' = 1e-09" in message


# ------------------------------------------------------------------------------------------------
# Models


def _edit_config(model_dir: pathlib.Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def test_missing_model_directory(case, capsys):
    message = refused(fine_tune_args(case, f"--config.model.name={case / 'no_model'}"),
                      case, capsys)
    assert message == (f"model directory {case / 'no_model'}: not found (a checkpoint directory "
                       "holds config.json and model.safetensors)")


def test_truncated_model_safetensors(case, capsys):
    weights = case / "model" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    message = refused(fine_tune_args(case), case, capsys)
    assert message.startswith(f"{weights}: unreadable safetensors file ("), message
    assert message.endswith("truncated or damaged? download or export it again)"), message


def test_truncated_pytorch_model_bin(case, capsys):
    import torch
    from safetensors.torch import load_file

    weights = case / "model" / "pytorch_model.bin"
    torch.save(load_file(str(case / "model" / "model.safetensors")), weights)
    (case / "model" / "model.safetensors").unlink()
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    message = refused(fine_tune_args(case), case, capsys)
    assert message == (f"{weights}: unreadable PyTorch checkpoint (RuntimeError: "
                       "PytorchStreamReader failed reading zip archive: failed finding central "
                       "directory; truncated or damaged?)")


def test_unsupported_architecture(case, capsys):
    _edit_config(case / "model", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    message = refused(fine_tune_args(case), case, capsys)
    assert message == (f"{case / 'model' / 'config.json'}: model_type 'gpt2' is not supported; "
                       "kdjax's encoder implements the BERT architecture ('bert')")


def test_unreadable_model_config(case, capsys):
    write(case / "model" / "config.json", '{"model_type": "bert", ')
    message = refused(fine_tune_args(case), case, capsys)
    assert message.startswith(f"{case / 'model' / 'config.json'}: not valid JSON ("), message


def test_labels_that_do_not_match_the_models_head(case, capsys):
    # The model's head says neg/neu/pos; this task's labels are 0/1.
    write(case / "data" / "train.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    write(case / "data" / "dev.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    args = ["eval", "--model", str(case / "model"), *_task(case)[1:]]
    assert refused(args, case, capsys) == (
        f"{case / 'model'} was trained with labels ['neg', 'neu', 'pos'], but the task 'toy' "
        "has labels ['0', '1']")


def test_extra_teacher_for_other_labels(case, capsys):
    shutil.copytree(case / "model", case / "other_labels")
    _edit_config(case / "other_labels", id2label={"0": "a", "1": "b", "2": "c"},
                 label2id={"a": 0, "b": 1, "c": 2})
    message = refused(distill_args(case, f"--config.teacher.extra=({case / 'other_labels'},)"),
                      case, capsys)
    assert message == (f"teacher.extra {case / 'other_labels'} is not fine-tuned for this "
                       "task's labels ['neg', 'neu', 'pos']")


def test_teachers_whose_tokenizers_differ(case, capsys):
    """kdjax has no separate student tokenizer (the student reads the first teacher's token
    ids); teachers of an ensemble must share that tokenizer."""
    import transformers

    other = case / "other_tokenizer"
    shutil.copytree(case / "model", other)
    for name in ("tokenizer.json", "vocab.txt"):
        (other / name).unlink(missing_ok=True)
    vocab = write(case / "vocab.txt", "\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(other)
    vocab.unlink()
    message = refused(distill_args(case, f"--config.teacher.extra=({other},)"), case, capsys)
    assert message.startswith(f"teacher.extra {other} has another tokenizer than the first "
                              f"teacher {case / 'model'} ("), message
    assert "vs 30522 tokens, e.g. " in message


def test_an_extra_teacher_with_the_same_labels_and_tokenizer_is_accepted(case):
    """The control of the two refusals above: a copy of the first teacher passes both checks."""
    import ml_collections

    from kdjax.engine.teachers import prepare_teachers

    shutil.copytree(case / "model", case / "copy")
    config = ml_collections.ConfigDict({"teacher": {
        "name": str(case / "model"), "seeds": (0,), "extra": (str(case / "copy"),)}})
    assert prepare_teachers(config, case / "run", list(LABELS)) == [case / "model",
                                                                    case / "copy"]


# ------------------------------------------------------------------------------------------------
# Runs


def test_export_of_a_workdir_without_a_checkpoint(case, capsys):
    run = case / "run"
    write(run / "config.json", json.dumps({"model": {"name": str(case / "model")}}))
    write(run / "labels.json", json.dumps(list(LABELS)))
    message = refused(["export", "--workdir", str(run)], case, capsys)
    assert message == (f"{run}: no checkpoint to export ({run / 'checkpoints'} is missing or "
                       "holds no finished step); run or resume the training first")


def test_export_of_a_directory_that_is_no_run(case, capsys):
    message = refused(["export", "--workdir", str(case / "data")], case, capsys)
    assert message == (f"{case / 'data' / 'config.json'} not found; is {case / 'data'} a kdjax "
                       "run directory?")


def test_damaged_teacher_cache_is_rebuilt_saying_so(tmp_path, capsys):
    """Not an error: values overwritten in place (size and header intact) are found by the
    manifest's checksum, the cache is rebuilt with one line saying so, and the values are right."""
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    model = BertClassifier(config, 3, rngs=nnx.Rngs(0))
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "config.json").write_text("{}")
    from safetensors.numpy import save_file
    save_file(dict(hf.to_hf_tensors(model)), str(teacher_dir / "model.safetensors"))
    lengths = np.array([3, 5, 4, 6], np.int32)
    ids = np.where(np.arange(8)[None] < lengths[:, None], 5, 0).astype(np.int32)
    from kdjax import data
    split = data.EncodedSplit(ids, np.zeros_like(ids), lengths, np.zeros(4, np.int32))
    mesh = sharding.make_mesh(1)

    def build():
        return teacher_cache.load_or_compute([teacher_dir], [model], split, mesh=mesh,
                                             cache_dir=tmp_path / "cache", batch_size=4,
                                             buckets=(8,))

    good = build()
    outputs = good.directory / "outputs.safetensors"
    size = outputs.stat().st_size
    with open(outputs, "r+b") as f:
        f.seek(size - 12)
        f.write(np.full(3, 99.0, np.float32).tobytes())
    assert outputs.stat().st_size == size
    capsys.readouterr()
    again = build()
    said = [line for line in capsys.readouterr().out.splitlines() if "rebuilding" in line]
    assert said == [f"teacher-output cache {good.directory} is not usable: the data of logits in "
                    "outputs.safetensors do not match the checksums in manifest.json (changed or "
                    "damaged after they were written); rebuilding it"]
    assert again.computed
    np.testing.assert_array_equal(again.logits, good.logits)


# ------------------------------------------------------------------------------------------------
# The real command


@pytest.mark.parametrize("make_args, message", [
    # A key this checkout has: the subprocess must import this kdjax, not an installed one.
    (lambda root: fine_tune_args(root, "--config.data.quoting=tsv"),
     "config key 'data.quoting' must be 'auto', 'none' or 'csv', got 'tsv'"),
    (lambda root: ["export", "--workdir", str(root / "run")], "config.json not found"),
], ids=["out_of_range_value", "export_of_no_run"])
def test_bin_kdjax_exits_2_with_one_line(case, make_args, message):
    before = snapshot(case)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bin" / "kdjax"), *make_args(case)],
                          capture_output=True, text=True, timeout=300, cwd=case)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert snapshot(case) == before

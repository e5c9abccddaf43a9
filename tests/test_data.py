"""Tests for kdjax.data: file reading, label maps, errors, GLUE loading, encoding, batching."""

import json

import numpy as np
import pytest

from kdjax import data
from kdjax.data import Batcher, DataError, EncodedSplit, Example


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Reading files


def test_read_tsv_single_keeps_quotes(tmp_path):
    # GLUE TSVs have bare quotes; QUOTE_NONE must keep them as text, not parse them.
    path = _write(tmp_path / "train.tsv",
                  'sentence\tlabel\n"quoted" start \t1\nit \'s "odd\t0\n\t1\n')
    examples, labels = data.read_examples(path, ["sentence"], "label")
    assert labels == ["0", "1"]
    assert examples == [Example('"quoted" start ', None, 1), Example('it \'s "odd', None, 0),
                        Example("", None, 1)]  # an empty text is allowed


def test_read_csv_pair_with_quoted_multiline_field(tmp_path):
    path = _write(tmp_path / "pairs.csv",
                  'id,premise,hypothesis,gold\n'
                  '1,"a, b","two\nlines",entail\n'
                  '2,c,d,neutral\n')
    examples, labels = data.read_examples(path, ["premise", "hypothesis"], "gold")
    assert labels == ["entail", "neutral"]
    assert examples == [Example("a, b", "two\nlines", 0), Example("c", "d", 1)]


def test_read_jsonl_pair_with_int_and_string_labels(tmp_path):
    rows = [{"q": "x?", "a": "y", "label": 2}, {"q": "z?", "a": "", "label": "0"}]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples, labels = data.read_examples(path, ["q", "a"], "label")
    assert labels == ["0", "2"]
    assert examples == [Example("x?", "y", 1), Example("z?", "", 0)]


def test_int_labels_ordered_numerically(tmp_path):
    path = _write(tmp_path / "t.tsv", "sentence\tlabel\na\t10\nb\t2\nc\t-1\nd\t02\n")
    examples, labels = data.read_examples(path, ["sentence"], "label")
    assert labels == ["-1", "2", "10"]  # not string order, and "02" is the class 2
    assert [e.label for e in examples] == [2, 1, 0, 1]


def test_string_labels_sorted_and_reused_map(tmp_path):
    train = _write(tmp_path / "train.tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tneutral\n")
    dev = _write(tmp_path / "dev.tsv", "sentence\tlabel\nd\tneutral\n")
    _, labels = data.read_examples(train, ["sentence"], "label")
    assert labels == ["neg", "neutral", "pos"]
    examples, dev_labels = data.read_examples(dev, ["sentence"], "label", label_names=labels)
    assert dev_labels == labels
    assert examples[0].label == 1  # train's index, not a fresh map built from dev


def test_unlabelled(tmp_path):
    path = _write(tmp_path / "test.tsv", "index\tsentence\n0\thello\n")
    examples, labels = data.read_examples(path, ["sentence"], None)
    assert examples == [Example("hello", None, -1)] and labels == []


# ------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: file not found"):
        data.read_examples(tmp_path / "nope.tsv", ["sentence"], "label")


def test_missing_column_names_column_and_present_columns(tmp_path):
    path = _write(tmp_path / "train.tsv", "text\tlabel\na\t0\n")
    with pytest.raises(DataError) as e:
        data.read_examples(path, ["sentence"], "label")
    msg = str(e.value)
    assert "train.tsv" in msg and "missing column 'sentence'" in msg and "['text', 'label']" in msg


@pytest.mark.parametrize("content, problem", [("sentence\tlabel\n", "no data rows"),
                                              ("", "empty file")])
def test_empty_dataset(tmp_path, content, problem):
    path = _write(tmp_path / "train.tsv", content)
    with pytest.raises(DataError, match=f"train.tsv: {problem}"):
        data.read_examples(path, ["sentence"], "label")


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff byte\t0\n")
    with pytest.raises(DataError, match=r"train\.tsv line 3: not valid UTF-8 \(byte 0xff"):
        data.read_examples(path, ["sentence"], "label")


def test_unknown_dev_label(tmp_path):
    lines = "".join(f"s{i}\t{i % 2}\n" for i in range(15)) + "bad\tx\n"
    dev = _write(tmp_path / "dev.tsv", "sentence\tlabel\n" + lines)
    with pytest.raises(DataError) as e:
        data.read_examples(dev, ["sentence"], "label", label_names=["0", "1"])
    assert 'unknown label "x" in ' in str(e.value)
    assert "dev.tsv line 17; labels seen in training: ['0', '1']" in str(e.value)


def test_jsonl_missing_value_names_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"label": 0}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: missing value for 'text' "
                                        r"\(keys present: \['label'\]\)"):
        data.read_examples(path, ["text"], "label")


def test_wrong_number_of_text_columns(tmp_path):
    path = _write(tmp_path / "t.tsv", "a\tb\tc\tlabel\n1\t2\t3\t0\n")
    with pytest.raises(DataError, match=r"t\.tsv: expected 1 or 2 text columns, got 3"):
        data.read_examples(path, ["a", "b", "c"], "label")


def test_stray_delimiter_is_an_error(tmp_path):
    path = _write(tmp_path / "t.tsv", "sentence\tlabel\nok\t1\na\ttab inside\t0\n")
    with pytest.raises(DataError,
                       match=r"t\.tsv line 3: 3 fields, expected 2 \(a tab inside a text\?\)"):
        data.read_examples(path, ["sentence"], "label")


def test_quoting_csv_reads_tabs_quotes_and_line_breaks_in_a_tsv(tmp_path):
    path = _write(tmp_path / "t.tsv", 'sentence\tlabel\n"a\ttab, ""quoted""\nand a break"\t1\n'
                                      'plain "bare" quote\t0\n')
    examples, _ = data.read_examples(path, ["sentence"], "label", quoting="csv")
    assert examples == [Example('a\ttab, "quoted"\nand a break', None, 1),
                        Example('plain "bare" quote', None, 0)]  # mid-field quotes are text


def test_quoting_none_keeps_quotes_in_a_csv(tmp_path):
    path = _write(tmp_path / "t.csv", 'sentence,label\n"hi" she said,1\n')
    examples, _ = data.read_examples(path, ["sentence"], "label", quoting="none")
    assert examples == [Example('"hi" she said', None, 0)]
    # Read as csv (the default for .csv), the quote that opens the field must close it.
    with pytest.raises(DataError, match=r"t\.csv line 2: malformed quoted field .*"
                                        r"set data\.quoting=none\)$"):
        data.read_examples(path, ["sentence"], "label")


def test_quoted_field_under_quoting_none_names_the_option(tmp_path):
    path = _write(tmp_path / "t.tsv", 'sentence\tlabel\nok\t1\n"a\tb"\t0\n')
    with pytest.raises(DataError, match=r"t\.tsv line 3: 3 fields, expected 2 \(a quoted field "
                                        r"holding a tab or a line break\? set data\.quoting=csv\)"):
        data.read_examples(path, ["sentence"], "label")
    examples, _ = data.read_examples(path, ["sentence"], "label", quoting="csv")
    assert examples[1] == Example("a\tb", None, 0)


def test_unclosed_quote_under_quoting_csv_names_its_line(tmp_path):
    path = _write(tmp_path / "t.tsv", 'sentence\tlabel\nok\t1\n"never closed\t0\nx\t1\n')
    with pytest.raises(DataError, match=r"t\.tsv line 3: a quoted field is not closed before the "
                                        r"end of the file \(.*set data\.quoting=none\)"):
        data.read_examples(path, ["sentence"], "label", quoting="csv")


def test_byte_order_mark_in_header_is_ignored(tmp_path):
    for name, text in (("t.tsv", "sentence\tlabel\nx\t1\n"), ("t.csv", "sentence,label\nx,1\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        for quoting in ("none", "csv"):
            examples, _ = data.read_examples(path, ["sentence"], "label", quoting=quoting)
            assert examples == [Example("x", None, 0)]


# ------------------------------------------------------------------------------------------------
# Tasks


def test_load_task_local_files_share_train_map(tmp_path):
    train = _write(tmp_path / "train.jsonl", '{"a": "x", "b": "y", "y": "yes"}\n'
                                             '{"a": "p", "b": "q", "y": "no"}\n')
    dev = _write(tmp_path / "dev.csv", "a,b,y\nm,n,yes\n")
    task = data.load_task("mine", train_file=str(train), dev_file=str(dev),
                          text_columns=("a", "b"), label_column="y")
    assert task.name == "mine" and task.is_pair and task.label_names == ["no", "yes"]
    assert task.num_labels == 2
    assert task.splits["dev"] == [Example("m", "n", 1)]

    bad_dev = _write(tmp_path / "dev2.csv", "a,b,y\nm,n,maybe\n")
    with pytest.raises(DataError, match=r'unknown label "maybe" in .*dev2\.csv line 2'):
        data.load_task(train_file=str(train), dev_file=str(bad_dev), text_columns=("a", "b"),
                       label_column="y")


def test_load_task_requested_split_needs_a_file(tmp_path):
    train = _write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\n")
    with pytest.raises(DataError, match="split 'dev' requested but no dev_file given"):
        data.load_task(train_file=str(train))
    task = data.load_task(train_file=str(train), splits=("train",))
    assert list(task.splits) == ["train"] and task.label_names == ["0"]


def test_find_local_glue_dir_prefers_env(tmp_path, monkeypatch):
    (tmp_path / "rte").mkdir()
    monkeypatch.setenv("KDJAX_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    # dev.tsv still missing: the env folder is skipped (a later candidate, such as the shared
    # data beside the repository, may still hold the task).
    assert data.find_local_glue_dir("rte") != tmp_path / "rte"
    for name in ("train.tsv", "dev.tsv"):
        _write(tmp_path / "rte" / name,
               "sentence1\tsentence2\tlabel\na\tb\tentailment\nc\td\tnot_entailment\n")
    assert data.find_local_glue_dir("rte") == tmp_path / "rte"
    task = data.load_task("RTE")
    assert task.is_pair and task.label_names == ["entailment", "not_entailment"]
    assert task.splits["dev"][1] == Example("c", "d", 1)


def test_headerless_tsv_named_by_header(tmp_path):
    # CoLA's layout: no header row, four columns, the label in column 1, the text in column 3.
    path = _write(tmp_path / "train.tsv",
                  'gj04\t1\t\tOur friends won\'t buy "this" analysis.\nclc95\t0\t*\tThey drank.\n')
    examples, labels = data.read_examples(path, ["sentence"], "label",
                                          header=data.GLUE_HEADERLESS["cola"])
    assert labels == ["0", "1"]
    assert examples == [Example('Our friends won\'t buy "this" analysis.', None, 1),
                        Example("They drank.", None, 0)]
    # Read as if it had a header, the first sentence would have become column names.
    with pytest.raises(DataError, match=r"line 1: missing column 'sentence'"):
        data.read_examples(path, ["sentence"], "label")
    bad = _write(tmp_path / "bad.tsv", "gj04\t1\t\tok\nclc95\t0\tno mark column\n")
    with pytest.raises(DataError, match=r"bad\.tsv line 2: 3 fields, expected 4"):
        data.read_examples(bad, ["sentence"], "label", header=data.GLUE_HEADERLESS["cola"])


def _shared_glue(task):
    local = data.find_local_glue_dir(task)
    if local is None:
        pytest.skip(f"no local GLUE {task} copy (../shared/data/{task})")
    return local


def test_local_cola_as_glue_distributes_it():
    _shared_glue("cola")
    task = data.load_task("cola")
    train, dev = task.splits["train"], task.splits["dev"]
    # Counts from ../shared/data/README.md (GLUE's own figures).
    assert (len(train), len(dev)) == (8551, 1043)
    assert task.label_names == ["0", "1"] and not task.is_pair
    assert sum(e.label for e in train) == 6023 and sum(e.label for e in dev) == 721
    assert all(e.text_a and e.text_b is None for e in train)


def test_task_metric():
    assert data.task_metric("CoLA") == "mcc" and data.task_metric("cola") == "mcc"
    assert data.task_metric("sst2") == data.task_metric("rte") == data.task_metric("mine") \
        == "accuracy"


def test_local_rte_keeps_quote_characters():
    local = _shared_glue("rte")
    task = data.load_task("rte")
    train, dev = task.splits["train"], task.splits["dev"]
    assert (len(train), len(dev)) == (2490, 277) and task.is_pair
    assert task.label_names == ["entailment", "not_entailment"]  # the hub's ClassLabel order
    raw = (local / "train.tsv").read_text(encoding="utf-8")
    quoted = [e for e in train if '"' in e.text_a + e.text_b]
    assert quoted and raw.count('"') == sum((e.text_a + e.text_b).count('"') for e in train)


def test_stsb_rejected():
    with pytest.raises(DataError, match="stsb is a regression task"):
        data.load_task("stsb")


def test_glue_not_local_and_hub_unreachable(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("KDJAX_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "find_local_glue_dir", lambda task: None)
    with pytest.raises(DataError) as e:
        data.load_task("rte")
    msg = str(e.value)
    assert "'rte' not found locally" in msg and str(tmp_path / "rte") in msg
    assert "hub was unreachable" in msg and "train_file=" in msg


def test_glue_from_hub_uses_classlabel_names(monkeypatch):
    import datasets

    features = datasets.Features({
        "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})

    def part(n):
        return datasets.Dataset.from_dict(
            {"premise": [f"p{i}" for i in range(n)], "hypothesis": [f"h{i}" for i in range(n)],
             "label": [i % 3 for i in range(n)]}, features=features)

    calls = []

    def fake_load(path, name):
        calls.append((path, name))
        return datasets.DatasetDict({"train": part(4), "validation_matched": part(2)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(data, "find_local_glue_dir", lambda task: None)
    task = data.load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert task.label_names == ["entailment", "neutral", "contradiction"] and task.is_pair
    assert task.splits["train"][3] == Example("p3", "h3", 0)
    assert len(task.splits["dev"]) == 2


@pytest.mark.slow
def test_real_sst2():
    if data.find_local_glue_dir("sst2") is None:
        pytest.skip("no local SST-2 copy (expected in ../shared/data/sst2)")
    task = data.load_task("sst2")
    assert len(task.splits["train"]) == 67349 and len(task.splits["dev"]) == 872
    assert task.num_labels == 2 and task.label_names == ["0", "1"] and not task.is_pair
    assert {e.label for e in task.splits["dev"]} == {0, 1}


# ------------------------------------------------------------------------------------------------
# Encoding


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.mark.slow
@pytest.mark.parametrize("pair", [False, True])
def test_encode_matches_tokenizer(tokenizer, pair):
    texts = ["a short one .", "", "a much longer sentence that will certainly be truncated "
             "because it has far more word pieces than the tiny max length allows ."]
    others = ["and its partner", "second text here", "x"]
    examples = [Example(a, b if pair else None, i) for i, (a, b) in enumerate(zip(texts, others))]
    max_length = 12
    whole = [len(ids) for ids in tokenizer(texts, others if pair else None)["input_ids"]]
    # The long one is truncated, and the warning says so with the untruncated count.
    with pytest.warns(UserWarning, match=rf"1 of 3 {'pairs' if pair else 'examples'} \(33\.3 %\) "
                      rf"are longer than data.max_length=12 tokens .*longest: {max(whole)}\)"):
        enc = data.encode(examples, tokenizer, max_length)
    ref = tokenizer(texts, others if pair else None, truncation="longest_first",
                    max_length=max_length)
    assert enc.input_ids.shape == (3, max_length) and enc.input_ids.dtype == np.int32
    assert enc.lengths.tolist() == [len(ids) for ids in ref["input_ids"]]
    assert enc.lengths[2] == max_length  # the long one was truncated
    for i, n in enumerate(enc.lengths):
        assert enc.input_ids[i, :n].tolist() == ref["input_ids"][i]
        assert enc.token_type_ids[i, :n].tolist() == ref["token_type_ids"][i]
        assert (enc.input_ids[i, n:] == tokenizer.pad_token_id).all()
    assert enc.labels.tolist() == [0, 1, 2]
    sub = enc.subset([2, 0])
    assert len(sub) == 2 and sub.lengths.tolist() == [enc.lengths[2], enc.lengths[0]]


@pytest.mark.slow
def test_encode_warns_only_when_something_is_cut(tokenizer, recwarn):
    texts = ["one two three", "a b c d e f g h i j k l m n o p"]
    whole = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    # Exactly at the cap is not truncated: no warning.
    data.encode([Example(t, None, 0) for t in texts], tokenizer, max(whole))
    assert not [w for w in recwarn if "truncated" in str(w.message)]
    lengths = data.encode([Example(t, None, 0) for t in texts], tokenizer, 4).lengths
    assert data.untruncated_lengths([Example(t, None, 0) for t in texts], tokenizer, 4,
                                    lengths).tolist() == whole
    message = [str(w.message) for w in recwarn if "truncated" in str(w.message)]
    # 99th percentile of the two whole lengths, rounded up (numpy's linear interpolation).
    keep_99 = int(np.ceil(np.percentile(whole, 99)))
    assert len(message) == 1 and "2 of 2 examples (100 %)" in message[0]
    assert f"data.max_length={keep_99} keeps 99 %" in message[0]


# ------------------------------------------------------------------------------------------------
# Batching


def test_default_buckets():
    assert data.default_buckets(64) == (8, 12, 16, 24, 32, 48, 64)
    assert data.default_buckets(128) == (8, 12, 16, 24, 32, 48, 64, 96, 128)
    assert data.default_buckets(100) == (8, 12, 16, 24, 32, 48, 64, 96, 100)
    assert data.default_buckets(8) == (8,)


def _fake_split(n=203, width=64, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, width + 1, n).astype(np.int32)
    real = np.arange(width)[None] < lengths[:, None]
    input_ids = np.where(real, rng.integers(1, 1000, (n, width)), 0).astype(np.int32)
    token_type_ids = np.where(real, rng.integers(0, 2, (n, width)), 0).astype(np.int32)
    return EncodedSplit(input_ids, token_type_ids, lengths, (np.arange(n) % 3).astype(np.int32))


BUCKETS = (16, 32, 48, 64)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batcher_covers_each_example_once(shuffle):
    split = _fake_split()
    batcher = Batcher(split, 16, buckets=BUCKETS, shuffle=shuffle, seed=3, sort_window=4)
    assert batcher.num_batches == 13  # ceil(203 / 16)
    for epoch in range(2):
        batches = list(batcher.epoch(epoch))
        assert len(batches) == batcher.num_batches
        seen = []
        for b in batches:
            length = b["input_ids"].shape[1]
            assert b["input_ids"].shape == b["token_type_ids"].shape == (16, length)
            assert all(b[k].dtype == np.int32 for k in
                       ("input_ids", "token_type_ids", "attention_mask", "labels",
                        "example_index"))
            assert b["weights"].dtype == np.float32
            real = b["example_index"] >= 0
            np.testing.assert_array_equal(b["weights"], real.astype(np.float32))
            idx = b["example_index"][real]
            # The smallest bucket holding the batch's longest example.
            longest = split.lengths[idx].max()
            assert length == min(x for x in BUCKETS if x >= longest)
            np.testing.assert_array_equal(b["input_ids"][real], split.input_ids[idx, :length])
            np.testing.assert_array_equal(b["token_type_ids"][real],
                                          split.token_type_ids[idx, :length])
            np.testing.assert_array_equal(b["labels"][real], split.labels[idx])
            np.testing.assert_array_equal(b["attention_mask"].sum(1)[real], split.lengths[idx])
            seen.extend(idx.tolist())
        assert sorted(seen) == list(range(len(split)))
    if not shuffle:
        order = np.concatenate([b["example_index"][b["weights"] > 0] for b in batches])
        assert (np.diff(split.lengths[order]) >= 0).all()


def test_batcher_padding_rows():
    split = _fake_split(n=21)
    batches = list(Batcher(split, 8, buckets=BUCKETS, shuffle=True).epoch(0))
    padded = [b for b in batches if (b["weights"] == 0).any()]
    assert len(padded) == 1  # only the one partial batch
    b = padded[0]
    assert b["weights"].tolist() == [1.0] * 5 + [0.0] * 3
    assert b["example_index"][5:].tolist() == [-1, -1, -1]


def test_batcher_shuffle_is_seeded_per_epoch():
    split = _fake_split()

    def order(seed, epoch):
        batcher = Batcher(split, 16, buckets=BUCKETS, shuffle=True, seed=seed)
        return np.concatenate([b["example_index"] for b in batcher.epoch(epoch)])

    np.testing.assert_array_equal(order(0, 1), order(0, 1))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))


def test_batcher_resume_equals_tail():
    split = _fake_split()
    batcher = Batcher(split, 16, buckets=BUCKETS, shuffle=True, seed=7, sort_window=2)
    full = list(batcher.epoch(2))
    tail = list(batcher.epoch(2, start=5))
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert list(batcher.epoch(2, start=batcher.num_batches)) == []


def test_batcher_bucket_checks():
    split = _fake_split(width=64)
    with pytest.raises(ValueError, match="do not cover the longest example"):
        Batcher(split, 16, buckets=(16, 32), shuffle=False)
    # A bucket above the encoded width would need data that does not exist: it becomes the width.
    batcher = Batcher(split, 16, buckets=(32, 128), shuffle=False)
    assert batcher.buckets == (32, 64)
    assert {b["input_ids"].shape[1] for b in batcher.epoch(0)} == {32, 64}


@pytest.mark.slow
def test_bucketing_cuts_padding_on_sst2(tokenizer):
    if data.find_local_glue_dir("sst2") is None:
        pytest.skip("no local SST-2 copy (expected in ../shared/data/sst2)")
    train = data.load_task("sst2", splits=("train",)).splits["train"]
    split = data.encode(train, tokenizer, 64)
    batcher = Batcher(split, 32, buckets=(16, 32, 48, 64), shuffle=True, seed=0)
    padded_lengths = [b["input_ids"].shape[1] for b in batcher.epoch(0)]
    assert len(padded_lengths) == batcher.num_batches == 2105
    assert np.mean(padded_lengths) < 0.5 * 64


@pytest.mark.slow
def test_covering_length_holds_99_percent(tokenizer):
    # 100 examples: 98 short, 2 long. 99 % whole needs a width for the 99th example.
    short, long_ = "one two three", " ".join(["word"] * 40)
    examples = [Example(short, None, 0)] * 98 + [Example(long_, None, 0)] * 2
    short_len, long_len = (len(tokenizer(t)["input_ids"]) for t in (short, long_))
    width, held = data.covering_length(examples, tokenizer, 128)
    assert width == min(b for b in data.default_buckets(128) if b >= long_len)
    assert held == 1.0
    width, held = data.covering_length(examples, tokenizer, 128, fraction=0.98)
    assert width == min(b for b in data.default_buckets(128) if b >= short_len) and held == 0.98
    # Given widths (data.buckets) are the candidates; none large enough -> the largest.
    assert data.covering_length(examples, tokenizer, 128, widths=(8, 16)) == (16, 0.98)


def test_training_indices_split_the_labelled_examples_without_moving_train_limit():
    # Without a held-out slice: train_limit's seeded subset, as before the slice existed.
    order = np.random.default_rng(7).permutation(100)
    labelled, held, rest = data.training_indices(100, train_limit=30, seed=7)
    np.testing.assert_array_equal(labelled, np.sort(order[:30]))
    np.testing.assert_array_equal(rest, np.sort(order[30:]))
    assert len(held) == 0
    # With one: 10 % of the 30 labelled are held out; the unlabelled rest is unchanged.
    labelled_h, held_h, rest_h = data.training_indices(100, train_limit=30,
                                                       holdout_fraction=0.1, seed=7)
    assert len(held_h) == 3 and len(labelled_h) == 27
    np.testing.assert_array_equal(np.sort(np.r_[labelled_h, held_h]), labelled)
    np.testing.assert_array_equal(rest_h, rest)
    # Seeded by data.subset_seed alone: another seed, another slice.
    other = data.training_indices(100, holdout_fraction=0.1, seed=8)[1]
    assert not np.array_equal(other, data.training_indices(100, holdout_fraction=0.1, seed=7)[1])
    with pytest.raises(data.DataError, match="holdout_fraction=0.5 of 1 labelled"):
        data.training_indices(1, holdout_fraction=0.5)

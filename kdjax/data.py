"""Text-classification data: reading, label maps, tokenisation and length-bucketed batches.

Single sentences and sentence pairs with any number of labels come from local TSV / CSV / JSONL
files with configurable columns (`read_examples`, `load_task(train_file=..., dev_file=...)`), or
from GLUE (`load_task("sst2")`): a local copy in the GLUE folder layout when one exists
(`find_local_glue_dir`), else `datasets.load_dataset("nyu-mll/glue", task)`.

Labels are mapped to indices once, from the training file, and that map (`TaskData.label_names`)
is reused for the dev file, so a dev label the model was never trained on is an error instead of a
silently shifted index.

`encode` tokenises a split once with the checkpoint's own tokenizer into fixed-width arrays;
`Batcher` cuts them into length-bucketed batches of constant batch size, so jit compiles only one
shape per bucket while short sentences are not padded to the full max_length.

Bad data raises `DataError` with the file, line and problem, before anything is returned.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import warnings
from typing import Iterator, Sequence

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file, line (when known) and problem."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One text-classification example."""

    text_a: str
    text_b: str | None
    label: int  # index into TaskData.label_names; -1 = unlabelled


@dataclasses.dataclass
class TaskData:
    """The splits of one task and the label map they share."""

    name: str
    label_names: list[str]  # index -> original label as a string (the values in the files)
    splits: dict[str, list[Example]]  # e.g. {"train": [...], "dev": [...]}
    is_pair: bool

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# task -> (text columns, validation split name on the hub). stsb is left out on purpose: it is a
# regression task and the classifier heads here only do classification.
GLUE_TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "cola": (("sentence",), "validation"),
    "sst2": (("sentence",), "validation"),
    "mrpc": (("sentence1", "sentence2"), "validation"),
    "qqp": (("question1", "question2"), "validation"),
    "mnli": (("premise", "hypothesis"), "validation_matched"),
    "qnli": (("question", "sentence"), "validation"),
    "rte": (("sentence1", "sentence2"), "validation"),
    "wnli": (("sentence1", "sentence2"), "validation"),
}

# GLUE tasks whose distributed TSVs have no header row: their column names, in file order (as
# transformers' GLUE processors read them: CoLA's sentence is column 3, its label column 1).
GLUE_HEADERLESS: dict[str, tuple[str, ...]] = {
    "cola": ("source", "label", "original_mark", "sentence"),
}

# The metric a task is judged by (GLUE's: Matthews correlation for CoLA); accuracy elsewhere.
# Every evaluation reports accuracy, mcc and F1; this names the headline one.
TASK_METRIC: dict[str, str] = {"cola": "mcc"}


# The class names of GLUE tasks whose files hold integer labels, index = the integer (as the hub's
# ClassLabel features name them). Saved models carry these in id2label, so a pipeline answers
# "positive" instead of "1". Tasks whose files hold the names themselves (RTE, QNLI, MNLI in the
# GLUE TSVs) keep their own.
GLUE_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "qnli": ("entailment", "not_entailment"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}


def class_names(task: str, label_names: Sequence[str], configured: Sequence[str] = ()
                ) -> list[str]:
    """The names a saved model gives its classes (its id2label), index by index.

    The label values read from the files (`TaskData.label_names`) decide the classes and their
    order; this only names them: `configured` (`data.label_names`) when given, else the task's
    known names (`GLUE_LABEL_NAMES`) when the files' labels are exactly the integers 0..n-1,
    else the values themselves.

    Raises:
      DataError: `configured` has the wrong count, an empty name or a repeated name.
    """
    label_names = list(label_names)
    if configured:
        names = [str(n).strip() for n in configured]
        if len(names) != len(label_names):
            raise DataError(f"data.label_names has {len(names)} names {names} for "
                            f"{len(label_names)} labels {label_names} (index order)")
        if not all(names) or len(set(names)) != len(names):
            raise DataError(f"data.label_names must be distinct, non-empty names, got {names}")
        return names
    known = GLUE_LABEL_NAMES.get(task.lower().replace("-", ""))
    if known and len(known) == len(label_names) and _all_ints(label_names) and [
            int(v) for v in label_names] == list(range(len(known))):
        return list(known)
    return label_names


def task_metric(task: str) -> str:
    """The headline metric of a task: "mcc" for CoLA, else "accuracy"."""
    return TASK_METRIC.get(task.lower().replace("-", ""), "accuracy")


_SPLITS = ("train", "dev")
_FORMATS = (".tsv", ".csv", ".jsonl")

# How TSV and CSV fields may be quoted (`data.quoting`):
#   none: quote characters are text (GLUE's convention: MRPC and RTE hold bare `"`); a field
#     cannot contain the delimiter or a line break.
#   csv: a field wrapped in `"` may hold delimiters, line breaks and doubled `""` quotes, as
#     Python's csv module (and pandas) read it; a `"` that opens a field must close it.
#   auto: by file type, none for .tsv (GLUE's files) and csv for .csv.
QUOTING = ("auto", "none", "csv")
_INT_RE = re.compile(r"[+-]?\d+")


# ------------------------------------------------------------------------------------------------
# Reading files


def read_examples(
    path,
    text_columns: Sequence[str],
    label_column: str | None,
    *,
    label_names: list[str] | None = None,
    header: Sequence[str] | None = None,
    quoting: str = "auto",
) -> tuple[list[Example], list[str]]:
    """Reads examples from a .tsv, .csv or .jsonl file.

    The format follows the extension. TSV and CSV files start with a header row unless `header`
    names their columns; `quoting` says whether `"` quotes a field (see `QUOTING`). A UTF-8
    byte-order mark is ignored. Line numbers in errors are the file's physical lines (a header
    is line 1), so they can be opened in an editor.

    Args:
      path: the file.
      text_columns: one column (single sentences) or two (sentence pairs). An empty text is
        allowed; an absent value is not.
      label_column: the label column, or None for unlabelled data (every label is -1).
      label_names: an existing label map (e.g. the training file's, when reading the dev file).
        None builds one from this file's labels: ordered by integer value when every label is an
        integer, else sorted as strings.
      header: the column names of a TSV or CSV file that has no header row (GLUE's CoLA); None
        reads them from the first row.
      quoting: "none" (quote characters are text), "csv" (quoted fields as Python's csv module
        reads them) or "auto" (none for .tsv, csv for .csv). Ignored for JSONL.

    Returns:
      The examples and the label map (`label_names`, or the one built; [] when unlabelled and none
      was given).

    Raises:
      DataError: a missing or unreadable file, a missing column or value, a line that is not
        UTF-8, a line with the wrong number of fields or a broken quoted field (the message names
        the `data.quoting` that would read it), a file with no data rows, or a label outside
        `label_names`.
    """
    path = pathlib.Path(path)
    if quoting not in QUOTING:
        raise DataError(f"data.quoting must be one of {QUOTING}, got {quoting!r}")
    text_columns = tuple(text_columns)
    if len(text_columns) not in (1, 2):
        raise DataError(f"{path}: expected 1 or 2 text columns, got {len(text_columns)} "
                        f"({list(text_columns)})")
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {_FORMATS}")
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")

    columns = text_columns + ((label_column,) if label_column is not None else ())
    lines = _decode_lines(path)
    if suffix == ".jsonl":
        rows = _jsonl_rows(path, lines, columns)
    else:
        if quoting == "auto":
            quoting = "none" if suffix == ".tsv" else "csv"
        rows = _delimited_rows(path, lines, columns, "\t" if suffix == ".tsv" else ",", header,
                               quoting)
    if not rows:
        raise DataError(f"{path}: no data rows")

    if label_column is None:
        examples = [Example(r[0], r[1] if len(text_columns) == 2 else None, -1) for _, r in rows]
        return examples, list(label_names) if label_names is not None else []

    labels = [(line_no, r[-1].strip()) for line_no, r in rows]
    for line_no, label in labels:
        if not label:
            raise DataError(f"{path} line {line_no}: empty label in column {label_column!r}")
    if label_names is None:
        label_names = _build_label_names(label for _, label in labels)
    index = _label_index(label_names)
    integer_names = _all_ints(label_names)
    examples = []
    for (line_no, row), (_, label) in zip(rows, labels):
        key = int(label) if integer_names and _INT_RE.fullmatch(label) else label
        if key not in index:
            raise DataError(f'unknown label "{label}" in {path} line {line_no}; '
                            f"labels seen in training: {list(label_names)}")
        examples.append(Example(row[0], row[1] if len(text_columns) == 2 else None, index[key]))
    return examples, list(label_names)


def _decode_lines(path: pathlib.Path) -> list[str]:
    """The file's lines (line endings kept), decoded one by one so a bad byte names its line."""
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except OSError as e:  # No permission, a vanished network file, ...
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    decoded = []
    for line_no, raw in enumerate(lines, start=1):
        try:
            decoded.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} line {line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                            f"at column {e.start + 1})") from None
    # A byte-order mark (Excel's UTF-8 export) would otherwise become part of the first column name.
    if decoded and decoded[0].startswith("\ufeff"):
        decoded[0] = decoded[0][1:]
    return decoded


def _delimited_rows(path: pathlib.Path, lines: list[str], columns: tuple[str, ...],
                    delimiter: str, header: Sequence[str] | None = None, quoting: str = "none"
                    ) -> list[tuple[int, list[str]]]:
    """(line number, values of `columns`) for each data row of a TSV or CSV file; `header`
    names the columns of a file without a header row; `quoting` is "none" or "csv"."""
    if quoting == "none":
        reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE)
    else:
        # strict: a quote that opens a field and is not closed properly is an error, not a
        # field that silently swallows the rest of the file.
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
    records = []
    line_no = 1
    try:
        for record in reader:
            # A quoted field can span lines: report the line the record starts on.
            records.append((line_no, record))
            line_no = reader.line_num + 1
    except csv.Error as e:
        problem = ("a quoted field is not closed before the end of the file"
                   if "unexpected end of data" in str(e) else f"malformed quoted field ({e})")
        raise DataError(f"{path} line {line_no}: {problem} (bare quote characters that are "
                        "text? set data.quoting=none)") from None
    records = [(n, r) for n, r in records if r]  # blank lines
    if header is None:
        if not records:
            raise DataError(f"{path}: empty file (no header row)")
        (_, header), data = records[0], records[1:]
        where = f"{path} line 1"
    else:
        data = records
        where = f"{path} (a file without a header row)"
    header = [name.strip() for name in header]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{where}: missing column {missing[0]!r} "
                        f"(columns present: {header})")
    positions = [header.index(c) for c in columns]
    rows = []
    for line_no, record in data:
        # A wrong field count means a stray delimiter inside a text, which shifts every column
        # after it; reading on would pair texts with the wrong labels.
        if len(record) != len(header):
            raise DataError(f"{path} line {line_no}: {len(record)} "
                            f"field{'s' if len(record) != 1 else ''}, expected {len(header)} "
                            f"{_field_count_hint(lines[line_no - 1], delimiter, quoting)}")
        rows.append((line_no, [record[p] for p in positions]))
    return rows


def _field_count_hint(line: str, delimiter: str, quoting: str) -> str:
    """What may explain a line with the wrong number of fields, and the option that reads it."""
    name = "a tab" if delimiter == "\t" else "a comma"
    if '"' not in line:
        return f"({name} inside a text?)"
    if quoting == "none":
        return f"(a quoted field holding {name} or a line break? set data.quoting=csv)"
    return f"({name} inside a text, or bare quote characters? set data.quoting=none)"


def _jsonl_rows(path: pathlib.Path, lines: list[str],
                columns: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, values of `columns` as strings) for each non-blank line of a JSONL file."""
    rows = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # json's messages end in " at" and expect a position after them.
            raise DataError(f"{path} line {line_no}: invalid JSON ({e.msg.removesuffix(' at')} "
                            f"at column {e.pos + 1})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {line_no}: expected a JSON object, "
                            f"got {type(record).__name__}")
        values = []
        for column in columns:
            value = record.get(column)
            if value is None:
                raise DataError(f"{path} line {line_no}: missing value for {column!r} "
                                f"(keys present: {sorted(record)})")
            values.append(_jsonl_value(path, line_no, column, value))
        rows.append((line_no, values))
    return rows


def _jsonl_value(path: pathlib.Path, line_no: int, column: str, value) -> str:
    """A JSON value as the string a TSV file would hold; integral labels may be JSON numbers."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise DataError(f"{path} line {line_no}: {column!r} must be a string or an integer, "
                    f"got {json.dumps(value)}")


# ------------------------------------------------------------------------------------------------
# Label maps


def _all_ints(labels) -> bool:
    return all(_INT_RE.fullmatch(label) for label in labels)


def _build_label_names(labels) -> list[str]:
    """Label map from the labels of one file: numeric order for integers, else sorted strings."""
    distinct = set(labels)
    if _all_ints(distinct):
        # Canonical str(int) so "01" and "1" are one class, and 10 sorts after 9.
        return [str(v) for v in sorted({int(label) for label in distinct})]
    return sorted(distinct)


def _label_index(label_names: Sequence[str]) -> dict:
    """Label -> index; integer label maps are keyed by value so "1" and "01" agree."""
    if _all_ints(label_names):
        return {int(name): i for i, name in enumerate(label_names)}
    return {name: i for i, name in enumerate(label_names)}


# ------------------------------------------------------------------------------------------------
# Tasks


def _local_glue_candidates(task: str) -> list[pathlib.Path]:
    """Where a local copy of a GLUE task may live, in the order they are tried."""
    candidates = []
    if os.environ.get("KDJAX_DATA_DIR"):
        candidates.append(pathlib.Path(os.environ["KDJAX_DATA_DIR"]).expanduser() / task)
    repo_root = pathlib.Path(__file__).resolve().parent.parent
    candidates.append(repo_root.parent / "shared" / "data" / task)
    candidates.append(pathlib.Path.cwd() / ".." / "shared" / "data" / task)
    candidates.append(pathlib.Path.cwd() / "data" / task)
    return candidates


def find_local_glue_dir(task: str) -> pathlib.Path | None:
    """Local copy of a GLUE task in the GLUE folder layout (train.tsv and dev.tsv).

    Looks in: $KDJAX_DATA_DIR/<task>, then <repo root>/../shared/data/<task> (repo root = the
    parent of the kdjax package directory), then ./../shared/data/<task>, then ./data/<task>.

    Args:
      task: the GLUE task name, e.g. "sst2".

    Returns:
      The first of those directories holding both train.tsv and dev.tsv, or None.
    """
    for candidate in _local_glue_candidates(task):
        if (candidate / "train.tsv").is_file() and (candidate / "dev.tsv").is_file():
            return candidate
    return None


def load_task(
    task: str = "sst2",
    *,
    train_file: str = "",
    dev_file: str = "",
    text_columns: Sequence[str] = (),
    label_column: str = "label",
    splits=("train", "dev"),
    quoting: str = "auto",
) -> TaskData:
    """Loads the splits of a task from local files or GLUE.

    With `train_file` or `dev_file`, reads those files. Otherwise `task` must be a GLUE task: its
    local copy (`find_local_glue_dir`; columns named as on the hub, label column "label") is
    preferred, else `datasets.load_dataset("nyu-mll/glue", task)`, whose ClassLabel names become
    the label map. The dev split always uses the training split's label map; the training file is
    read for it even when only "dev" is requested.

    Args:
      task: GLUE task name ("SST-2" and "sst2" both work); with local files, only the name given
        to the returned TaskData.
      train_file: local training file (.tsv, .csv or .jsonl).
      dev_file: local dev file.
      text_columns: text columns of the local files; ("sentence",) when empty. Ignored for GLUE.
      label_column: label column of the local files; "" for unlabelled files. Ignored for GLUE.
      splits: which of "train" and "dev" to return.
      quoting: how TSV/CSV fields are quoted (`read_examples`); "auto" reads GLUE's TSVs with
        quote characters as text.

    Returns:
      The TaskData, with `splits` keyed in the order requested.

    Raises:
      DataError: bad data (see `read_examples`), an unknown or regression GLUE task, a requested
        split with no file, or a GLUE task that is neither local nor reachable on the hub.
    """
    splits = tuple(splits)
    unknown = [s for s in splits if s not in _SPLITS]
    if not splits or unknown:
        raise DataError(f"splits must be a non-empty subset of {_SPLITS}, got {splits}")

    if train_file or dev_file:
        files = {"train": train_file, "dev": dev_file}
        for split in splits:
            if not files[split]:
                raise DataError(f"split {split!r} requested but no {split}_file given; pass "
                                f"{split}_file=... or leave {split!r} out of splits")
        return _load_files(task, files, tuple(text_columns) or ("sentence",),
                           label_column or None, splits, quoting=quoting)

    name = task.lower().replace("-", "")
    if name == "stsb":
        raise DataError("stsb is a regression task; regression is not supported yet "
                        "(classification tasks only)")
    if name not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r} (known: {sorted(GLUE_TASKS)}); for other "
                        "data pass train_file=/dev_file= with text_columns and label_column")
    columns, _ = GLUE_TASKS[name]
    local = find_local_glue_dir(name)
    if local is not None:
        files = {"train": str(local / "train.tsv"), "dev": str(local / "dev.tsv")}
        return _load_files(name, files, columns, "label", splits,
                           header=GLUE_HEADERLESS.get(name), quoting=quoting)
    return _load_glue_hub(name, splits)


def _load_files(name: str, files: dict[str, str], text_columns: tuple[str, ...],
                label_column: str | None, splits: tuple[str, ...],
                header: tuple[str, ...] | None = None, quoting: str = "auto") -> TaskData:
    label_names = None
    loaded = {}
    if files["train"]:
        loaded["train"], label_names = read_examples(files["train"], text_columns, label_column,
                                                     header=header, quoting=quoting)
    if "dev" in splits:
        loaded["dev"], label_names = read_examples(files["dev"], text_columns, label_column,
                                                   label_names=label_names, header=header,
                                                   quoting=quoting)
    return TaskData(name=name, label_names=label_names,
                    splits={split: loaded[split] for split in splits},
                    is_pair=len(text_columns) == 2)


def _load_glue_hub(task: str, splits: tuple[str, ...]) -> TaskData:
    import datasets  # slow to import; only this path needs it

    columns, validation = GLUE_TASKS[task]
    try:
        dataset = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as e:  # datasets raises many types for "offline"; all mean the same here
        looked = ", ".join(str(p) for p in _local_glue_candidates(task))
        raise DataError(
            f"GLUE task {task!r} not found locally (looked for train.tsv and dev.tsv in: {looked}) "
            f"and the Hugging Face hub was unreachable ({type(e).__name__}: {e}). Put a copy in "
            f"one of those places (or set KDJAX_DATA_DIR), or pass your own files: "
            f"load_task(train_file=..., dev_file=..., text_columns=..., label_column=...)"
        ) from e
    label_names = [str(n) for n in dataset["train"].features["label"].names]
    hub_split = {"train": "train", "dev": validation}
    loaded = {}
    for split in splits:
        part = dataset[hub_split[split]]
        texts = [list(part[c]) for c in columns]
        text_b = texts[1] if len(columns) == 2 else [None] * len(texts[0])
        loaded[split] = [Example(a, b, int(label))
                         for a, b, label in zip(texts[0], text_b, part["label"])]
    return TaskData(name=task, label_names=label_names, splits=loaded, is_pair=len(columns) == 2)


# ------------------------------------------------------------------------------------------------
# Tokenisation


@dataclasses.dataclass
class EncodedSplit:
    """A tokenised split, right-padded to a fixed width."""

    input_ids: np.ndarray  # [N, max_length] int32, right-padded with the pad id
    token_type_ids: np.ndarray  # [N, max_length] int32
    lengths: np.ndarray  # [N] int32, number of real tokens (incl. [CLS]/[SEP])
    labels: np.ndarray  # [N] int32 (-1 = unlabelled)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> EncodedSplit:
        """The rows at `indices` (an index array or a boolean mask), as a new split."""
        indices = np.asarray(indices)
        return EncodedSplit(self.input_ids[indices], self.token_type_ids[indices],
                            self.lengths[indices], self.labels[indices])


def concatenate(splits: Sequence[EncodedSplit]) -> EncodedSplit:
    """The rows of several splits (encoded to the same width), in order."""
    widths = {s.input_ids.shape[1] for s in splits}
    if len(widths) != 1:
        raise ValueError(f"cannot concatenate splits of different widths {sorted(widths)}")
    return EncodedSplit(*(np.concatenate([getattr(s, f.name) for s in splits])
                          for f in dataclasses.fields(EncodedSplit)))


def training_indices(num_examples: int, *, train_limit: int = 0, holdout_fraction: float = 0.0,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which training examples a run trains on, holds out, and leaves unlabelled.

    `train_limit` keeps a seeded random subset of that size as the labelled examples (the rest,
    labels removed, is a few-labels run's transfer set); `holdout_fraction` then sets a seeded
    slice of the labelled examples aside for checkpoint selection and early stopping, so dev is
    never looked at while training. Both draws depend on `seed` (data.subset_seed) only, never on
    the training seed, so every recipe and every seed sees the same slices.

    Returns:
      Sorted index arrays (labelled training, held-out, unlabelled rest) into the training split.
    """
    labelled = np.arange(num_examples)
    rest = np.zeros(0, np.int64)
    if train_limit and train_limit < num_examples:
        # A fixed, seeded subset, so "the first N" does not depend on file order.
        order = np.random.default_rng(seed).permutation(num_examples)
        labelled, rest = np.sort(order[:train_limit]), np.sort(order[train_limit:])
    holdout = np.zeros(0, np.int64)
    if holdout_fraction:
        size = max(1, round(holdout_fraction * len(labelled)))
        if size >= len(labelled):
            raise DataError(f"data.holdout_fraction={holdout_fraction} of {len(labelled)} "
                            "labelled examples leaves none to train on")
        # A second generator: the held-out slice must not change which examples train_limit
        # keeps.
        order = np.random.default_rng([seed, 1]).permutation(len(labelled))
        holdout, labelled = np.sort(labelled[order[:size]]), np.sort(labelled[order[size:]])
    return labelled, holdout, rest


def without_labels(split: EncodedSplit) -> EncodedSplit:
    """The same rows with every label -1 (unlabelled)."""
    return dataclasses.replace(split, labels=np.full_like(split.labels, -1))


def encode(examples: list[Example], tokenizer, max_length: int, *,
           warn: bool = True) -> EncodedSplit:
    """Tokenises examples with the checkpoint's own tokenizer.

    One batched call (fast tokenizers parallelise it in Rust). Padding is done here rather than by
    the tokenizer so rows are always right-padded, whatever the tokenizer's padding side.

    Args:
      examples: all single sentences or all pairs.
      tokenizer: a Hugging Face tokenizer (fast preferred) with a pad token.
      max_length: tokens per row, including [CLS]/[SEP]; longer inputs are truncated (pairs
        'longest_first', trimming the longer text first), with a warning saying how many were
        and which max_length would keep 99 % of them whole.
      warn: False skips the truncation check and its warning.

    Returns:
      The EncodedSplit, rows in the order of `examples`.

    Raises:
      ValueError: mixed single and pair examples, or a tokenizer with no pad token.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token")
    n = len(examples)
    if n == 0:
        empty = np.zeros((0, max_length), np.int32)
        return EncodedSplit(empty, empty.copy(), np.zeros(0, np.int32), np.zeros(0, np.int32))
    is_pair = examples[0].text_b is not None
    if any((e.text_b is not None) != is_pair for e in examples):
        raise ValueError("encode got a mix of single sentences and sentence pairs")
    out = tokenizer(
        [e.text_a for e in examples],
        [e.text_b for e in examples] if is_pair else None,
        truncation="longest_first",
        max_length=max_length,
        padding=False,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    lengths = np.fromiter((len(ids) for ids in out["input_ids"]), np.int32, count=n)
    # Scatter the ragged token lists into the padded matrix in one vectorised assignment.
    real = np.arange(max_length)[None, :] < lengths[:, None]
    input_ids = np.full((n, max_length), tokenizer.pad_token_id, np.int32)
    input_ids[real] = np.concatenate([np.asarray(ids, np.int32) for ids in out["input_ids"]])
    token_type_ids = np.zeros((n, max_length), np.int32)
    token_type_ids[real] = np.concatenate(
        [np.asarray(t, np.int32) for t in out["token_type_ids"]])
    labels = np.fromiter((e.label for e in examples), np.int32, count=n)
    if warn:
        _warn_if_truncated(examples, tokenizer, max_length, lengths, is_pair)
    return EncodedSplit(input_ids, token_type_ids, lengths, labels)


def untruncated_lengths(examples: list[Example], tokenizer, max_length: int,
                        lengths: np.ndarray) -> np.ndarray:
    """Token counts before truncation: only the rows that reached `max_length` are tokenised
    again (whole), so the check costs little when few examples are long."""
    full = np.asarray(lengths, np.int64).copy()
    at_cap = np.flatnonzero(full >= max_length)
    if len(at_cap):
        is_pair = examples[0].text_b is not None
        out = tokenizer([examples[i].text_a for i in at_cap],
                        [examples[i].text_b for i in at_cap] if is_pair else None,
                        truncation=False, padding=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
        full[at_cap] = [len(ids) for ids in out["input_ids"]]
    return full


def covering_length(examples: list[Example], tokenizer, cap: int, fraction: float = 0.99,
                    widths: Sequence[int] = ()) -> tuple[int, float]:
    """The smallest of `widths` (default: `default_buckets(cap)`) that holds `fraction` of
    `examples` whole, and the fraction it does hold; the largest width up to `cap` when none
    does.

    This is `data.max_length=0`: the width follows the task (SST-2 and CoLA fit in 48 and 32
    tokens, RTE's pairs need 256), not one number that silently cuts a pair task's inputs.
    """
    lengths = untruncated_lengths(examples, tokenizer, cap,
                                  encode(examples, tokenizer, cap, warn=False).lengths)
    widths = sorted(w for w in (widths or default_buckets(cap)) if w <= cap) or [cap]
    for width in widths:
        held = float(np.mean(lengths <= width))
        if held >= fraction:
            return width, held
    return widths[-1], float(np.mean(lengths <= widths[-1]))


def _warn_if_truncated(examples, tokenizer, max_length, lengths, is_pair) -> None:
    full = untruncated_lengths(examples, tokenizer, max_length, lengths)
    truncated = int(np.sum(full > max_length))
    if truncated:
        # Silently cutting a fifth of a pair task's inputs was a real failure of the defaults.
        keep_99 = int(np.ceil(np.percentile(full, 99)))
        kind = "pairs" if is_pair else "examples"
        warnings.warn(
            f"{truncated} of {len(full)} {kind} ({100 * truncated / len(full):.3g} %) are longer "
            f"than data.max_length={max_length} tokens and were truncated (longest: "
            f"{int(full.max())}); data.max_length={keep_99} keeps 99 % of them whole",
            stacklevel=3)


# ------------------------------------------------------------------------------------------------
# Batching


def default_buckets(max_length: int) -> tuple[int, ...]:
    """A small fixed set of padded lengths up to `max_length`.

    Powers of two and 1.5x powers of two from 8 (8, 12, 16, 24, 32, 48, 64, 96, ...): each bucket
    is at most 1.5x the one below, so padding waste stays small while jit compiles only a
    logarithmic number of shapes (7 for 64, 13 for 512). On SST-2 (mean 13.3 tokens) this pads
    to 16.4 tokens on average against 21.5 for multiples of 16 and 40 for per-batch padding of
    random batches.

    Args:
      max_length: the encoded width; always the last bucket.

    Returns:
      The bucket lengths, ascending, e.g. 64 -> (8, 12, 16, 24, 32, 48, 64).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    buckets, power = [], 8
    while power < max_length:
        buckets += [b for b in (power, power * 3 // 2) if b < max_length]
        power *= 2
    return tuple(buckets) + (max_length,)


class Batcher:
    """Length-bucketed batches of constant size with a per-epoch seeded shuffle.

    With shuffle, each epoch permutes the examples with `np.random.default_rng([seed, epoch])`,
    sorts windows of `batch_size * sort_window` examples by length (so a batch holds examples of
    similar length while staying random across the epoch), cuts them into batches and shuffles the
    batch order with the same generator. Without shuffle (evaluation) all examples are sorted by
    length. Each batch is padded to the smallest bucket holding its longest example; the last
    partial batch gets padding rows of weight 0, so every batch has `batch_size` rows and no
    example is dropped.

    The batch order depends only on (seed, epoch), so a resumed run calls `epoch(e, start=k)` and
    gets exactly the batches k, k+1, ... of the interrupted epoch; the earlier ones are not built.

    With several processes each one builds only its rows of every global batch: process p of P
    gets rows [p * B / P, (p + 1) * B / P) of the batch one process would build (same examples,
    same bucket length, padding rows included), which `sharding.shard_batch` assembles into the
    global batch. The global batches do not depend on the number of processes.
    """

    def __init__(self, split: EncodedSplit, batch_size: int, *, buckets: Sequence[int],
                 shuffle: bool, seed: int = 0, sort_window: int = 200,
                 process_index: int | None = None, process_count: int | None = None):
        """Creates the batcher.

        Args:
          split: the encoded examples.
          batch_size: rows per batch.
          buckets: allowed padded lengths; the largest must hold the longest example. Lengths
            above the split's width are lowered to it.
          shuffle: shuffle for training; False gives length-sorted evaluation order.
          seed: shuffle seed; the epoch number is mixed in.
          sort_window: batches per length-sorting window when shuffling.
          process_index, process_count: which share of each batch to build; default
            `jax.process_index()` and `jax.process_count()` (all rows on one process).
        """
        if batch_size < 1 or sort_window < 1:
            raise ValueError(f"batch_size and sort_window must be positive, got {batch_size} "
                             f"and {sort_window}")
        if process_index is None or process_count is None:
            import jax  # Only for the defaults: the batcher itself is numpy.
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} "
                             "processes; each process loads an equal share of every batch")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in 0..{process_count - 1}, got "
                             f"{process_index}")
        width = split.input_ids.shape[1]
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive lengths, got {tuple(buckets)}")
        # No row is longer than the encoded width, so a larger bucket would only add padding.
        self.buckets = tuple(sorted({min(int(b), width) for b in buckets}))
        longest = int(split.lengths.max()) if len(split) else 0
        if longest > self.buckets[-1]:
            raise ValueError(f"buckets {self.buckets} do not cover the longest example "
                             f"({longest} tokens)")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.sort_window = sort_window
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches of one epoch, from batch index `start` on.

        Args:
          epoch: the epoch number (selects the shuffle).
          start: the first batch to yield, for resuming mid-epoch.

        Returns:
          An iterator of batch dicts: input_ids, token_type_ids and attention_mask [B, L] int32
          (attention_mask 1 = real token), labels [B] int32, weights [B] float32 (1 real row,
          0 padding row) and example_index [B] int32 (row in the split, -1 for padding rows).
          With several processes B is `local_batch_size`, this process's rows.
        """
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start must be in 0..{self.num_batches}, got {start}")
        order = self._batch_order(epoch)
        return (self._make_batch(indices) for indices in order[start:])

    def _batch_order(self, epoch: int) -> list[np.ndarray]:
        """The example indices of each batch of `epoch`; index arrays only, no token data."""
        lengths = self.split.lengths
        size = self.batch_size
        if not self.shuffle:
            order = np.argsort(lengths, kind="stable")
            return [order[i:i + size] for i in range(0, len(order), size)]
        rng = np.random.default_rng([self.seed, epoch])
        permutation = rng.permutation(len(lengths))
        window = size * self.sort_window
        batches = []
        for w in range(0, len(permutation), window):
            chunk = permutation[w:w + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + size] for i in range(0, len(chunk), size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _make_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        n = len(indices)
        longest = int(self.split.lengths[indices].max())
        length = self.buckets[bisect.bisect_left(self.buckets, longest)]
        # Padding rows repeat the batch's first example rather than being all-padding: a row with
        # no attention target or an out-of-range label can give NaN, and 0 * NaN is still NaN.
        rows = np.concatenate([indices, np.full(self.batch_size - n, indices[0])])
        real_rows = np.arange(self.batch_size) < n
        # This process's share; the bucket length above came from the whole global batch, so
        # every process pads to the same length.
        mine = slice(self.process_index * self.local_batch_size,
                     (self.process_index + 1) * self.local_batch_size)
        rows, real_rows = rows[mine], real_rows[mine]
        return {
            "input_ids": self.split.input_ids[rows, :length],
            "token_type_ids": self.split.token_type_ids[rows, :length],
            "attention_mask": (np.arange(length)[None, :]
                               < self.split.lengths[rows][:, None]).astype(np.int32),
            "labels": self.split.labels[rows],
            "weights": real_rows.astype(np.float32),
            "example_index": np.where(real_rows, rows, -1).astype(np.int32),
        }

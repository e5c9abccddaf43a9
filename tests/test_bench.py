"""`kdjax bench` on tiny random models: the PyTorch step computes the same loss as kdjax's jitted
step (the comparison is apples to apples), FLOP counting against hand-counted matmuls, a tiny
end-to-end run writing every required JSON key, and clear refusals of bad flags."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from conftest import write_toy_task
from kdjax import bench, bench_torch, cli, data, hf, sharding
from kdjax.methods.kd import KD

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    train, dev = write_toy_task(tmp_path_factory.mktemp("toy"))
    return data.load_task("toy", train_file=str(train), dev_file=str(dev))


def _steps_agree(tiny_hf_dir, toy_task, *, steps):
    """(kdjax losses, torch losses) over `steps` updates from the same weights and batch, with
    dropout off: the jitted step on 8 fake devices against the PyTorch eager step."""
    mesh = sharding.make_mesh()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    teacher, _, _ = hf.load_pretrained(str(tiny_hf_dir), num_labels=toy_task.num_labels)
    _, batch = bench.fixed_batch(toy_task.splits["train"], tokenizer, 16, 16, seed=0)
    # Unlabelled rows (CE skips them, the soft term does not) and padding rows (no term counts
    # them), as in a transfer-set batch.
    batch["labels"][:3] = -1
    batch["weights"][-2:] = 0.0
    setup = bench.kd_setup(teacher, toy_task.num_labels, tokenizer, mesh, total_steps=4,
                           dropout=False)
    torch_step = bench.torch_kd_step(setup, teacher, total_steps=4, dropout=False)
    key = sharding.replicate(jax.random.key(0), mesh)
    state, kdjax_losses, torch_losses = setup.state, [], []
    torch_batch = bench_torch.to_torch_batch(batch)
    for _ in range(steps):
        state, metrics = setup.step(state, setup.teachers, sharding.shard_batch(batch, mesh), key)
        kdjax_losses.append(float(metrics["loss_sum"] / metrics["count"]))
        torch_losses.append(float(torch_step(torch_batch)))
    return setup, kdjax_losses, torch_losses


def test_torch_step_has_kdjax_loss_at_step_0_and_after_updates(tiny_hf_dir, toy_task):
    setup, kdjax_losses, torch_losses = _steps_agree(tiny_hf_dir, toy_task, steps=4)
    kd = setup.spec.method(KD)
    assert kd.ce == 0.5 and kd.soft == 0.5 and setup.spec.temperature == 2.0
    assert setup.init_layers == (0,)  # Half of the tiny teacher's 2 layers.
    np.testing.assert_allclose(kdjax_losses[0], torch_losses[0], atol=1e-4)
    # Later steps agree too: the same AdamW, clipping and learning-rate schedule.
    np.testing.assert_allclose(kdjax_losses, torch_losses, atol=1e-4)
    assert abs(kdjax_losses[3] - kdjax_losses[0]) > 1e-4  # The updates did change the loss.


def test_step_flops_counts_matmuls_like_by_hand():
    mesh = sharding.make_mesh()
    f = jax.jit(lambda a, b: a @ b)
    compiled = f.lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    assert bench.step_flops(compiled) == 2 * 64 * 32 * 16

    class ListCost:  # Some JAX versions return one dict per program.
        def cost_analysis(self):
            return [{"flops": 12.0}]

    assert bench.step_flops(ListCost()) == 12.0
    peak = bench.measure_peak_flops(mesh, "float32", size=32, repeats=2)
    assert peak["matmul_size"] == 32 and peak["matmul_devices"] == 8
    assert peak["peak_flops_per_s"] == pytest.approx(8 * 2 * 32**3 / peak["matmul_seconds"])


REQUIRED = ("kdjax_examples_per_s", "torch_examples_per_s", "speedup_vs_torch",
            "peak_flops_per_s", "achieved_flops_per_s", "fraction_of_peak", "cache_speedup",
            "bucketing_speedup", "compile_seconds")


def test_tiny_bench_end_to_end_writes_every_key(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    write_toy_task(tmp_path / "glue" / "sst2")  # Read as SST-2 through KDJAX_DATA_DIR.
    monkeypatch.setenv("KDJAX_DATA_DIR", str(tmp_path / "glue"))
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--teacher", str(tiny_hf_dir), "--batch-size", "16",
                     "--seq-len", "16", "--steps", "2", "--repeats", "1", "--bucket-batches",
                     "2", "--bucket-length", "16", "--eval-batch-size", "16",
                     "--dev-examples", "16", "--matmul-size", "32", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "speedup vs PyTorch" in table and "bucketing speedup" in table
    result = json.loads(out.read_text())
    for key in REQUIRED:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert result["fraction_of_peak"] == pytest.approx(
        result["achieved_flops_per_s"] / result["peak_flops_per_s"])
    assert result["speedup_vs_torch"] == pytest.approx(
        result["kdjax_examples_per_s"] / result["torch_examples_per_s"])
    assert result["cache_speedup"] == pytest.approx(
        result["cache"]["on_examples_per_s"] / result["cache"]["off_examples_per_s"])
    device = result["device"]
    assert device["platform"] == "cpu" and device["device_count"] == 8 and device["cpu_cores"] >= 1
    assert result["kdjax"]["step_flops"] == 8 * result["kdjax"]["step_flops_per_device"] > 0
    assert result["memory"]["step_bytes"] > 0 and result["memory"]["max_rss_bytes"] > 0
    assert result["torch"]["attention_implementation"] in ("eager", "sdpa")
    assert [r["model"] for r in result["inference"]] == ["teacher", "half_depth", "tenth_size",
                                                         "bilstm"]
    assert all(r["examples_per_s"] > 0 for r in result["inference"])
    assert result["inference"][0]["speedup_vs_teacher"] == 1.0
    # Bucketed and fixed runs cover the same examples; only padding differs.
    bucketing = result["bucketing"]
    assert bucketing["fixed_shapes"] == [16]
    assert bucketing["bucketed_mean_padded_length"] <= bucketing["fixed_mean_padded_length"]
    assert set(result["targets"]) == set(bench.CPU_TARGETS)
    for target in result["targets"].values():
        assert target["met"] == (target["value"] >= target["target"])
    assert result["settings"]["steps"] == 2 and result["settings"]["batch_size"] == 16

    # Without the PyTorch side (--no-torch) its figures are absent, not zero.
    del result["torch"]
    result["torch_examples_per_s"] = result["speedup_vs_torch"] = None
    targets = bench.evaluate_targets(result, "cpu", "minilm", "float32")
    assert targets["speedup_vs_torch"]["met"] is None
    result["targets"] = targets
    assert "not measured" in bench.format_table(result)
    gpu = bench.evaluate_targets({"fraction_of_peak": 0.45}, "gpu", "bert-base", "bfloat16")
    assert gpu == {"fraction_of_peak": {"target": 0.4, "value": 0.45, "met": True}}


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "12"], "must be divisible by the 8 devices"),
    (["--seq-len", "1000"], "--seq-len must be in [2, 512]"),
    (["--matmul-size", "-1"], "--matmul-size must be >= 0"),
])
def test_bad_flags_are_refused_naming_the_flag(flags, message, capsys):
    assert cli.main(["bench", "--no-torch", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_torch_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(bench_torch.TorchMissing, match=r"pip install torch==2\.13\.0"):
        bench_torch.import_torch()

"""noisy_flax.benchmark: runs end to end, counts FLOPs right; no timing asserted."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisy_flax import benchmark

TINY = ["--model", "vit_nano_patch4_28", "--model-kwarg", "num_layers=1", "--batch", "8",
        "--resolution", "28",
        "--steps", "2", "--warmup", "1", "--chunk", "1", "--matmul-sizes", "64,96"]


TINY_PUBLISHED = [a for a in TINY if a not in ("--model-kwarg", "num_layers=1")]


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def fast_compile():
    """Tests check plumbing, not speed: skip XLA's slow optimisation passes."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def test_runs_a_tiny_model_and_prints_a_table_and_json_lines(capsys, fast_compile):
    benchmark.main(TINY + ["--noise", "gaussian", "--eval", "--compare-cpu-ynnpack", "default",
                           "--compare-model-kwarg", "last_block_all_tokens=true"])
    out = capsys.readouterr().out
    assert "jax train noise=gaussian" in out and "img/s" in out  # the table
    rows = _json_lines(out)
    assert [r["name"] for r in rows] == ["jax train noise=none", "jax train noise=gaussian",
                                         "jax train cpu_ynnpack=default",
                                         "jax train last_block_all_tokens=true",
                                         "noise op gaussian (fwd+bwd)", "jax eval noise=none"]
    other = rows.pop(2)
    assert other["ratio"] > 0 and other["flops"] > 0
    # The override reaches the model: its one block now computes all 50 tokens, not 1.
    all_tokens = rows.pop(2)
    assert all_tokens["ratio"] > 0 and all_tokens["flops"] > 1.5 * rows[0]["flops"]
    op = rows.pop(2)
    # vit_nano_patch4_28: (28 / 4)^2 = 49 patch tokens + the class token, width 64.
    assert op["site_shape"] == [8, 50, 64]
    # Ratios recomputed from the raw step times each row lists.
    assert op["overhead_pct"] == pytest.approx(100 * np.median(op["step_ms"])
                                               / np.median(rows[0]["step_ms"]), rel=1e-2)
    for row in rows:
        for field in ("model", "batch", "resolution", "dtype", "backend", "device_kind",
                      "cpu_count", "jax", "steps", "step_ms_median", "step_ms_p10",
                      "step_ms_p90", "images_per_s", "compile_s", "flops", "flops_per_s",
                      "utilisation", "peak_flops_per_s", "peak_source"):
            assert field in row, field
        assert row["steps"] == 2 and row["batch"] == 8
        assert row["flops"] > 0 and row["images_per_s"] > 0
    for row in rows:
        assert row["images_per_s"] == pytest.approx(8 / np.median(row["step_ms"]) * 1e3, rel=1e-2)
    assert rows[1]["ratio"] == pytest.approx(np.median(rows[1]["step_ms"])
                                             / np.median(rows[0]["step_ms"]), rel=1e-2)
    assert rows[1]["ratio_paired"] > 0 and rows[1]["bytes_ratio"] > 0
    assert len(rows[1]["step_ms"]) == 2
    # The peak is the fastest of the matmuls timed beside the steps.
    rates = rows[0]["matmul_flops_per_s"]
    assert set(rates) == {"matmul_64", "matmul_96"}
    assert rows[0]["peak_flops_per_s"] == max(rates.values())
    assert rows[0]["peak_source"] == f"measured: fastest matmul ({max(rates, key=rates.get)})"
    # The eval step is paired with itself, not with the train step.
    assert rows[-1]["name"] == "jax eval noise=none" and rows[-1]["ratio_paired"] == 1.0
    # Training costs more than inference: roughly 3x the forward pass.
    assert rows[0]["flops"] > 2 * rows[2]["flops"]


@pytest.mark.parametrize("model, resolution, site, expected", [
    # ResNet-18 at 64 px: stem /4 -> 16, stages 2-4 halve it -> 2x2x512 into the last block.
    ("resnet18", 64, "block_input", (2, 2, 2, 512)),
    ("resnet18", 64, "image", (2, 64, 64, 3)),
    # ViT-Nano/4 at 28 px: 49 patches + class token, width 64.
    ("vit_nano_patch4_28", 28, "embedding", (2, 50, 64)),
])
def test_noise_site_input_is_what_the_model_hands_the_noise(model, resolution, site, expected):
    config = benchmark.benchmark_config(model, 2, resolution, noise="gaussian")
    config.noise.site = site
    built = benchmark.train.build_model(config)
    assert benchmark.noise_site_input(built, config).shape == expected


def test_unknown_noise_is_refused():
    with pytest.raises(ValueError, match="unknown noise"):
        benchmark.parse_noises("gausian")
    assert benchmark.parse_noises("gaussian,none") == ["none", "gaussian"]
    assert benchmark.parse_noises("all")[0] == "none"


def test_model_kwargs_are_json_values_or_else_strings():
    assert benchmark.parse_model_kwargs(
        ["num_layers=2", "dropout_rate=0.1", "last_block_all_tokens=true",
         "attention_implementation=cudnn", "patch_size=[4, 4]"]) == {
        "num_layers": 2, "dropout_rate": 0.1, "last_block_all_tokens": True,
        "attention_implementation": "cudnn", "patch_size": [4, 4]}


def test_noises_tolerate_spaces_and_empty_items():
    assert benchmark.parse_noises(" gaussian , ,none,") == ["none", "gaussian"]
    assert benchmark.parse_noises("none") == ["none"]


@pytest.mark.parametrize("model, site", [("resnet18", "block_input"),
                                         ("vit_tiny_patch16_224", "attn_input"),
                                         ("vit_nano_patch4_28", "attn_input")])
def test_default_noise_site_is_the_published_one(model, site):
    # NoisyResNet perturbs a block's input; NoisyViT the last block's attention input.
    assert benchmark.benchmark_config(model, 2, 32, noise="gaussian").noise.site == site


def test_flops_count_the_whole_batch_on_every_device_count(fast_compile):
    """XLA counts a partitioned program per device: the 8-device step must
    still report the FLOPs of the one-device step, the reference (the train
    step's replicated AdamW update runs on every device, hence the margin)."""
    from noisy_flax import sharding
    # Batch 64 and 10 classes: the per-device copies of the update stay small.
    config = benchmark.benchmark_config("vit_nano_patch4_28", 64, 28, num_classes=10,
                                        model_kwargs={"num_layers": 1})
    meshes = {n: sharding.create_mesh(devices=jax.devices()[:n]) for n in (1, 8)}
    assert meshes[8].size == 8
    flops = {(kind, n): case(config, mesh, "x").info["flops"]
             for kind, case in (("train", benchmark.train_case), ("eval", benchmark.eval_case))
             for n, mesh in meshes.items()}
    assert flops[("eval", 8)] == pytest.approx(flops[("eval", 1)], rel=0.01)
    assert flops[("train", 1)] <= flops[("train", 8)] <= 1.05 * flops[("train", 1)]


def test_matmul_flops_match_the_closed_form():
    m, k, n = 64, 96, 48
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    assert benchmark.cost_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.02)


def test_dense_layer_flops_match_the_closed_form():
    batch, features_in, features_out = 32, 128, 256
    layer = nn.Dense(features_out)
    x = jnp.ones((batch, features_in))
    params = layer.init(jax.random.PRNGKey(0), x)
    compiled = jax.jit(layer.apply).lower(params, x).compile()
    # Multiply-adds of the product, plus one add per output for the bias.
    expected = 2 * batch * features_in * features_out + batch * features_out
    assert benchmark.cost_flops(compiled) == pytest.approx(expected, rel=0.05)


def test_cpu_matmul_peak_is_positive():
    assert benchmark.measure_matmul_peak(n=128, repeats=2) > 0


def test_matmul_case_counts_two_flops_per_multiply_add():
    case = benchmark.matmul_case(64)
    assert case.name == "matmul_64" and case.info["flops"] == 2 * 64 ** 3
    case.run()


def test_matmul_peak_is_the_fastest_repeat(monkeypatch):
    import types
    monkeypatch.setattr(benchmark, "matmul_case",
                        lambda n, dtype: benchmark.Case("m", lambda: None, {"flops": 6.0}))
    # Repeats of 3 s, 2 s and 4 s: 6 FLOPs in the fastest, 2 s.
    clock = iter([0.0, 3.0, 10.0, 12.0, 20.0, 24.0])
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert benchmark.measure_matmul_peak(n=8, repeats=3) == 3.0


def test_published_peaks_by_device_kind():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind
    assert benchmark.published_peak(Device("NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
    assert benchmark.published_peak(Device("NVIDIA H100 PCIe"), "bfloat16") == 756e12
    assert benchmark.published_peak(Device("TPU v5 lite"), "bfloat16") == 197e12
    assert benchmark.published_peak(Device("cpu"), "float32") is None


def test_a_mesh_peak_counts_every_chip():
    class H200:
        device_kind = "NVIDIA H200"
    assert benchmark.mesh_peak(H200(), "bfloat16", 1) == (989e12, "published")
    assert benchmark.mesh_peak(H200(), "bfloat16", 8) == (8 * 989e12, "published, x 8 chips")
    assert benchmark.mesh_peak(jax.devices()[0], "float32", 8) == (None, "published")


def test_published_fp32_peaks_are_the_dense_tf32_figures():
    """NVIDIA's datasheets: A100 TF32 156 TFLOPS dense; H100 SXM 989 and PCIe
    756 TFLOPS TF32 with 2:4 sparsity, so half that dense. TPUs publish none."""
    class Device:
        def __init__(self, kind):
            self.device_kind = kind
    assert benchmark.published_peak(Device("NVIDIA A100-SXM4-80GB"), "float32") == 156e12
    assert benchmark.published_peak(Device("NVIDIA H100 80GB HBM3"), "float32") == \
        pytest.approx(989e12 / 2, rel=0.002)
    assert benchmark.published_peak(Device("NVIDIA H100 PCIe"), "float32") == \
        pytest.approx(756e12 / 2, rel=0.002)
    assert benchmark.published_peak(Device("TPU v4"), "float32") is None


def test_interleave_rotates_the_order_and_runs_each_round_once_untimed():
    calls = []
    a = benchmark.Case("a", lambda: calls.append("a"))
    b = benchmark.Case("b", lambda: calls.append("b"))
    benchmark.interleave([a, b], steps=3, warmup=1, chunk=2)
    # Warm-up a, b; round 1: a then b, each 1 untimed + 2 timed; round 2: b
    # first, each 1 untimed + the 1 step left.
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 2 + ["a"] * 2
    assert len(a.times) == len(b.times) == 3
    assert a.rounds == b.rounds == [1, 1, 2]


def test_paired_ratio_is_the_median_of_per_round_median_ratios():
    case = benchmark.Case("x", lambda: None, times=[2, 4, 9, 3, 5, 7], rounds=[1, 1, 1, 2, 3, 4])
    ref = benchmark.Case("r", lambda: None, times=[1, 3, 2, 2, 1, 1], rounds=[1, 1, 1, 2, 3, 5])
    # Shared rounds 1-3: 4/2, 3/2, 5/1 -> median of (2, 1.5, 5) = 2.
    assert benchmark.paired_ratio(case, ref) == 2.0
    lone = benchmark.Case("y", lambda: None, times=[1.0], rounds=[9])
    assert benchmark.paired_ratio(lone, ref) is None


def test_summarize_by_hand():
    case = benchmark.Case("x", lambda: None, {"flops": 2e9}, times=[0.5, 0.1, 0.3, 0.2, 0.4])
    row = benchmark.summarize(case, 6, 1e10)
    # Sorted 0.1..0.5: median 0.3; linear-interpolated p10 = 0.14, p90 = 0.46.
    assert row["step_ms"] == [500, 100, 300, 200, 400]
    assert row["step_ms_median"] == pytest.approx(300)
    assert row["step_ms_p10"] == pytest.approx(140) and row["step_ms_p90"] == pytest.approx(460)
    assert row["spread_pct"] == pytest.approx(100 * 0.32 / 0.3)
    assert row["images_per_s"] == pytest.approx(20)
    assert row["flops_per_s"] == pytest.approx(2e9 / 0.3)
    assert row["utilisation"] == pytest.approx(2e9 / 0.3 / 1e10)
    assert "utilisation" not in benchmark.summarize(case, 6, None)


def _set_step_times(monkeypatch, times):
    """run_steps without timing: each case gets ``times[name]`` as its three
    rounds' step times, and the matmul peaks count 2n^3 FLOPs."""
    def interleave(cases, steps, warmup, chunk):
        for case in cases:
            case.times, case.rounds = list(times[case.name]), [1, 2, 3]
    monkeypatch.setattr(benchmark, "interleave", interleave)
    monkeypatch.setattr(benchmark, "matmul_case", lambda n, *a: benchmark.Case(
        f"matmul_{n}", lambda: None, {"flops": 2.0 * n ** 3}))


def test_run_steps_ratios_from_set_step_times(monkeypatch):
    """Every case stubbed, with step times set per round: the ratios,
    overheads and the peak follow from those times by hand."""
    times = {"jax train noise=none": [0.100, 0.100, 0.100],
             "jax train noise=gaussian": [0.110, 0.120, 0.160],
             "noise op gaussian (fwd+bwd)": [0.020, 0.030, 0.025],
             "jax eval noise=none": [0.040, 0.050, 0.060],
             "matmul_64": [0.001] * 3, "matmul_96": [0.002] * 3}
    nbytes = {"jax train noise=none": 1000.0, "jax train noise=gaussian": 1500.0}

    def train_case(config, mesh, name):
        return benchmark.Case(name, lambda: None, {"flops": 1e9, "bytes_accessed": nbytes[name]})

    monkeypatch.setattr(benchmark, "train_case", train_case)
    monkeypatch.setattr(benchmark, "noise_op_case",
                        lambda config, mesh, name: benchmark.Case(name, lambda: None))
    monkeypatch.setattr(benchmark, "eval_case",
                        lambda config, mesh, name: benchmark.Case(name, lambda: None, {"flops": 3e8}))
    _set_step_times(monkeypatch, times)
    rows = benchmark.run_steps(benchmark.parse_args(TINY + ["--noise", "gaussian", "--eval"]))
    ref, noisy, op, ev = rows
    assert [r["name"] for r in rows] == list(times)[:4]
    # Noisy step: median 0.12 s against 0.1 s; per round 1.1, 1.2, 1.6.
    assert noisy["ratio"] == pytest.approx(1.2) and noisy["overhead_pct"] == pytest.approx(20)
    assert noisy["ratio_paired"] == pytest.approx(1.2) and noisy["bytes_ratio"] == 1.5
    assert ref["ratio"] == 1.0 and ref["overhead_pct"] == 0
    # The noise alone: 25 ms of the 100 ms step.
    assert op["ratio"] == pytest.approx(0.25) and op["overhead_pct"] == pytest.approx(25)
    # The eval step is paired with itself.
    assert ev["ratio_paired"] == 1.0 and "ratio" not in ev
    # Peak: 2 * 96^3 FLOPs in 2 ms beats 2 * 64^3 in 1 ms.
    peak = 2 * 96 ** 3 / 0.002
    assert ref["peak_flops_per_s"] == pytest.approx(peak)
    assert ref["peak_source"] == "measured: fastest matmul (matmul_96)"
    assert ref["utilisation"] == pytest.approx(1e9 / 0.1 / peak)
    assert ev["utilisation"] == pytest.approx(3e8 / 0.05 / peak)


@pytest.mark.parametrize("args, expected", [
    (["--model", "vit_tny_patch16_224"], "error: unknown model 'vit_tny_patch16_224' (did you mean"),
    (["--batch", "0"], "error: argument --batch: 0 is below 1 (see --help)"),
    (["--steps", "0"], "error: argument --steps: 0 is below 1 (see --help)"),
    (["--resolution", "-4"], "error: argument --resolution: -4 is below 1"),
    (["--model-kwarg", "num_layerz=2"], "error: "),
    (["--bogus"], "error: unrecognized arguments: --bogus (see --help)"),
    (["--model", "vit_nano_patch4_28", "--resolution", "30"], "error: "),
    (["--model", "vit_nano_patch4_28", "--noise", "foo"], "error: unknown noise 'foo'"),
], ids=["model", "batch", "steps", "resolution", "model kwarg", "flag", "indivisible", "noise"])
def test_bad_arguments_are_one_line_before_any_timing(args, expected):
    result = subprocess.run([sys.executable, "-m", "noisy_flax.benchmark", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "timing" not in result.stderr


def test_step_modes_import_neither_tensorflow_nor_torch():
    code = ("import sys, noisy_flax.benchmark; "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _torch_stands_in(monkeypatch, benchmark_torch):
    """torch taken as installed, and any model name as one it publishes."""
    monkeypatch.setattr(benchmark_torch, "available", lambda: True)
    monkeypatch.setattr(benchmark_torch, "check_reference", lambda name: None)


def test_vs_torch_without_torch_fails_with_a_message(monkeypatch, fast_compile):
    from noisy_flax import benchmark_torch
    monkeypatch.setattr(benchmark_torch, "available", lambda: False)
    with pytest.raises(ValueError, match="needs torch"):
        benchmark.run_steps(benchmark.parse_args(TINY + ["--vs-torch", "--json"]))


def test_vs_torch_compares_train_with_train_and_eval_with_eval(monkeypatch, fast_compile):
    """The ratio wiring, with stand-in PyTorch cases whose speed is set by
    construction: the eval row must be divided by the JAX eval step."""
    import time
    from noisy_flax import benchmark_torch
    _torch_stands_in(monkeypatch, benchmark_torch)

    def fake(name, seconds):
        return lambda *args, **kwargs: benchmark.Case(name, lambda: time.sleep(seconds), {})
    monkeypatch.setattr(benchmark_torch, "train_case", fake("torch train", 0.05))
    monkeypatch.setattr(benchmark_torch, "eval_case", fake("torch eval", 0.02))
    monkeypatch.setattr(benchmark_torch, "matmul_case", lambda n: benchmark.Case(
        f"torch.mm {n}", lambda: time.sleep(0.001), {"flops": 1.0}))
    monkeypatch.setattr(benchmark, "check_same_model", lambda *cases: None)  # stand-ins
    rows = benchmark.run_steps(benchmark.parse_args(TINY_PUBLISHED + ["--vs-torch", "--eval"]))
    by_name = {row["name"]: row for row in rows}
    jax_train, jax_eval = by_name["jax train noise=none"], by_name["jax eval noise=none"]
    torch_train, torch_eval = by_name["torch train"], by_name["torch eval"]
    # images/s of the stand-ins: the batch over a sleep of at least the set time
    assert torch_train["images_per_s"] <= 8 / 0.05 and torch_eval["images_per_s"] <= 8 / 0.02
    assert torch_train["ratio"] == pytest.approx(jax_train["images_per_s"] / torch_train["images_per_s"])
    assert torch_eval["ratio"] == pytest.approx(jax_eval["images_per_s"] / torch_eval["images_per_s"])
    for jax_row, torch_row, key in ((jax_train, torch_train, "jax_over_torch_train"),
                                    (jax_eval, torch_eval, "jax_over_torch_eval")):
        assert jax_row[key] == pytest.approx(np.median(torch_row["step_ms"])
                                             / np.median(jax_row["step_ms"]), rel=1e-2)
        # Paired per round with the same step as the ratio, eval with eval: one
        # step per round here, so the median of the per-step quotients (the
        # rows' times are rounded to 0.01 ms, hence the tolerance).
        per_round = np.array(torch_row["step_ms"]) / np.array(jax_row["step_ms"])
        assert torch_row["ratio_paired"] == pytest.approx(np.median(per_round), rel=2e-2)
    assert "jax_over_torch_eval" not in jax_train
    assert set(jax_train["matmul_flops_per_s"]) == {"matmul_64", "matmul_96", "torch.mm 96"}


def test_vs_torch_rows_from_set_step_times(monkeypatch):
    """Every case stubbed, with step times set per round: which PyTorch cases
    run, with which arguments, and their ratios follow from those times by hand."""
    from noisy_flax import benchmark_torch
    times = {"jax train noise=none": [0.100, 0.100, 0.100],
             "jax eval noise=none": [0.040, 0.050, 0.060],
             "torch train": [0.200, 0.250, 0.300],
             "torch train compiled": [0.150, 0.150, 0.150],
             "torch eval": [0.050, 0.060, 0.100],
             "matmul_64": [0.001] * 3, "matmul_96": [0.002] * 3, "torch.mm 96": [0.002] * 3}
    same = {"params": 10, "decayed_params": 8}
    calls = []

    def torch_case(name, info=same):
        def make(*args, **kwargs):
            calls.append((name, args, kwargs))
            return benchmark.Case(name, lambda: None, dict(info))
        return make

    monkeypatch.setattr(benchmark, "train_case",
                        lambda config, mesh, name: benchmark.Case(name, lambda: None, dict(same)))
    monkeypatch.setattr(benchmark, "eval_case",
                        lambda config, mesh, name: benchmark.Case(name, lambda: None))
    _set_step_times(monkeypatch, times)
    _torch_stands_in(monkeypatch, benchmark_torch)
    monkeypatch.setattr(benchmark_torch, "train_case", torch_case("torch train"))
    monkeypatch.setattr(benchmark_torch, "compiled_train_case", torch_case("torch train compiled"))
    monkeypatch.setattr(benchmark_torch, "eval_case", torch_case("torch eval"))
    monkeypatch.setattr(benchmark_torch, "matmul_case", lambda n: benchmark.Case(
        f"torch.mm {n}", lambda: None, {"flops": 2.0 * n ** 3}))

    rows = benchmark.run_steps(benchmark.parse_args(TINY_PUBLISHED + ["--vs-torch", "--eval"]))
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ["jax train noise=none", "jax eval noise=none", "torch train",
                             "torch eval"]
    # Each PyTorch case at the JAX step's model, batch, resolution and dtype.
    for name, args, kwargs in calls:
        assert args == ("vit_nano_patch4_28", 8, 28) and kwargs == {"dtype": "float32"}, name
    jax_train, jax_eval = by_name["jax train noise=none"], by_name["jax eval noise=none"]
    torch_train, torch_eval = by_name["torch train"], by_name["torch eval"]
    # Train against train: medians 100 ms and 250 ms; per round 2, 2.5, 3.
    assert torch_train["ratio"] == pytest.approx(2.5)
    assert torch_train["ratio_paired"] == pytest.approx(2.5)
    assert jax_train["jax_over_torch_train"] == pytest.approx(2.5)
    # Eval against eval: medians 50 ms and 60 ms; per round 1.25, 1.2, 1.67.
    assert torch_eval["ratio"] == pytest.approx(1.2)
    assert torch_eval["ratio_paired"] == pytest.approx(1.25)
    assert jax_eval["jax_over_torch_eval"] == pytest.approx(1.2)
    assert "torch.mm 96" in jax_train["matmul_flops_per_s"]

    # bf16: no fp32 torch.mm peak; a torch.compile that failed leaves its row out.
    calls.clear()
    monkeypatch.setattr(benchmark_torch, "compiled_train_case",
                        lambda *args, **kwargs: calls.append(("compiled", args, kwargs)))
    rows = benchmark.run_steps(benchmark.parse_args(
        TINY_PUBLISHED + ["--vs-torch", "--torch-compile", "--dtype", "bfloat16"]))
    assert [row["name"] for row in rows] == ["jax train noise=none", "torch train"]
    assert calls == [("torch train", ("vit_nano_patch4_28", 8, 28), {"dtype": "bfloat16"}),
                     ("compiled", ("vit_nano_patch4_28", 8, 28, "bfloat16"), {})]
    assert set(rows[0]["matmul_flops_per_s"]) == {"matmul_64", "matmul_96"}

    # A PyTorch model of another size is refused before any timing.
    monkeypatch.setattr(benchmark_torch, "train_case",
                        torch_case("torch train", {"params": 11, "decayed_params": 8}))
    monkeypatch.setattr(benchmark, "interleave", lambda *a: pytest.fail("timed"))
    with pytest.raises(ValueError, match="must be the same model"):
        benchmark.run_steps(benchmark.parse_args(TINY_PUBLISHED + ["--vs-torch"]))


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9454 48-Core Processor
flags\t\t: fpu avx512f

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: another
"""


def test_cpu_vendor_and_model_are_the_first_processor_s(monkeypatch):
    import io
    monkeypatch.setattr(benchmark, "open", lambda path: io.StringIO(CPUINFO), raising=False)
    assert benchmark.cpu_vendor() == "AuthenticAMD"
    # "model" is another field than "model name", and comes first.
    assert benchmark.cpu_model() == "AMD EPYC 9454 48-Core Processor"
    assert benchmark.cpu_family_model() == "25/17"

    def missing(path):
        raise FileNotFoundError(path)
    monkeypatch.setattr(benchmark, "open", missing, raising=False)
    assert benchmark.cpu_vendor() == ""
    assert benchmark.cpu_family_model() == ""


@pytest.mark.parametrize("vendor, preload, mkl, expected", [
    ("AuthenticAMD", "", True, True),
    ("AuthenticAMD", "libtcmalloc_minimal.so.4", True, True),
    ("AuthenticAMD", "libtcmalloc_minimal.so.4:/x/build/libmkl_intel_path.so", True, False),
    ("GenuineIntel", "", True, False),
    ("HygonGenuine", "", True, True),
    ("AuthenticAMD", "", False, False),  # a PyTorch without MKL (an aarch64 or OpenBLAS build)
    ("", "", True, False),  # vendor unknown: nothing to say
])
def test_mkl_generic_path_is_flagged_off_intel_unless_the_library_is_preloaded(
        vendor, preload, mkl, expected):
    from noisy_flax import benchmark_torch
    assert benchmark_torch.mkl_generic_path(vendor, preload, mkl) is expected


def test_the_table_warns_when_pytorch_ran_mkl_s_generic_path(monkeypatch, capsys):
    from noisy_flax import benchmark_torch
    row = {"name": "torch train", "step_ms_median": 100.0, "images_per_s": 80.0}
    for flagged in (True, False):
        monkeypatch.setattr(benchmark, "run_steps",
                            lambda args: [{**row, "mkl_generic_path": flagged}])
        monkeypatch.setattr(benchmark, "cpu_vendor", lambda: "AuthenticAMD")
        benchmark.main(TINY)
        out = capsys.readouterr().out
        warning = benchmark_torch.MKL_GENERIC_PATH_WARNING.format(vendor="AuthenticAMD")
        assert (warning in out.splitlines()) is flagged
        assert '"mkl_generic_path": %s' % str(flagged).lower() in out  # and in its JSON line


def test_vs_torch_refuses_a_model_override_before_compiling(monkeypatch):
    from noisy_flax import benchmark_torch
    _torch_stands_in(monkeypatch, benchmark_torch)
    monkeypatch.setattr(benchmark, "train_case", lambda *a: pytest.fail("compiled first"))
    with pytest.raises(ValueError, match="drop --model-kwarg"):
        benchmark.run_steps(benchmark.parse_args(TINY + ["--vs-torch"]))


def test_models_that_differ_are_refused():
    jax_case = benchmark.Case("jax", lambda: None, {"params": 10, "decayed_params": 8})
    same = benchmark.Case("torch", lambda: None, {"params": 10, "decayed_params": 8})
    benchmark.check_same_model(jax_case, same)
    for info, what in (({"params": 12, "decayed_params": 8}, "10 parameters and the PyTorch model 12;"),
                       ({"params": 10, "decayed_params": 10},
                        "8 weight-decayed parameters and the PyTorch model 10;")):
        with pytest.raises(ValueError, match=what):
            benchmark.check_same_model(jax_case, benchmark.Case("torch", lambda: None, info))


def test_decayed_params_count_kernels_only():
    # Kernels 4*4*1*8 + 8*10 = 208 values; biases, the class token, position
    # embeddings and norm scales (8 + 8 + 40 + 8) are not decayed.
    params = {"embedding": {"kernel": np.ones((4, 4, 1, 8)), "bias": np.ones(8)},
              "cls": np.ones((1, 1, 8)),
              "Transformer": {"posembed_input": {"pos_embedding": np.ones((1, 5, 8))},
                              "encoder_norm": {"scale": np.ones(8)}},
              "head": {"kernel": np.ones((8, 10))}}
    assert benchmark.decayed_params(params) == 208


def test_compiled_memory_subtracts_donated_buffers():
    import types

    class Compiled:
        def __init__(self, analysis):
            self.analysis = analysis

        def memory_analysis(self):
            if isinstance(self.analysis, Exception):
                raise self.analysis
            return self.analysis
    # A donated 30-byte state is both an argument and an output: counted once.
    m = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=40,
                              temp_size_in_bytes=10, alias_size_in_bytes=30)
    assert benchmark.compiled_memory_bytes(Compiled(m)) == 120
    assert benchmark.compiled_memory_bytes(Compiled(None)) is None
    assert benchmark.compiled_memory_bytes(Compiled(NotImplementedError())) is None


def _needs_torch_reference():
    """torch, or a skip where the torch extra (torch, timm, torchvision) is missing."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    return torch


@pytest.mark.parametrize("name, resolution", [("resnet18", 32), ("vit_tiny_patch16_224", 224),
                                              ("vit_tiny_patch16_224", 96)])
def test_torch_reference_is_the_same_model_with_the_same_decay(name, resolution):
    """Parameters (published: ViT-Ti/16 5,717,416 at 224 px, ResNet-18
    11,689,512) and the weight-decayed ones, counted by torch's module types
    and by the JAX step's parameter names: two independent rules."""
    _needs_torch_reference()
    from noisy_flax import benchmark_torch
    from noisy_flax.models import create_model
    torch_info = benchmark_torch.train_case(name, 2, resolution).info
    model = create_model(name, num_classes=1000)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
        (1, resolution, resolution, 3)), train=False))["params"]
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert torch_info["params"] == count
    assert torch_info["decayed_params"] == benchmark.decayed_params(params) < count
    published = {("resnet18", 32): 11_689_512, ("vit_tiny_patch16_224", 224): 5_717_416}
    if (name, resolution) in published:
        assert count == published[(name, resolution)]


@pytest.mark.parametrize("dtype, expected", [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_torch_reference_follows_the_jax_dtype(dtype, expected):
    torch = _needs_torch_reference()
    from noisy_flax import benchmark_torch
    ref = benchmark_torch._reference("resnet18", 2, 32, 10, dtype)
    with ref.autocast:
        logits = ref.model(ref.images)
    assert logits.dtype == getattr(torch, expected)
    assert next(ref.model.parameters()).dtype == torch.float32  # fp32 master weights


def test_a_torch_compile_failure_leaves_the_other_cases(monkeypatch, capsys):
    from noisy_flax import benchmark_torch

    def fails(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler\nmore detail")
    monkeypatch.setattr(benchmark_torch, "train_case", fails)
    assert benchmark_torch.compiled_train_case("resnet18", 2, 32) is None
    assert "torch.compile failed, its case is left out: RuntimeError: InductorError: no C++ " \
           "compiler" in capsys.readouterr().err


def test_torch_reference_step_runs():
    _needs_torch_reference()
    from noisy_flax import benchmark_torch
    for name, resolution in (("resnet18", 32), ("vit_tiny_patch16_224", 224)):
        for case in (benchmark_torch.train_case(name, 2, resolution, num_classes=10),
                     benchmark_torch.eval_case(name, 2, resolution, num_classes=10)):
            case.run()
            assert case.info["params"] > 0 and case.info["torch_threads"] >= 1


def _torch_spies(monkeypatch):
    """The model create_model builds (with its parameters as built), the
    AdamW instances made, and what each cross-entropy call received."""
    torch = _needs_torch_reference()
    from noisy_flax import benchmark_torch
    seen = {"models": [], "initial": [], "optimizers": [], "losses": []}
    create = benchmark_torch.create_model

    def create_model(*args, **kwargs):
        model = create(*args, **kwargs)
        seen["models"].append(model)
        seen["initial"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    class AdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["optimizers"].append(self)
    cross_entropy = torch.nn.functional.cross_entropy

    def loss(logits, labels, *args, **kwargs):
        seen["losses"].append((logits.detach(), labels.detach()))
        return cross_entropy(logits, labels, *args, **kwargs)
    monkeypatch.setattr(benchmark_torch, "create_model", create_model)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss)
    return torch, benchmark_torch, seen


def test_torch_train_step_is_the_jax_step_s_adamw_step(monkeypatch):
    """The PyTorch step must do the JAX step's work: a train-mode forward of
    the whole batch over all classes, the gradient of every parameter, and
    AdamW with the JAX config's hyperparameters decaying the conv and linear
    weights only (for a ResNet: the weights of rank 2 and up)."""
    torch, benchmark_torch, seen = _torch_spies(monkeypatch)
    batch, side, classes = 8, 32, 1000
    case = benchmark_torch.train_case("resnet18", batch, side)
    (model,), (initial,), (optimizer,) = seen["models"], seen["initial"], seen["optimizers"]
    inputs, modes, fresh = [], [], []

    def record(module, args):
        inputs.append(args[0].detach())
        modes.append(module.training)
        # Each step's gradient alone, as the JAX step's: none left from the last.
        fresh.append(all(p.grad is None or not p.grad.any() for p in module.parameters()))
    model.register_forward_pre_hook(record)
    # The case ran one step when it was made: AdamW holds state, weights moved.
    assert len(optimizer.state) == len(list(model.parameters()))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert not torch.equal(before["conv1.weight"], initial["conv1.weight"])
    case.run()
    assert modes == [True] and fresh == [True]
    assert inputs[0].shape == (batch, 3, side, side)
    # Images as the JAX step's: uniform on [-1, 1).
    assert -1 <= inputs[0].min() < -0.5 and 0.5 < inputs[0].max() < 1
    logits, labels = seen["losses"][-1]
    assert logits.shape == (batch, classes) and labels.shape == (batch,)
    # Labels over all classes: 8 draws all below 10 of 1000 has probability 1e-16.
    assert labels.dtype == torch.int64 and 10 <= labels.max() < classes and labels.min() >= 0
    # Every parameter got a gradient and moved; the batch statistics were updated.
    params = dict(model.named_parameters())
    assert all(p.grad is not None for p in params.values())
    after = model.state_dict()
    assert all(not torch.equal(before[name], after[name]) for name in params)
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    # AdamW as the JAX step's optax.adamw, with its mask.
    config = benchmark.benchmark_config("resnet18", batch, side)
    names = {id(p): name for name, p in params.items()}
    decay = {}
    for group in optimizer.param_groups:
        assert group["lr"] == config.lr and group["eps"] == config.eps
        assert group["betas"] == (config.b1, config.b2)
        for p in group["params"]:
            assert names[id(p)] not in decay
            decay[names[id(p)]] = group["weight_decay"]
    assert set(decay) == set(params)
    assert {name for name, wd in decay.items() if wd} == \
        {name for name, p in params.items() if name.endswith(".weight") and p.ndim >= 2}
    assert {wd for wd in decay.values() if wd} == {config.weight_decay}
    assert case.name == "torch train" and case.info["torch_compile"] is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_steps_compute_in_the_jax_dtype(monkeypatch, dtype):
    """bf16 compute (fp32 weights) in both steps when the JAX step runs bf16;
    the eval step a forward pass in eval mode with no autograd."""
    torch, benchmark_torch, seen = _torch_spies(monkeypatch)
    outputs = []

    def hook(module, args, output):
        outputs.append((output.dtype, module.training, torch.is_inference_mode_enabled(),
                        output.requires_grad))
    train = benchmark_torch.train_case("resnet18", 2, 32, dtype=dtype, num_classes=10)
    evaluate = benchmark_torch.eval_case("resnet18", 2, 32, dtype=dtype, num_classes=10)
    for model in seen["models"]:
        model.register_forward_hook(hook)
    train.run()
    evaluate.run()
    expected = getattr(torch, dtype)
    assert outputs == [(expected, True, False, True), (expected, False, True, False)]
    assert all(p.dtype == torch.float32 for m in seen["models"] for p in m.parameters())
    # The eval step leaves the batch statistics alone.
    running = seen["models"][1].state_dict()["bn1.running_mean"]
    assert torch.equal(running, seen["initial"][1]["bn1.running_mean"])
    autocast = "bf16" if dtype == "bfloat16" else "off (fp32)"
    assert train.info["autocast"] == evaluate.info["autocast"] == autocast
    # run_steps pairs the rows by these names.
    assert (train.name, evaluate.name) == ("torch train", "torch eval")


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_torch_reference_models_take_the_class_count_and_resolution(name):
    torch = _needs_torch_reference()
    from noisy_flax import benchmark_torch
    model = benchmark_torch.create_model(name, num_classes=10, resolution=32).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name, published", [
    ("vit_tiny_patch16_224", True), ("vit_base_patch16_384", True), ("resnet18", True),
    ("resnet152", True), ("vit_nano_patch4_28", False), ("resnet19", False),
    ("wide_resnet50_2", False)])
def test_torch_reference_exists_only_for_names_timm_or_torchvision_publish(name, published):
    _needs_torch_reference()
    from noisy_flax import benchmark_torch
    if published:
        benchmark_torch.check_reference(name)
    else:
        with pytest.raises(ValueError, match=f"no PyTorch reference for '{name}'"):
            benchmark_torch.check_reference(name)


def test_vs_torch_with_a_model_pytorch_lacks_is_one_line_before_compiling(monkeypatch, capsys):
    _needs_torch_reference()
    monkeypatch.setattr(benchmark, "train_case", lambda *a: pytest.fail("compiled first"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(TINY_PUBLISHED + ["--vs-torch"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no PyTorch reference for 'vit_nano_patch4_28': --vs-torch needs a "
                   "model timm or torchvision publishes under the same name, e.g. "
                   "vit_tiny_patch16_224 or resnet18"]


def test_torch_reference_refuses_a_dtype_it_has_no_policy_for():
    pytest.importorskip("torch")
    from noisy_flax import benchmark_torch
    with pytest.raises(ValueError, match="no PyTorch dtype policy for 'float16'"):
        benchmark_torch._reference("resnet18", 2, 32, 10, "float16")


def test_torch_threads_follow_the_affinity_mask(monkeypatch):
    """Under taskset / a cpuset: as many threads as cores allowed, not os.cpu_count()."""
    import os
    torch = pytest.importorskip("torch")
    from noisy_flax import benchmark_torch
    allowed = {0, 1, 2} if os.cpu_count() != 3 else {0, 1, 2, 3}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed, raising=False)
    previous = torch.get_num_threads()
    try:
        assert benchmark_torch.configure_threads() == len(allowed)
        assert torch.get_num_threads() == len(allowed)
    finally:
        torch.set_num_threads(previous)


def test_only_the_compiled_torch_case_goes_through_torch_compile(monkeypatch):
    torch, benchmark_torch, seen = _torch_spies(monkeypatch)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    plain = benchmark_torch.train_case("resnet18", 2, 32, num_classes=10)
    assert compiled == [] and plain.info["torch_compile"] is False
    case = benchmark_torch.compiled_train_case("resnet18", 2, 32)
    assert compiled == [seen["models"][-1]] and case.info["torch_compile"] is True
    assert case.name == "torch train compiled"


def test_torch_matmul_case_counts_two_flops_per_multiply_add():
    torch = pytest.importorskip("torch")
    from noisy_flax import benchmark_torch
    case = benchmark_torch.matmul_case(48)
    assert case.info["flops"] == 2 * 48 ** 3
    assert case.run().shape == (48, 48) and case.run().dtype == torch.float32


@pytest.mark.parametrize("model, side", [("vit_nano_patch4_28", 28), ("vit_base_patch16_384", 384),
                                         ("resnet18", 224)])
def test_resolution_defaults_to_the_models_own(model, side):
    # The side named in the ViT's registry name; torchvision's ResNets at 224.
    assert benchmark.parse_args(["--model", model]).resolution == side
    assert benchmark.parse_args(["--model", model, "--resolution", "64"]).resolution == 64


@pytest.mark.parametrize("resolution, crop", [(28, "none"), (32, "resize")])
def test_input_config_reads_fashion_mnist_as_its_experiment_config_does(resolution, crop):
    import argparse
    from configs import fashion_mnist
    args = argparse.Namespace(model="vit_nano_patch4_28", batch=8, resolution=resolution,
                              input="fashion_mnist")
    got, experiment = benchmark.input_config(args), fashion_mnist.get_config()
    for key in ("dataset", "num_classes"):
        assert got[key] == experiment[key], key
    for key in ("channels", "cache"):
        assert got.input[key] == experiment.input[key], key
    # Stored images are 28 x 28: any other side must be resized.
    assert got.image_size == resolution and got.input.train_crop == crop
    imagenet = benchmark.input_config(argparse.Namespace(
        model="resnet18", batch=8, resolution=224, input="mock_imagenet"))
    # ImageNet-1k: 1000 classes of RGB photographs.
    assert (imagenet.dataset, imagenet.num_classes, imagenet.input.channels) == \
        ("imagenet2012", 1000, 3)


def test_time_iterator_skips_the_warm_up_batches():
    import itertools
    stream = itertools.count()
    assert len(benchmark.time_iterator(stream, 4, skip=3)) == 4
    assert next(stream) == 7  # 3 skipped + 4 timed


def test_fused_attention_flops_are_added_in_closed_form():
    """XLA's cost analysis counts cuDNN's fused attention as nothing. ViT-B/16
    at 224 px, batch 4, HLO with 11 forward and 11 backward calls (the last
    block's single class-token query stays with XLA): 197 tokens, width 768."""
    from noisy_flax.models import create_model
    model = create_model("vit_base_patch16_224", num_classes=10)
    call = '%c = custom-call(...), custom_call_target="__cudnn$fmhaSoftmax{}"'
    hlo = "\n".join([call.format("")] * 11 + [call.format("Backward")] * 11 + ["%d = dot(...)"])
    per_forward = 4 * 4 * 197 ** 2 * 768  # Q.K^T and P.V: 2 N^2 d each, over 12 heads of 64
    assert benchmark.fused_attention_flops(hlo, model, 4, 224) == 11 * 3 * per_forward
    assert benchmark.fused_attention_flops("%d = dot(...)", model, 4, 224) == 0
    resnet = create_model("resnet18", num_classes=10)
    assert benchmark.fused_attention_flops(hlo, resnet, 4, 224) == 0


def test_fused_attention_flops_read_the_query_and_key_lengths_of_each_call():
    """With attention_implementation='cudnn' the class-token last block's one
    query goes to cuDNN too: 4 B x 1 x 197 x 768 forward, not 4 B 197^2 768.
    Per-device operands (batch 2 of 4 on each of two devices); the count is
    for the whole batch of 4."""
    from noisy_flax.models import create_model
    model = create_model("vit_base_patch16_224", num_classes=10)
    call = ("%c = (bf16[2,{n},12,64]{{3,1,2,0}}, u8[0]{{0}}) custom-call(bf16[2,{n},12,64]{{3,1,2,0}} "
            "%q, bf16[2,197,12,64]{{3,1,2,0}} %k, bf16[2,197,12,64]{{3,1,2,0}} %v), "
            'custom_call_target="__cudnn$fmhaSoftmax{kind}"')
    hlo = "\n".join([call.format(n=197, kind="")] * 11 + [call.format(n=197, kind="Backward")] * 11
                    + [call.format(n=1, kind=""), call.format(n=1, kind="Backward")])
    self_attention = 4 * 4 * 197 ** 2 * 768
    class_token = 4 * 4 * 1 * 197 * 768
    assert benchmark.fused_attention_flops(hlo, model, 4, 224) == \
        11 * 3 * self_attention + 3 * class_token


def test_fused_attention_flops_skip_other_custom_calls_and_unreadable_operands():
    """A cuBLAS GEMM custom call is XLA's to count, not attention. An fmha
    call whose operands are not (batch, tokens, heads, head_dim) is taken as
    self-attention over all 197 tokens of ViT-B/16 at 224 px."""
    from noisy_flax.models import create_model
    model = create_model("vit_base_patch16_224", num_classes=10)
    gemm = ('%g = (f32[4,768]{1,0}, s8[0]{0}) custom-call(f32[4,768]{1,0} %a, '
            'f32[768,768]{1,0} %b), custom_call_target="__cublas$gemm"')
    assert benchmark.fused_attention_flops(gemm, model, 4, 224) == 0
    folded = ('%c = bf16[788,12,64]{2,1,0} custom-call(bf16[788,12,64]{2,1,0} %q, '
              'bf16[788,12,64]{2,1,0} %k), custom_call_target="__cudnn$fmhaSoftmax"')
    assert benchmark.fused_attention_flops(folded, model, 4, 224) == 4 * 4 * 197 ** 2 * 768

"""Every config file builds, and runs two steps with runlocal on mock data."""
import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import common
from noisy_flax import pretrained, train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Shared pieces, and the study's config (a grid of runs, tested in test_study).
SHARED_MODULES = {"__init__", "common", "cifar", "imagenet", "study_fashion_mnist"}
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in SHARED_MODULES)


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"configs.{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_every_experiment_is_covered():
    expected = {"default", "fashion_mnist", "cifar10", "cifar100", "imagenet_vit",
                "imagenet_resnet", "noisyvit_imagenet", "noisycnn_imagenet", "transfer"}
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_with_shared_keys(name):
    config = load_config(name)
    base = common.base_config()
    assert set(base.keys()) <= set(config.keys())
    assert config.is_locked


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_runs_two_steps_on_mock_data(name, tmp_path):
    config = load_config(name, "runlocal")
    config.async_checkpoints = False  # mock_data patches the file system orbax writes to
    with tfds.testing.mock_data(num_examples=32):
        summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 2
    assert (tmp_path / "metrics.jsonl").exists()


# The fine-tuning recipes, started as their users start them: from weights
# of the same model with an ImageNet head (1000 classes).
FINE_TUNING = [("noisyvit_imagenet", "runlocal"), ("noisycnn_imagenet", "runlocal"),
               ("transfer", "runlocal,model=resnet18"),
               ("transfer", "runlocal,model=vit_base_patch16_224")]


@pytest.mark.parametrize("name,arg", FINE_TUNING)
def test_fine_tuning_recipe_loads_init_from(name, arg, tmp_path):
    config = load_config(name, arg)
    source = ml_collections.ConfigDict(config.to_dict())
    source.num_classes, source.noise.type = 1000, "none"
    model = train.build_model(source)
    variables = model.init(jax.random.key(1), jnp.zeros(train.input_shape(config)), train=False)
    pretrained.save_variables(variables, str(tmp_path / "pretrained"))
    config.init_from = str(tmp_path / "pretrained")
    config.async_checkpoints = False
    with tfds.testing.mock_data(num_examples=32):
        summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["steps"] == 2


# The published runs' settings as NOISYNN.md lists them (read from the
# released scripts), not from the config files.
PUBLISHED_RECIPES = {
    "noisyvit_imagenet": {
        "noise.type": "optimal_q", "noise.site": "attn_input", "noise.layer": 11,
        "noise.train": False, "noise.eval": True, "noise.scope": "device",
        "batch_size": 16, "lr": 1e-6, "end_lr": 1e-7, "warmup_init_lr": 0.0,
        "warmup_epochs": 10.0, "num_epochs": 50.0, "weight_decay": 1e-4,
        "label_smoothing": 0.1, "eval_order": "class_sorted", "input.crop_area": (0.05, 1.0),
        "init_required": True, "optimizer": "adamw", "schedule": "cosine", "schedule_unit": "epoch",
        "warmup_prefix": False, "eval_every": 0, "eval_every_epochs": 1.0,
        "input.randaugment": (2, 9), "input.randaugment_before_crop": True,
        "input.normalize": "imagenet", "input.eval_resize": "resize", "save_best": True,
    },
    "noisycnn_imagenet": {
        "noise.type": "circulant", "noise.alpha": 0.4, "noise.stop_gradient": True,
        "noise.site": "block_input", "noise.stage": 4, "noise.layer": -1, "noise.train": True, "noise.eval": True,
        "noise.scope": "device", "noise.strength": 1.0, "noise.prob": 1.0,
        "batch_size": 512, "lr": 1e-3, "end_lr": 1e-9, "num_epochs": 100.0,
        "input.crop_area": (0.05, 1.0), "init_required": True, "optimizer": "adamw",
        "schedule": "cosine", "init_dont_load": ("fc/.*",), "schedule_unit": "epoch",
        "input.flip": False, "input.eval_resize": "resize", "eval_batch_size": 512,
        "eval_order": "class_sorted", "eval_every": 0, "eval_every_epochs": 1.0,
        "save_best": True,
    },
}


@pytest.mark.parametrize("name", PUBLISHED_RECIPES)
def test_published_recipe_settings(name):
    config = load_config(name)
    for key, expected in PUBLISHED_RECIPES[name].items():
        value = config
        for part in key.split("."):
            value = value[part]
        if isinstance(expected, tuple):
            value = tuple(value)
        assert value == expected, key
    if name == "noisyvit_imagenet":  # batches of 10 per device, as on the one published GPU
        train.resolve_eval_batch_size(config)
        assert config.eval_batch_size == 10 * jax.device_count() == 80


def test_locked_config_rejects_typos():
    config = load_config("default")
    with pytest.raises(AttributeError):
        config.lrr = 1.0


class TestParseArg:
    def test_typed_values_and_flags(self):
        a = common.parse_arg("model=resnet18,epochs=2.5,batch=64,runlocal",
                             model="vit", epochs=1.0, batch=8, runlocal=False)
        assert (a.model, a.epochs, a.batch, a.runlocal) == ("resnet18", 2.5, 64, True)

    def test_empty_argument_gives_defaults(self):
        assert common.parse_arg(None, x=1).x == 1
        assert common.parse_arg("", x=1).x == 1

    @pytest.mark.parametrize("arg,message", [
        ("modle=resnet18", "did you mean 'model'"),
        ("batch=abc", "does not parse as int"),
        ("runlocal=maybe", "does not parse as bool"),
        ("batch", "needs a value"),
    ])
    def test_bad_arguments(self, arg, message):
        with pytest.raises(ValueError, match=message):
            common.parse_arg(arg, model="vit", batch=8, runlocal=False)

    def test_runlocal_shrinks(self):
        config = load_config("fashion_mnist", "runlocal")
        assert config.total_steps == 2 and config.batch_size <= 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_no_config_starts_jax(tmp_path):
    """On a pod, jax.distributed must start before anything initialises the
    backend, and main parses --config first: loading a config must not."""
    script = tmp_path / "load_all.py"
    script.write_text(
        "import importlib.util, sys, jax\n"
        f"sys.path.insert(0, {str(CONFIG_DIR.parent)!r})\n"
        f"for name in {EXPERIMENTS!r}:\n"
        "    for arg in (None, 'runlocal'):\n"
        f"        spec = importlib.util.spec_from_file_location('c', {str(CONFIG_DIR)!r} + f'/{{name}}.py')\n"
        "        module = importlib.util.module_from_spec(spec)\n"
        "        spec.loader.exec_module(module)\n"
        "        module.get_config(arg)\n"
        "jax.distributed.initialize(f'localhost:{sys.argv[1]}', num_processes=1, process_id=0)\n"
        "print('devices', jax.device_count())\n")
    result = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "devices" in result.stdout


def test_mesh_is_overridden_on_the_command_line(monkeypatch):
    """`--config.mesh` like every shared key (ml_collections overrides tuples, not lists)."""
    from absl import flags
    from ml_collections import config_flags
    from noisy_flax import sharding
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    argv = ["main", f"--config={CONFIG_DIR / 'default.py'}:runlocal",
            "--config.mesh=(('data', 2), ('fsdp', 4))"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    values(argv)
    assert tuple(map(tuple, values.config.mesh)) == (("data", 2), ("fsdp", 4))
    assert dict(sharding.create_mesh(values.config.mesh).shape) == {"data": 2, "fsdp": 4}

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
        # The 95.65% headline run: vit_base_patch16_384 on ImageNet-1k validation.
        "model": "vit_base_patch16_384", "image_size": 384, "dataset": "imagenet2012",
        "eval_split": "validation", "num_classes": 1000,
        # The published transforms: RandAugment then RandomResizedCrop, no flip.
        "input.flip": False,
        # torch.optim.AdamW over all parameters, its betas and eps left at their
        # defaults; fp32 and no gradient clipping (none is listed).
        "wd_mask": "all", "b1": 0.9, "b2": 0.999, "eps": 1e-8, "dtype": "float32",
        "grad_clip_norm": 0.0, "grad_accum_steps": 1,
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
        # ResNet-34 (stage 4 has 3 blocks) with torchvision's weights and their
        # ImageNet mean/std, at 224 px, 1000 classes.
        "model": "resnet34", "image_size": 224, "input.normalize": "imagenet",
        "num_classes": 1000, "eval_split": "validation",
        # torch.optim.AdamW with its default weight decay 0.01 on every parameter,
        # default betas and eps; a plain cosine, no warm-up; fp32, no clipping.
        "weight_decay": 0.01, "wd_mask": "all", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "warmup_steps": 0, "warmup_epochs": 0.0, "dtype": "float32", "grad_clip_norm": 0.0,
        "grad_accum_steps": 1,
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


def test_corrected_recipe_changes_only_what_the_audit_questions():
    # NOISYNN.md "The published recipe" / "Why the headline number needs an
    # audit": augreg weights expect mean = std = 0.5, the gain should be
    # measured with shuffled test batches, and noise on in training too.
    published = load_config("noisyvit_imagenet").to_dict()
    corrected = load_config("noisyvit_imagenet", "recipe=corrected").to_dict()
    assert corrected["input"]["normalize"] == "minus_one_to_one"
    assert corrected["eval_order"] == "shuffled"
    assert (corrected["noise"]["train"], corrected["noise"]["eval"]) == (True, True)
    changed = {k for k in published if published[k] != corrected[k]}
    assert changed == {"input", "eval_order", "noise"}
    changed_input = {k for k in published["input"] if published["input"][k] != corrected["input"][k]}
    changed_noise = {k for k in published["noise"] if published["noise"][k] != corrected["noise"][k]}
    assert (changed_input, changed_noise) == ({"normalize"}, {"train"})


@pytest.mark.parametrize("name,arg,model,size", [
    # timm's model names: vit_{tiny,small,base,large}_patch{P}_{res}.
    ("noisyvit_imagenet", "res=224", "vit_base_patch16_224", 224),
    ("noisyvit_imagenet", "variant=S/16,res=224", "vit_small_patch16_224", 224),
    ("imagenet_vit", "", "vit_base_patch16_224", 224),
    ("imagenet_vit", "variant=B/32,res=384", "vit_base_patch32_384", 384),
    ("imagenet_vit", "variant=Ti/16", "vit_tiny_patch16_224", 224),
    ("imagenet_vit", "variant=L/16", "vit_large_patch16_224", 224),
    ("imagenet_resnet", "depth=18", "resnet18", 224),
    ("noisycnn_imagenet", "variant=resnet50", "resnet50", 224),
])
def test_variant_and_resolution_arguments(name, arg, model, size):
    config = load_config(name, arg)
    assert (config.model, config.image_size) == (model, size)


@pytest.mark.parametrize("name,arg,message", [
    ("noisyvit_imagenet", "recipe=publishd", "recipe='publishd'"),
    ("noisyvit_imagenet", "variant=B16", "should look like B/16"),
    ("imagenet_vit", "variant=B/x", "should look like B/16"),
    ("imagenet_vit", "variant=X/16", "should look like B/16"),
    ("noisycnn_imagenet", "variant=resnet35", "variant='resnet35'"),
    ("transfer", "dataset=imagenet2012", "dataset='imagenet2012'"),
    ("transfer", "model=vit_small", "must end in its resolution"),
])
def test_bad_config_arguments_are_refused(name, arg, message):
    with pytest.raises(ValueError, match=message):
        load_config(name, arg)


def test_learning_rate_scales_with_the_batch():
    # Goyal et al. 2017 (torchvision's reference): 0.1 per 256 images, SGD
    # momentum 0.9; DeiT: 5e-4 per 512 images, weight decay 0.05, drop path 0.1.
    resnet = load_config("imagenet_resnet", "batch=512")
    assert resnet.lr == pytest.approx(0.2)
    assert (resnet.optimizer, resnet.momentum) == ("sgd", 0.9)
    vit = load_config("imagenet_vit", "batch=2048")
    assert vit.lr == pytest.approx(5e-4 * 2048 / 512)
    assert (vit.weight_decay, vit.model_kwargs.drop_path_rate) == (0.05, 0.1)


def test_imagenet_from_scratch_preprocessing():
    # torchvision's ImageNet reference: RandomResizedCrop scale (0.08, 1),
    # flip, eval Resize(256) + CenterCrop(224) (224 / 256 = 0.875), ImageNet
    # mean/std for ResNets; 1000 classes, scored on the validation split.
    config = load_config("imagenet_resnet")
    assert tuple(config.input.crop_area) == (0.08, 1.0) and config.input.flip
    assert (config.input.eval_resize, config.input.crop_fraction) == ("resize_crop", 0.875)
    assert config.input.normalize == "imagenet"
    assert (config.num_classes, config.train_split, config.eval_split) == (
        1000, "train", "validation")


@pytest.mark.parametrize("arg,classes,size,normalize,site,head", [
    # tfds: cifar100 has 100 classes, oxford_iiit_pet 37. torchvision ResNets
    # take ImageNet mean/std, augreg ViTs mean = std = 0.5 (NOISYNN.md); the
    # published sites: block input for ResNets, attention input for ViTs.
    ("dataset=cifar100,model=vit_small_patch16_384", 100, 384, "minus_one_to_one",
     "attn_input", ("head/.*",)),
    ("dataset=oxford_iiit_pet,model=resnet50", 37, 224, "imagenet", "block_input", ("fc/.*",)),
])
def test_transfer_arguments(arg, classes, size, normalize, site, head):
    config = load_config("transfer", arg)
    assert (config.num_classes, config.image_size, config.input.normalize, config.noise.site,
            tuple(config.init_dont_load)) == (classes, size, normalize, site, head)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_arguments(name, classes):
    config = load_config(name, "model=resnet18,noise=gaussian,layer=2,noise_train=0,"
                               "noise_eval=yes,epochs=3,batch=64,lr=0.5")
    assert (config.dataset, config.num_classes, config.image_size, config.input.channels) == (
        name, classes, 32, 3)
    assert (config.model, config.noise.type, config.noise.layer) == ("resnet18", "gaussian", 2)
    assert (config.noise.train, config.noise.eval) == (False, True)
    assert (config.num_epochs, config.batch_size, config.lr) == (3.0, 64, 0.5)
    # NOISYNN.md: the CNN injects at a residual block's input; no drop path in a ResNet.
    assert config.noise.site == "block_input"
    assert "drop_path_rate" not in config.model_kwargs
    vit = load_config(name, "site=block_input")
    assert (vit.noise.site, vit.model_kwargs.drop_path_rate) == ("block_input", 0.1)


@pytest.mark.parametrize("name", ["default", "fashion_mnist"])
def test_fashion_mnist_arguments(name):
    # default.py: NoisyViT with optimal Q at the attention input of the last
    # block (NOISYNN.md), in training and evaluation; Fashion-MNIST is 28 x 28
    # grayscale with 10 classes.
    config = load_config(name)
    assert (config.noise.type, config.noise.site, config.noise.layer) == (
        "optimal_q", "attn_input", -1)
    assert (config.noise.train, config.noise.eval) == (True, True)
    assert (config.image_size, config.input.channels, config.num_classes) == (28, 1, 10)
    assert config.model == "vit_nano_patch7_28"  # README: a ViT with 7 x 7 patches
    config = load_config(name, "model=resnet18_small,noise=circulant,noise_eval=false,"
                               "epochs=3,batch=64,lr=0.01")
    assert (config.model, config.noise.type, config.noise.site) == (
        "resnet18_small", "circulant", "block_input")
    assert (config.noise.train, config.noise.eval) == (True, False)
    assert (config.num_epochs, config.batch_size, config.lr) == (3.0, 64, 0.01)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_runlocal_is_a_tiny_run_on_any_device_count(name, monkeypatch):
    config = load_config(name, "runlocal")
    assert config.runlocal and config.total_steps == 2
    # One length and one warm-up, in steps: never both (validation refuses it).
    assert config.num_epochs == 0 and config.warmup_epochs == 0 and config.eval_every_epochs == 0
    assert config.batch_size <= 16 and 0 < config.eval_max_examples <= 64
    assert not config.init_required and config.image_size <= 32
    for devices in (1, 8):  # the eval batch resolves on one device as on a pod slice
        monkeypatch.setattr(jax, "device_count", lambda: devices)
        resolved = ml_collections.ConfigDict(config.to_dict())
        train.resolve_eval_batch_size(resolved)
        assert 0 < resolved.eval_batch_size <= 16


def test_schedule_default_is_what_runs_before_the_key_did():
    # A saved run without warmup_prefix resumes as warmup_prefix=True (README,
    # "When resuming"): the shared default must be that behaviour, the decay
    # after the warm-up (optax's join, big_vision).
    from noisy_flax import workdir
    assert common.base_config().warmup_prefix == workdir.ADDED_KEYS["warmup_prefix"]
    assert load_config("transfer").warmup_prefix is True


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

    def test_booleans_spaces_and_numbers(self):
        defaults = dict(flag=False, other=True, batch=8, lr=1.0, name="x")
        for raw, value in [("1", True), ("yes", True), ("True", True), ("TRUE", True),
                           ("0", False), ("no", False), ("False", False)]:
            assert common.parse_arg(f"flag={raw}", **defaults).flag is value
            assert common.parse_arg(f"other={raw}", **defaults).other is value
        a = common.parse_arg(" batch = 64 , lr = 2 , name = resnet18 , flag ", **defaults)
        assert (a.batch, a.lr, a.name, a.flag) == (64, 2.0, "resnet18", True)
        assert type(a.lr) is float and type(a.batch) is int
        # '/' and '=' after the first '=' belong to the value.
        assert common.parse_arg("name=B/16", **defaults).name == "B/16"
        assert common.parse_arg("name=a=b", **defaults).name == "a=b"

    def test_unknown_key_lists_the_known_ones(self):
        with pytest.raises(ValueError, match=r"unknown config argument 'zzz'; this config "
                                             r"takes batch, runlocal"):
            common.parse_arg("zzz=1", runlocal=False, batch=8)

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

"""Parity with PyTorch: timm ViTs and torchvision ResNets, saved as
safetensors and loaded with noisy_flax.pretrained, give the PyTorch logits.

Needs the torch extra (pip install -e '.[torch]' plus torchvision); skips
without it, so CI runs none of this. The measured differences are recorded
in benchmarks/parity.md. Run:  python -m pytest tests/test_parity_torch.py -v -s
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (the 'torch' extra)")
timm = pytest.importorskip("timm", reason="parity tests need timm (the 'torch' extra)")
torchvision = pytest.importorskip("torchvision", reason="parity tests need torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch",
                                        reason="parity tests need safetensors (the 'torch' extra)")

from noisy_flax import pretrained  # noqa: E402
from noisy_flax.models import create_model  # noqa: E402

TOLERANCE = 1e-4  # max abs logit difference in fp32
BATCH = 2


def _perturb_all_parameters(module, generator) -> None:
    """Random init leaves LayerNorm/BatchNorm at ones and zeros, where a swapped
    scale and bias would go unnoticed: move every parameter a little."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))


def _randomise_batchnorm_statistics(module, generator) -> None:
    """Running statistics that matter (fresh ones are 0 and 1)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                count = layer.num_features
                layer.running_mean.copy_(0.1 * torch.randn(count, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(count, generator=generator))
                layer.weight.copy_(0.5 + 0.5 * torch.rand(count, generator=generator))
                layer.bias.copy_(0.1 * torch.randn(count, generator=generator))


def _logit_difference(torch_model, name: str, side: int, tmp_path,
                      **model_kwargs) -> tuple[float, float]:
    torch_model.eval()
    path = tmp_path / f"{name}.safetensors"
    safetensors_torch.save_file(torch_model.state_dict(), str(path))
    images = np.random.default_rng(0).standard_normal((BATCH, 3, side, side)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()

    model = create_model(name, num_classes=expected.shape[-1], **model_kwargs)
    variables = pretrained.load_params(str(path), model)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits = np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
    difference = float(np.max(np.abs(logits - expected)))
    print(f"\nparity {name} {model_kwargs or ''}: max abs logit difference {difference:.3g} "
          f"(max |logit| {np.max(np.abs(expected)):.3g})")
    return difference, float(np.max(np.abs(expected)))


@pytest.mark.parametrize("name,side", [("vit_tiny_patch16_224", 224),
                                       ("vit_base_patch16_224", 224),
                                       ("vit_base_patch16_384", 384)])
def test_timm_vit_logits_match(name, side, tmp_path):
    torch.manual_seed(0)  # timm's own initialisation draws from the global generator
    generator = torch.Generator().manual_seed(0)
    torch_model = timm.create_model(name, pretrained=False)
    _perturb_all_parameters(torch_model, generator)
    difference, scale = _logit_difference(torch_model, name, side, tmp_path)
    assert scale > 0.1, "logits too small to tell a wrong mapping from a right one"
    assert difference <= TOLERANCE


# "auto" picks direct convolutions for this small batch; "winograd" takes
# every stride-1 3x3 convolution, so both forms are held to torchvision.
@pytest.mark.parametrize("conv_algorithm", ["direct", "winograd"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_logits_match(name, conv_algorithm, tmp_path):
    torch.manual_seed(0)  # torchvision's own initialisation draws from the global generator
    generator = torch.Generator().manual_seed(0)
    torch_model = getattr(torchvision.models, name)(weights=None)
    _perturb_all_parameters(torch_model, generator)
    _randomise_batchnorm_statistics(torch_model, generator)
    difference, scale = _logit_difference(torch_model, name, 224, tmp_path,
                                          conv_algorithm=conv_algorithm)
    assert scale > 0.1, "logits too small to tell a wrong mapping from a right one"
    assert difference <= TOLERANCE


def test_torch_pth_file_loads_like_its_safetensors(tmp_path):
    """A .pth state dict goes through torch.load(weights_only=True) to the same arrays."""
    torch_model = torchvision.models.resnet18(weights=None)
    torch.save(torch_model.state_dict(), tmp_path / "resnet18.pth")
    safetensors_torch.save_file(torch_model.state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = create_model("resnet18", num_classes=1000)
    from_pth = pretrained.load_params(str(tmp_path / "resnet18.pth"), model)
    from_safetensors = pretrained.load_params(str(tmp_path / "resnet18.safetensors"), model)
    jax.tree.map(np.testing.assert_array_equal, from_pth, from_safetensors)


class _NotAWeight:
    """A pickled object of a class of its own: what weights_only must refuse."""


def test_training_checkpoints_with_args_load_and_other_objects_are_one_line(tmp_path):
    """timm's CheckpointSaver writes {'state_dict': ..., 'args': Namespace}; any
    other Python object stays refused, with one line that says why."""
    import argparse
    state = torchvision.models.resnet18(weights=None).state_dict()
    model = create_model("resnet18", num_classes=1000)
    torch.save({"epoch": 3, "state_dict": state, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "timm_train.pth")
    safetensors_torch.save_file(state, str(tmp_path / "plain.safetensors"))
    jax.tree.map(np.testing.assert_array_equal,
                 pretrained.load_params(str(tmp_path / "timm_train.pth"), model),
                 pretrained.load_params(str(tmp_path / "plain.safetensors"), model))
    torch.save({"state_dict": state, "extra": _NotAWeight()}, tmp_path / "object.pth")
    with pytest.raises(pretrained.CheckpointError) as refused:
        pretrained.load_params(str(tmp_path / "object.pth"), model)
    message = str(refused.value)
    assert "\n" not in message and "holds Python objects besides tensors" in message

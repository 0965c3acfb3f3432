"""noisy_flax.pretrained without torch: files written here in each layout,
loaded back and checked against where the values must land."""
import contextlib
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage
from etils import epath
from flax import traverse_util

from noisy_flax import pretrained
from noisy_flax.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = "vit_nano_patch4_32"  # width 64, 6 blocks, 4 heads, 8x8 patches
WIDTH, DEPTH, HEADS, MLP, PATCH, GRID = 64, 6, 4, 128, 4, 8
HEAD_DIM = WIDTH // HEADS


# ---------------------------------------------------------------------------
# Files in each layout
# ---------------------------------------------------------------------------
def _flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def vit_params():
    """Random (not init-valued) params of the tiny ViT, flat pre-Linen names."""
    model = create_model(VIT, num_classes=10)
    shapes = _flat(jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3)))["params"])
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(s.shape).astype(np.float32) for name, s in shapes.items()}


def _augreg_npz(tmp_path, flat, name="augreg.npz"):
    path = tmp_path / name
    np.savez(path, **flat)
    return str(path)


SAFETENSORS_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                     np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
                     np.dtype(ml_dtypes.bfloat16): "BF16"}


def _write_safetensors(path, arrays) -> str:
    """The format written by hand: u64 header size, JSON header, raw data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": SAFETENSORS_CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return str(path)


def _timm_vit_state(rng, num_classes=10) -> dict:
    """A timm ViT state dict by its published names and (out, in) shapes."""
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    state = {"cls_token": normal(1, 1, WIDTH), "pos_embed": normal(1, 1 + GRID * GRID, WIDTH),
             "patch_embed.proj.weight": normal(WIDTH, 3, PATCH, PATCH),
             "patch_embed.proj.bias": normal(WIDTH),
             "norm.weight": normal(WIDTH), "norm.bias": normal(WIDTH),
             "head.weight": normal(num_classes, WIDTH), "head.bias": normal(num_classes)}
    for i in range(DEPTH):
        for layer, (out, inp) in {"attn.qkv": (3 * WIDTH, WIDTH), "attn.proj": (WIDTH, WIDTH),
                                  "mlp.fc1": (MLP, WIDTH), "mlp.fc2": (WIDTH, MLP)}.items():
            state[f"blocks.{i}.{layer}.weight"] = normal(out, inp)
            state[f"blocks.{i}.{layer}.bias"] = normal(out)
        for norm in ("norm1", "norm2"):
            state[f"blocks.{i}.{norm}.weight"] = normal(WIDTH)
            state[f"blocks.{i}.{norm}.bias"] = normal(WIDTH)
    return state


def _torchvision_resnet18_state(rng, num_classes=10) -> dict:
    """torchvision's ResNet-18 state dict by its definition (BasicBlock, 2-2-2-2)."""
    state = {}
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)

    def conv(name, out, inp, k):
        state[f"{name}.weight"] = normal(out, inp, k, k)

    def bn(name, c):
        state.update({f"{name}.weight": normal(c), f"{name}.bias": normal(c),
                      f"{name}.running_mean": normal(c),
                      f"{name}.running_var": rng.uniform(0.5, 1.5, c).astype(np.float32),
                      f"{name}.num_batches_tracked": np.array(7, np.int64)})

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for s, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            block = f"layer{s}.{b}"
            conv(f"{block}.conv1", planes, inplanes, 3)
            bn(f"{block}.bn1", planes)
            conv(f"{block}.conv2", planes, planes, 3)
            bn(f"{block}.bn2", planes)
            if inplanes != planes:
                conv(f"{block}.downsample.0", planes, inplanes, 1)
                bn(f"{block}.downsample.1", planes)
            inplanes = planes
    state["fc.weight"] = normal(num_classes, 512)
    state["fc.bias"] = normal(num_classes)
    return state


# ---------------------------------------------------------------------------
# augreg / vit_jax .npz
# ---------------------------------------------------------------------------
def test_first_layer_must_match_the_input_channels(tmp_path, vit_params):
    """RGB weights do not fit a grayscale model; grayscale weights do."""
    model = create_model(VIT, num_classes=10)
    with pytest.raises(pretrained.CheckpointError,
                       match=r"embedding/kernel: checkpoint \(4, 4, 3, 64\), model \(4, 4, 1, 64\)"):
        pretrained.load_params(_augreg_npz(tmp_path, vit_params), model, channels=1)
    gray = dict(vit_params, **{"embedding/kernel": vit_params["embedding/kernel"][:, :, :1]})
    loaded = _flat(pretrained.load_params(_augreg_npz(tmp_path, gray, "gray.npz"), model,
                                          channels=1)["params"])
    np.testing.assert_array_equal(loaded["embedding/kernel"], gray["embedding/kernel"])


def test_augreg_npz_round_trips_exactly(tmp_path, vit_params):
    variables = pretrained.load_params(_augreg_npz(tmp_path, vit_params),
                                       create_model(VIT, num_classes=10))
    assert set(variables) == {"params"}
    loaded = _flat(variables["params"])
    assert loaded.keys() == vit_params.keys()
    for name, value in vit_params.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_old_naming_variants_load_the_same(tmp_path, vit_params):
    """vit_jax's Linen numbering, the old optimizer prefix and posemb placement."""
    linen = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    renamed = {}
    for name, value in vit_params.items():
        for old, new in linen.items():
            name = name.replace(f"/{old}/", f"/{new}/")
        name = name.replace("posembed_input/pos_embedding", "pos_embedding")
        renamed["opt/target/" + name] = value
    assert "opt/target/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in renamed
    variables = pretrained.load_params(_augreg_npz(tmp_path, renamed),
                                       create_model(VIT, num_classes=10))
    loaded = _flat(variables["params"])
    for name, value in vit_params.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_a_remote_file_is_read_through_a_local_copy(tmp_path, vit_params, monkeypatch):
    """gs:// files (the augreg bucket): a stand-in file system that maps the
    bucket to a local folder, as no test touches the network."""
    local = _augreg_npz(tmp_path, vit_params)
    bucket = lambda path: epath.Path(str(path).replace("gs://bucket", str(tmp_path)))
    monkeypatch.setattr(pretrained, "epath", types.SimpleNamespace(Path=bucket))
    model = create_model(VIT, num_classes=10)
    remote = "gs://bucket/" + os.path.basename(local)
    chex.assert_trees_all_equal(pretrained.load_params(remote, model),
                                pretrained.load_params(local, model))
    with pytest.raises(pretrained.CheckpointError, match="no checkpoint at gs://bucket/none.npz"):
        pretrained.read_checkpoint("gs://bucket/none.npz")
    # A remote directory goes to orbax as it is: orbax reads gs:// itself.
    (tmp_path / "converted").mkdir()
    monkeypatch.setattr(pretrained, "_read_orbax", lambda path: {"read_by_orbax": path})
    assert pretrained.read_checkpoint("gs://bucket/converted") == {
        "read_by_orbax": "gs://bucket/converted"}


def test_pickled_npz_is_refused(tmp_path, vit_params):
    flat = dict(vit_params, extra=np.array({"code": "runs on load"}, dtype=object))
    with pytest.raises(pretrained.CheckpointError, match="pickled"):
        pretrained.load_params(_augreg_npz(tmp_path, flat), create_model(VIT, num_classes=10))


# ---------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("old,new", [(7, (12, 12)), (24, (16, 16)), (8, (5, 11)), (3, (1, 4))])
def test_resampled_posemb_equals_scipy_zoom(old, new):
    posemb = np.random.default_rng(1).standard_normal((1, 1 + old * old, 6))
    resampled = pretrained.resample_posemb(posemb, new)
    grid = posemb[0, 1:].reshape(old, old, 6)
    expected = scipy.ndimage.zoom(grid, (new[0] / old, new[1] / old, 1), order=1)
    np.testing.assert_array_equal(resampled[0, :1], posemb[0, :1])  # the class token stays
    np.testing.assert_allclose(resampled[0, 1:].reshape(expected.shape), expected, atol=1e-12)


def test_resample_takes_a_token_count():
    posemb = np.random.default_rng(2).standard_normal((1, 1 + 14 * 14, 4)).astype(np.float32)
    assert pretrained.resample_posemb(posemb, 1 + 24 * 24).shape == (1, 577, 4)
    with pytest.raises(pretrained.CheckpointError, match="square"):
        pretrained.resample_posemb(posemb, 1 + 24 * 23)


def test_checkpoint_at_another_resolution_is_resampled(tmp_path, vit_params):
    """The res_384 case: a grid of 8 loaded into a model built for 48 px (grid 12)."""
    model = create_model("vit_nano_patch4_48", num_classes=10)
    variables = pretrained.load_params(_augreg_npz(tmp_path, vit_params), model)
    posemb = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    source = vit_params["Transformer/posembed_input/pos_embedding"]
    old = int(round(np.sqrt(source.shape[1] - 1)))
    grid = np.asarray(source[0, 1:], np.float64).reshape(old, old, -1)
    expected = scipy.ndimage.zoom(grid, (12 / old, 12 / old, 1), order=1)
    np.testing.assert_array_equal(posemb[0, :1], source[0, :1])
    np.testing.assert_allclose(posemb[0, 1:].reshape(expected.shape), expected, atol=1e-6)
    logits = model.apply(variables, np.zeros((1, 48, 48, 3), np.float32))
    assert logits.shape == (1, 10)


def test_image_size_sets_the_grid_the_posemb_is_resampled_to(tmp_path, vit_params):
    """A model built for 32 px that will see 48 px images (fine-tuning at a
    higher resolution): the grid follows image_size, not the model name."""
    model = create_model(VIT, num_classes=10)
    variables = pretrained.load_params(_augreg_npz(tmp_path, vit_params), model, image_size=48)
    posemb = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    source = vit_params["Transformer/posembed_input/pos_embedding"]
    side = 48 // PATCH
    assert posemb.shape == (1, 1 + side * side, WIDTH)
    grid = np.asarray(source[0, 1:], np.float64).reshape(GRID, GRID, WIDTH)
    expected = scipy.ndimage.zoom(grid, (side / GRID, side / GRID, 1), order=1)
    np.testing.assert_array_equal(posemb[0, :1], source[0, :1])
    np.testing.assert_allclose(posemb[0, 1:].reshape(expected.shape), expected, atol=1e-6)


# ---------------------------------------------------------------------------
# Head, representation layer, dont_load
# ---------------------------------------------------------------------------
def test_head_is_new_when_the_class_count_differs(tmp_path, vit_params):
    variables = pretrained.load_params(_augreg_npz(tmp_path, vit_params),
                                       create_model(VIT, num_classes=10), num_classes=5)
    params = variables["params"]
    assert params["head"]["kernel"].shape == (WIDTH, 5)
    np.testing.assert_array_equal(params["head"]["kernel"], 0)  # the ViT head's zero init
    np.testing.assert_array_equal(params["cls"], vit_params["cls"])


def test_resnet_fc_is_new_when_the_class_count_differs(tmp_path):
    """The ResNet's classifier is 'fc': a 10-class file into a 5-class model."""
    state = _torchvision_resnet18_state(np.random.default_rng(8))
    path = _write_safetensors(tmp_path / "resnet18.safetensors", state)
    params = _flat(pretrained.load_params(path, create_model("resnet18", num_classes=10),
                                          num_classes=5)["params"])
    assert params["fc/kernel"].shape == (512, 5)
    np.testing.assert_array_equal(params["fc/bias"], 0)  # nn.Dense's zero bias init
    np.testing.assert_array_equal(params["conv1/kernel"],
                                  state["conv1.weight"].transpose(2, 3, 1, 0))


def test_a_file_without_a_head_loads_only_with_the_head_reset(tmp_path, vit_params):
    """A headless file (a feature extractor) must not quietly give a fresh head."""
    path = _augreg_npz(tmp_path, {k: v for k, v in vit_params.items()
                                  if not k.startswith("head/")})
    model = create_model(VIT, num_classes=10)
    with pytest.raises(pretrained.CheckpointError,
                       match=r"(?s)2 missing.*params/head/kernel"):
        pretrained.load_params(path, model)
    variables = pretrained.load_params(path, model, dont_load=["head/.*"])
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], 0)
    np.testing.assert_array_equal(variables["params"]["cls"], vit_params["cls"])


def test_representation_layer_is_dropped_only_with_a_new_head(tmp_path, vit_params):
    """vit_jax drops pre_logits when it resets the head. Keeping a head that
    was trained on tanh(pre_logits(x)) without that layer gives wrong logits."""
    flat = dict(vit_params, **{"pre_logits/kernel": np.ones((WIDTH, WIDTH), np.float32),
                               "pre_logits/bias": np.ones(WIDTH, np.float32)})
    path = _augreg_npz(tmp_path, flat)
    classes = vit_params["head/kernel"].shape[-1]
    with pytest.raises(pretrained.CheckpointError,
                       match=rf"representation layer \(pre_logits, width {WIDTH}\) .* "
                             rf"representation_size={WIDTH}"):
        pretrained.load_params(path, create_model(VIT, num_classes=classes))
    for model, dont_load in ((create_model(VIT, num_classes=classes + 1), ()),
                             (create_model(VIT, num_classes=classes), ("head/.*",))):
        variables = pretrained.load_params(path, model, dont_load=dont_load)
        assert "pre_logits" not in variables["params"]
        np.testing.assert_array_equal(variables["params"]["head"]["kernel"], 0)  # a new head
    # Resetting only the bias keeps the file's kernel, which still needs pre_logits.
    with pytest.raises(pretrained.CheckpointError, match="representation layer"):
        pretrained.load_params(path, create_model(VIT, num_classes=classes),
                               dont_load=["head/bias"])
    kept = pretrained.load_params(path, create_model(VIT, num_classes=classes,
                                                     representation_size=WIDTH))
    np.testing.assert_array_equal(kept["params"]["pre_logits"]["kernel"], 1)


def test_dont_load_keeps_the_initial_values(tmp_path, vit_params):
    path = _augreg_npz(tmp_path, vit_params)
    model = create_model(VIT, num_classes=10)
    variables = pretrained.load_params(path, model, dont_load=["Transformer/encoderblock_0/.*"])
    block = _flat(variables["params"]["Transformer"]["encoderblock_0"])
    np.testing.assert_array_equal(block["LayerNorm_0/scale"], 1)  # LayerNorm's init
    assert not np.array_equal(
        block["MlpBlock_3/Dense_0/kernel"],
        vit_params["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"])
    np.testing.assert_array_equal(variables["params"]["cls"], vit_params["cls"])
    with pytest.raises(pretrained.CheckpointError, match="match no name"):
        pretrained.load_params(path, model, dont_load=["Transformer/encoderblock_99/.*"])


def test_dont_load_patterns_match_whole_names(tmp_path, vit_params):
    """'head' is not 'head/.*': a pattern that only begins a name matches nothing."""
    with pytest.raises(pretrained.CheckpointError, match=r"patterns \['head'\] match no name"):
        pretrained.load_params(_augreg_npz(tmp_path, vit_params),
                               create_model(VIT, num_classes=10), dont_load=["head"])


def test_dont_load_skips_file_names_that_have_no_place(tmp_path):
    """A timm name we have no layer for (LayerScale) is ignored when dont_load names it."""
    state = dict(_timm_vit_state(np.random.default_rng(3)),
                 **{"blocks.0.ls1.gamma": np.ones(WIDTH, np.float32)})
    path = _write_safetensors(tmp_path / "timm.safetensors", state)
    params = pretrained.load_params(path, create_model(VIT, num_classes=10),
                                    dont_load=[r"blocks\.0\.ls1\..*"])["params"]
    np.testing.assert_array_equal(params["cls"], state["cls_token"])


def test_dont_load_skips_blocks_the_model_does_not_have(tmp_path, vit_params):
    """A deeper checkpoint's extra blocks are ignored when dont_load names them."""
    extra = {f"Transformer/encoderblock_{DEPTH}/LayerNorm_0/scale": np.ones(WIDTH, np.float32),
             f"Transformer/encoderblock_{DEPTH}/LayerNorm_0/bias": np.ones(WIDTH, np.float32)}
    path = _augreg_npz(tmp_path, dict(vit_params, **extra))
    model = create_model(VIT, num_classes=10)
    with pytest.raises(pretrained.CheckpointError, match="2 unexpected"):
        pretrained.load_params(path, model)
    params = pretrained.load_params(path, model,
                                    dont_load=[f"Transformer/encoderblock_{DEPTH}/.*"])["params"]
    assert f"encoderblock_{DEPTH}" not in params["Transformer"]
    np.testing.assert_array_equal(params["cls"], vit_params["cls"])


def test_half_precision_checkpoint_loads_in_the_models_dtype(tmp_path, vit_params):
    """float16 files (timm and HF hubs publish them) become the model's float32."""
    half = {name: value.astype(np.float16) for name, value in vit_params.items()}
    loaded = _flat(pretrained.load_params(_augreg_npz(tmp_path, half),
                                          create_model(VIT, num_classes=10))["params"])
    for name, value in half.items():
        assert loaded[name].dtype == np.float32, name
        np.testing.assert_array_equal(loaded[name], value.astype(np.float32), err_msg=name)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
def test_missing_unexpected_and_misshaped_names_are_listed(tmp_path, vit_params):
    flat = dict(vit_params)
    del flat["Transformer/encoder_norm/scale"]
    flat["Transformer/encoderblock_9/LayerNorm_0/scale"] = np.ones(WIDTH, np.float32)
    flat["cls"] = np.zeros((1, 1, WIDTH + 1), np.float32)
    with pytest.raises(pretrained.CheckpointError) as error:
        pretrained.load_params(_augreg_npz(tmp_path, flat), create_model(VIT, num_classes=10))
    message = str(error.value)
    assert message.splitlines()[0].endswith(
        "1 missing, 1 unexpected, 1 mis-shaped names (a different model size? dont_load=... "
        "skips names on purpose)")
    assert "missing:\n  params/Transformer/encoder_norm/scale" in message
    assert "unexpected:\n  params/Transformer/encoderblock_9/LayerNorm_0/scale" in message
    assert "mis-shaped:\n  params/cls: checkpoint (1, 1, 65), model (1, 1, 64)" in message


def test_long_name_lists_are_cut_at_fifty_and_counted(tmp_path, vit_params):
    """Fifty names are listed per kind of error; the rest are only counted."""
    model = create_model(VIT, num_classes=10)
    names = sorted(vit_params)
    assert len(names) > 53
    for dropped, listed, more in ((50, 50, None), (53, 50, "  ... and 3 more")):
        kept = {k: v for k, v in vit_params.items() if k not in names[:dropped]}
        with pytest.raises(pretrained.CheckpointError, match=f"{dropped} missing") as error:
            pretrained.load_params(_augreg_npz(tmp_path, kept, f"{dropped}.npz"), model)
        lines = str(error.value).splitlines()
        assert sum(line.startswith("  params/") for line in lines) == listed
        assert lines[-1] == more if more else lines[-1].startswith("  params/")


def test_a_flax_resnet_checkpoint_into_vit_is_refused(tmp_path):
    """Flax names (a converted ResNet) tell the architecture too."""
    path = _augreg_npz(tmp_path, {"conv1/kernel": np.ones((7, 7, 3, 64), np.float32),
                                  "batch_stats/bn1/mean": np.zeros(64, np.float32)})
    with pytest.raises(pretrained.CheckpointError,
                       match=r"this checkpoint is a ResNet \(Flax / vit_jax layout\) but the "
                             "model is a ViT"):
        pretrained.load_params(path, create_model(VIT, num_classes=10))


def test_a_timm_vit_of_a_width_the_heads_do_not_divide_is_reported(tmp_path):
    """Width 70 over 4 heads: reported as a mis-shaped attention, not a reshape crash."""
    rng = np.random.default_rng(9)
    state = _timm_vit_state(rng)
    state["blocks.0.attn.qkv.weight"] = rng.standard_normal((3 * 70, 70)).astype(np.float32)
    state["blocks.0.attn.qkv.bias"] = rng.standard_normal(3 * 70).astype(np.float32)
    path = _write_safetensors(tmp_path / "timm.safetensors", state)
    with pytest.raises(pretrained.CheckpointError,
                       match=r"mis-shaped:\n(  .*\n)*  params/Transformer/encoderblock_0/"
                             r"MultiHeadDotProductAttention_1/query/kernel: checkpoint"):
        pretrained.load_params(path, create_model(VIT, num_classes=10))


def test_a_larger_model_is_reported_not_loaded(tmp_path, vit_params):
    with pytest.raises(pretrained.CheckpointError, match="mis-shaped"):
        pretrained.load_params(_augreg_npz(tmp_path, vit_params),
                               create_model("vit_tiny_patch4_32", num_classes=10))
    # At another grid too, the file's own posemb shape is reported, not a resampled one.
    posemb = {pretrained.POSEMB: vit_params["Transformer/posembed_input/pos_embedding"]}
    with pytest.raises(pretrained.CheckpointError, match=r"pos_embedding: checkpoint "
                                                         r"\(1, 65, 64\), model \(1, 197, 192\)"):
        pretrained.fit_to_model(posemb, create_model("vit_tiny_patch16_224", num_classes=10))


def test_vit_checkpoint_into_resnet_is_refused(tmp_path, vit_params):
    with pytest.raises(pretrained.CheckpointError,
                       match="this checkpoint is a ViT .* but the model is a ResNet"):
        pretrained.load_params(_augreg_npz(tmp_path, vit_params),
                               create_model("resnet18", num_classes=10))


def test_resnet_checkpoint_into_vit_is_refused(tmp_path):
    path = _write_safetensors(tmp_path / "r.safetensors",
                              _torchvision_resnet18_state(np.random.default_rng(0)))
    with pytest.raises(pretrained.CheckpointError,
                       match="this checkpoint is a ResNet .* but the model is a ViT"):
        pretrained.load_params(path, create_model(VIT, num_classes=10))


def test_unknown_files_are_refused(tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(pretrained.CheckpointError, match="neither"):
        pretrained.load_params(str(junk), create_model(VIT, num_classes=10))
    # A '{' at byte 8 after no plausible header size is not a cut-off .safetensors either.
    junk.write_bytes(b"\xff" * 8 + b"{ not a checkpoint")
    with pytest.raises(pretrained.CheckpointError, match="neither"):
        pretrained.read_checkpoint(str(junk))
    with pytest.raises(pretrained.CheckpointError, match="no checkpoint"):
        pretrained.load_params(str(tmp_path / "absent.npz"), create_model(VIT, num_classes=10))


def test_torch_file_without_torch_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as archive:  # the shape of a torch.save file
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("model/data/0", b"\x00" * 16)
        archive.writestr("model/version", b"3\n")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(pretrained.CheckpointError, match="needs torch"):
        pretrained.load_params(str(path), create_model(VIT, num_classes=10))


class _Tensor:
    """What the loader uses of a torch tensor."""

    def __init__(self, array):
        self.array, self.dtype = array, array.dtype

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


def _stand_in_torch(loaded):
    """A torch module whose torch.load returns ``loaded`` (or raises it)."""
    def load(path, map_location, weights_only):
        assert weights_only is True
        if isinstance(loaded, Exception):
            raise loaded
        return loaded
    serialization = types.SimpleNamespace(safe_globals=lambda names: contextlib.nullcontext())
    return types.SimpleNamespace(load=load, serialization=serialization, bfloat16="bfloat16")


def test_a_data_parallel_training_checkpoint_loads_without_its_module_prefix(
        tmp_path, monkeypatch):
    """torch.nn.DataParallel saves every name under 'module.'; timm's training
    checkpoints wrap the weights with their epoch and arguments."""
    state = _timm_vit_state(np.random.default_rng(7))
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": _Tensor(v) for k, v in state.items()}}
    monkeypatch.setitem(sys.modules, "torch", _stand_in_torch(wrapped))
    path = tmp_path / "train.pth"
    path.write_bytes(b"\x80\x02")  # torch's legacy (pickle) format starts so
    params = _flat(pretrained.load_params(str(path), create_model(VIT, num_classes=10))["params"])
    np.testing.assert_array_equal(params["cls"], state["cls_token"])
    np.testing.assert_array_equal(params["head/kernel"], state["head.weight"].T)


def test_bfloat16_torch_tensors_stay_bfloat16(tmp_path, monkeypatch):
    """numpy cannot take torch's bfloat16 directly: it goes through float32 and
    comes back as ml_dtypes' bfloat16, values unchanged."""
    values = np.array([1.5, -0.0078125, 2.0 ** 100], np.float32)  # exact in bfloat16

    class BFloat16Tensor(_Tensor):
        def __init__(self, array):
            super().__init__(array)
            self.dtype = "bfloat16"  # the stand-in's torch.bfloat16

        def float(self):
            return _Tensor(self.array.astype(np.float32))

    monkeypatch.setitem(sys.modules, "torch", _stand_in_torch(
        {"w": BFloat16Tensor(values.astype(ml_dtypes.bfloat16))}))
    path = tmp_path / "bf16.pth"
    path.write_bytes(b"\x80\x02")
    loaded = pretrained.read_checkpoint(str(path))["w"]
    assert loaded.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(loaded.astype(np.float32), values)


def test_a_torch_file_with_python_objects_is_refused_with_the_reason(tmp_path, monkeypatch):
    refusal = pickle.UnpicklingError("Weights only load failed. This file can still be loaded, "
                                     "to do so you have two options")  # torch 2's words
    monkeypatch.setitem(sys.modules, "torch", _stand_in_torch(refusal))
    path = tmp_path / "evil.pth"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(pretrained.CheckpointError, match="holds Python objects besides tensors"):
        pretrained.read_checkpoint(str(path))
    monkeypatch.setitem(sys.modules, "torch", _stand_in_torch(EOFError("Ran out of input")))
    with pytest.raises(pretrained.CheckpointError,
                       match=r"could not be read as a PyTorch file \(Ran out of input\)"):
        pretrained.read_checkpoint(str(path))


# ---------------------------------------------------------------------------
# timm ViT and torchvision ResNet layouts, as safetensors
# ---------------------------------------------------------------------------
def test_timm_vit_values_land_where_they_belong(tmp_path):
    state = _timm_vit_state(np.random.default_rng(3))
    path = _write_safetensors(tmp_path / "timm.safetensors", state)
    params = _flat(pretrained.load_params(path, create_model(VIT, num_classes=10))["params"])
    block = "Transformer/encoderblock_2"
    attention = f"{block}/MultiHeadDotProductAttention_1"
    qkv = state["blocks.2.attn.qkv.weight"]  # rows: (query, key, value) x heads x head_dim
    for i, h, d in [(0, 0, 0), (5, 1, 3), (63, 3, 15), (17, 2, 9)]:
        for s, part in enumerate(("query", "key", "value")):
            row = s * WIDTH + h * HEAD_DIM + d
            assert params[f"{attention}/{part}/kernel"][i, h, d] == qkv[row, i]
            assert params[f"{attention}/{part}/bias"][h, d] == state["blocks.2.attn.qkv.bias"][row]
        assert params[f"{attention}/out/kernel"][h, d, i] == \
            state["blocks.2.attn.proj.weight"][i, h * HEAD_DIM + d]
    conv = state["patch_embed.proj.weight"]  # (out, in, y, x) -> (y, x, in, out)
    assert params["embedding/kernel"][1, 3, 2, 40] == conv[40, 2, 1, 3]
    assert params["head/kernel"][7, 4] == state["head.weight"][4, 7]
    assert params[f"{block}/MlpBlock_3/Dense_1/kernel"][100, 5] == state["blocks.2.mlp.fc2.weight"][5, 100]
    np.testing.assert_array_equal(params[f"{block}/LayerNorm_2/scale"], state["blocks.2.norm2.weight"])
    np.testing.assert_array_equal(params["Transformer/encoder_norm/bias"], state["norm.bias"])
    np.testing.assert_array_equal(params["Transformer/posembed_input/pos_embedding"],
                                  state["pos_embed"])
    np.testing.assert_array_equal(params["cls"], state["cls_token"])


def test_timm_embeddings_alone_are_a_timm_vit():
    """A file of only the class token and position embedding (timm names) is a ViT's."""
    arrays = {"cls_token": np.zeros((1, 1, WIDTH)), "pos_embed": np.zeros((1, 65, WIDTH))}
    assert pretrained.checkpoint_layout(arrays) == ("timm_vit", "ViT")


def test_timm_representation_layer_lands_in_pre_logits(tmp_path):
    """Older timm ViTs (representation_size) name it pre_logits.fc, a Linear (out, in)."""
    rng = np.random.default_rng(6)
    state = dict(_timm_vit_state(rng),
                 **{"pre_logits.fc.weight": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
                    "pre_logits.fc.bias": rng.standard_normal(WIDTH).astype(np.float32)})
    path = _write_safetensors(tmp_path / "timm.safetensors", state)
    params = _flat(pretrained.load_params(
        path, create_model(VIT, num_classes=10, representation_size=WIDTH))["params"])
    np.testing.assert_array_equal(params["pre_logits/kernel"], state["pre_logits.fc.weight"].T)
    np.testing.assert_array_equal(params["pre_logits/bias"], state["pre_logits.fc.bias"])


def test_unknown_timm_names_are_unexpected(tmp_path):
    state = dict(_timm_vit_state(np.random.default_rng(3)),
                 **{"blocks.0.ls1.gamma": np.ones(WIDTH, np.float32)})
    path = _write_safetensors(tmp_path / "timm.safetensors", state)
    with pytest.raises(pretrained.CheckpointError, match="unexpected:\n  blocks.0.ls1.gamma"):
        pretrained.load_params(path, create_model(VIT, num_classes=10))
    # A name that only begins like one of ours (CLIP's norm_pre) is listed as the file has it.
    state = dict(_timm_vit_state(np.random.default_rng(3)),
                 **{"norm_pre.weight": np.ones(WIDTH, np.float32)})
    path = _write_safetensors(tmp_path / "clip.safetensors", state)
    with pytest.raises(pretrained.CheckpointError, match="unexpected:\n  norm_pre.weight"):
        pretrained.load_params(path, create_model(VIT, num_classes=10))
    # A known module with a leaf we do not have, or a weight of no known rank.
    for name, value in (("norm.gamma", np.ones(WIDTH, np.float32)),
                        ("head.weight", np.ones((10, WIDTH, 1), np.float32))):
        state = dict(_timm_vit_state(np.random.default_rng(3)), **{name: value})
        path = _write_safetensors(tmp_path / "odd.safetensors", state)
        with pytest.raises(pretrained.CheckpointError, match=rf"unexpected:\n  {name}($|\n)"):
            pretrained.load_params(path, create_model(VIT, num_classes=10))


def test_torchvision_resnet_values_land_where_they_belong(tmp_path):
    state = _torchvision_resnet18_state(np.random.default_rng(4))
    path = _write_safetensors(tmp_path / "resnet18.safetensors", state)
    variables = pretrained.load_params(path, create_model("resnet18", num_classes=10))
    params, stats = _flat(variables["params"]), _flat(variables["batch_stats"])
    assert params["conv1/kernel"][6, 2, 1, 33] == state["conv1.weight"][33, 1, 6, 2]
    assert params["layer3_0/downsample_conv/kernel"][0, 0, 100, 7] == \
        state["layer3.0.downsample.0.weight"][7, 100, 0, 0]
    np.testing.assert_array_equal(params["layer2_1/bn2/scale"], state["layer2.1.bn2.weight"])
    np.testing.assert_array_equal(params["layer4_0/downsample_bn/bias"],
                                  state["layer4.0.downsample.1.bias"])
    np.testing.assert_array_equal(stats["layer2_1/bn2/mean"], state["layer2.1.bn2.running_mean"])
    np.testing.assert_array_equal(stats["bn1/var"], state["bn1.running_var"])
    np.testing.assert_array_equal(params["fc/kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(params["fc/bias"], state["fc.bias"])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int64])
def test_safetensors_dtypes_decode(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    path = _write_safetensors(tmp_path / "a.safetensors", {"a": array, "b": array[0]})
    arrays = pretrained.read_safetensors(path)
    assert arrays["a"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arrays["a"], array)
    np.testing.assert_array_equal(arrays["b"], array[0])


def test_a_safetensors_file_of_empty_tensors_ends_with_its_header(tmp_path):
    path = _write_safetensors(tmp_path / "e.safetensors", {"e": np.zeros((0, 3), np.float32)})
    arrays = pretrained.read_checkpoint(path)
    assert list(arrays) == ["e"] and arrays["e"].shape == (0, 3)


def test_a_truncated_safetensors_file_says_so(tmp_path):
    path = _write_safetensors(tmp_path / "a.safetensors", {"a": np.ones((64, 64), np.float32)})
    data = open(path, "rb").read()
    header = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:header // 2])  # the download stopped inside the header
    with pytest.raises(pretrained.CheckpointError,
                       match=rf"is a truncated .safetensors file \(its header alone needs "
                             rf"{header + 8} bytes, the file has {header // 2}\)"):
        pretrained.read_checkpoint(str(cut))


def test_a_safetensors_file_cut_in_its_data_or_with_wrong_offsets_is_corrupt(tmp_path):
    path = _write_safetensors(tmp_path / "a.safetensors", {"a": np.ones((64, 64), np.float32)})
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])  # the download stopped inside the tensor data
    with pytest.raises(pretrained.CheckpointError,
                       match=r"corrupt: tensor 'a' should take 16384 bytes but its offsets are "
                             r"0\.\.16384 of 16284"):
        pretrained.read_checkpoint(str(cut))
    # A header whose offsets disagree with the shape: 64 * 64 float32 are 16384 bytes.
    header_size = int.from_bytes(data[:8], "little")
    header = data[8:8 + header_size].replace(b"[0, 16384]", b"[0, 16000]")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + header + data[8 + header_size:])
    with pytest.raises(pretrained.CheckpointError, match=r"offsets are 0\.\.16000 of 16384"):
        pretrained.read_checkpoint(str(bad))


def test_safetensors_reader_agrees_with_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy",
                                            reason="the safetensors package is not installed")
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(4, np.float16)}
    safetensors_numpy.save_file(arrays, str(tmp_path / "p.safetensors"))
    ours = pretrained.read_safetensors(str(tmp_path / "p.safetensors"))
    for name, value in arrays.items():
        np.testing.assert_array_equal(ours[name], value)


# ---------------------------------------------------------------------------
# convert -> orbax -> load_variables
# ---------------------------------------------------------------------------
def test_convert_round_trips_through_orbax(tmp_path, vit_params):
    src = _augreg_npz(tmp_path, vit_params)
    dst = str(tmp_path / "converted")
    assert pretrained.main(["convert", src, dst, "--model", VIT]) == 0
    model = create_model(VIT, num_classes=10)
    from_orbax = pretrained.load_variables(dst, model, num_classes=10)
    from_npz = pretrained.load_params(src, model)
    jax.tree.map(np.testing.assert_array_equal, from_orbax, from_npz)


def test_convert_gives_the_head_the_class_count_asked_for(tmp_path, vit_params):
    """--num_classes 3 for a 10-class file: the written head is a new one of 3."""
    dst = str(tmp_path / "converted")
    assert pretrained.main(["convert", _augreg_npz(tmp_path, vit_params), dst, "--model", VIT,
                            "--num_classes", "3"]) == 0
    written = pretrained.read_checkpoint(dst)
    np.testing.assert_array_equal(written["params/head/kernel"], np.zeros((WIDTH, 3)))
    np.testing.assert_array_equal(written["params/cls"], vit_params["cls"])


def test_convert_keeps_batch_statistics(tmp_path):
    state = _torchvision_resnet18_state(np.random.default_rng(5))
    src = _write_safetensors(tmp_path / "resnet18.safetensors", state)
    dst = str(tmp_path / "converted")
    assert pretrained.main(["convert", src, dst, "--model", "resnet18", "--num_classes", "10"]) == 0
    model = create_model("resnet18", num_classes=10)
    from_orbax = pretrained.load_variables(dst, model)
    assert set(from_orbax) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, from_orbax, pretrained.load_params(src, model))


def test_convert_refuses_sizes_below_one(tmp_path, vit_params, capsys):
    """--num_classes 0 would otherwise fall back to the file's class count."""
    src, dst = _augreg_npz(tmp_path, vit_params), tmp_path / "converted"
    for flag in ("--num_classes", "--image_size"):
        assert pretrained.main(["convert", src, str(dst), "--model", VIT, flag, "0"]) == 2
        assert f"{flag}=0 must be >= 1" in capsys.readouterr().err
        assert not dst.exists()


def test_convert_command_line(tmp_path, vit_params, capsys):
    """The documented entry point, in a fresh interpreter; then its refusal to overwrite."""
    src = _augreg_npz(tmp_path, vit_params)
    dst = tmp_path / "converted"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "noisy_flax.pretrained", "convert", src, str(dst),
         "--model", VIT, "--num_classes", "3"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    variables = pretrained.load_variables(str(dst), create_model(VIT, num_classes=3))
    assert variables["params"]["head"]["kernel"].shape == (WIDTH, 3)
    assert pretrained.main(["convert", src, str(dst), "--model", VIT]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_training_checkpoint_gives_its_weights_not_their_average():
    """timm's training checkpoints hold both; the EMA is taken only when it is
    all there is."""
    weights, ema = {"w": np.ones(2)}, {"w": np.zeros(2)}
    assert pretrained._state_dict_in({"state_dict_ema": ema, "state_dict": weights}, "x") is weights
    assert pretrained._state_dict_in({"state_dict_ema": ema}, "x") is ema
    # DeiT-style checkpoints call the weights 'model'.
    assert pretrained._state_dict_in({"state_dict_ema": ema, "model": weights}, "x") is weights
    # A bare state dict saved with a counter beside it: the tensors only.
    tensor = _Tensor(np.ones(2, np.float32))
    assert pretrained._state_dict_in({"w": tensor, "epoch": 3}, "x") == {"w": tensor}

"""Pretrained weights: checkpoint files -> Flax variables for our models.

Files recognised by their contents, whatever their names:

* vit_jax / augreg ``.npz`` (pre-Linen names such as
  ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``,
  the Linen renumbering ``MultiHeadDotProductAttention_0``, an ``opt/target/``
  or ``params/`` prefix, the ``res_384`` fine-tunes);
* timm ViT state dicts (``patch_embed.proj``, ``blocks.i.attn.qkv``, ...);
* torchvision (and timm) ResNet state dicts (``conv1``, ``layer1.0.bn1``, ...);
* ``.safetensors`` files (read here, no torch or safetensors package needed),
  ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)`` when torch is
  installed, and orbax directories written by ``convert`` below.

Nothing is unpickled. Every name the model expects must come from the file
(or be reset on purpose: a head with another class count, ``dont_load``), and
every array in the file must find a place; anything else is an error that
lists the names.

    variables = load_params("ViT-B_16.npz", create_model("vit_base_patch16_384", num_classes=10))
    python -m noisy_flax.pretrained convert SRC DST --model vit_base_patch16_224
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import tempfile
import zipfile
from typing import Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from noisy_flax.cli import EXIT_USER_ERROR
from noisy_flax.models import VisionTransformer, create_model, input_size

Arrays = dict[str, np.ndarray]

POSEMB = "params/Transformer/posembed_input/pos_embedding"
CLASSIFIERS = ("head", "fc")  # the ViT's and the ResNet's last layer
MAX_LISTED = 50  # names listed per kind of error; more are counted


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


# ---------------------------------------------------------------------------
# Reading files: {name as stored: numpy array}
# ---------------------------------------------------------------------------
def read_checkpoint(path: str) -> Arrays:
    """Reads any supported file (or orbax directory) into flat numpy arrays;
    ``gs://`` and other remote paths too."""
    path = os.fspath(path)
    if is_remote(path):
        return _read_remote(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    readers = {"orbax": _read_orbax, "npz": _read_npz, "safetensors": read_safetensors,
               "torch": _read_torch}
    return readers[_file_kind(path)](path)


def is_remote(path: str) -> bool:
    return "://" in path


def _read_remote(path: str) -> Arrays:
    """orbax reads a remote directory itself; a file is copied to a local
    temporary one first, since numpy and zipfile read local files."""
    remote = epath.Path(path)
    if not remote.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if remote.is_dir():
        return _read_orbax(path)
    with tempfile.TemporaryDirectory() as local_dir:
        local = os.path.join(local_dir, remote.name)
        remote.copy(local)
        return read_checkpoint(local)


def _file_kind(path: str) -> str:
    if os.path.isdir(path):
        return "orbax"
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as error:
            raise CheckpointError(f"{path} is a damaged zip archive ({error}): an incomplete "
                                  "download? fetch the file again") from error
        # torch.save writes a zip too, holding <name>/data.pkl.
        return "torch" if any(n.endswith("data.pkl") for n in names) else "npz"
    if len(head) == 9 and head[8:9] == b"{":
        header, size = struct.unpack("<Q", head[:8])[0], os.path.getsize(path)
        if header + 8 <= size:
            return "safetensors"
        if header < 1 << 32:  # a plausible JSON header, cut off: not another format
            raise CheckpointError(f"{path} is a truncated .safetensors file (its header alone "
                                  f"needs {header + 8} bytes, the file has {size}): an "
                                  "incomplete download? fetch the file again")
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch's legacy format
        return "torch"
    raise CheckpointError(f"{path} is neither an .npz, a .safetensors, a torch file nor an "
                          "orbax directory")


def _read_npz(path: str) -> Arrays:
    arrays = {}
    with np.load(path, allow_pickle=False) as archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as error:  # numpy refuses object arrays without pickle
                raise CheckpointError(
                    f"{path}: array {name!r} is a pickled Python object, and pickles are never "
                    "loaded (they can run code); save plain arrays with np.savez(path, "
                    "**{'a/b/kernel': array, ...})") from error
    return arrays


# safetensors dtype names -> numpy (x86 and ARM are little-endian, like the format).
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


def read_safetensors(path: str) -> Arrays:
    """Parses a .safetensors file: an 8-byte little-endian header size, a JSON
    header of {name: {dtype, shape, data_offsets}}, then the raw data."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    data_size = os.path.getsize(path) - data_start
    data = np.memmap(path, np.uint8, mode="r", offset=data_start) if data_size else np.zeros(0, np.uint8)
    return {name: _safetensors_array(path, name, entry, data) for name, entry in header.items()}


def _safetensors_array(path: str, name: str, entry: Mapping, data: np.ndarray) -> np.ndarray:
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which is not "
                              f"supported ({', '.join(SAFETENSORS_DTYPES)})")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
    if end - begin != expected or end > data.size:
        raise CheckpointError(f"{path} is corrupt: tensor {name!r} should take {expected} bytes "
                              f"but its offsets are {begin}..{end} of {data.size}")
    return np.array(data[begin:end].view(dtype).reshape(entry["shape"]))


def _read_torch(path: str) -> Arrays:
    try:
        import torch
    except ImportError as error:
        raise CheckpointError(
            f"{path} is a PyTorch file; reading it needs torch (pip install torch), or save it "
            "as .safetensors where torch is installed (safetensors.torch.save_file)") from error
    try:
        # timm's training checkpoints store their argparse arguments beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and containers
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "weights only" in reason.lower() or "weights_only" in reason:
            raise CheckpointError(
                f"{path} holds Python objects besides tensors, and those are never unpickled "
                "(they can run code); where you trust the file, save its state_dict() with "
                "torch.save, or as .safetensors") from error
        raise CheckpointError(f"{path} could not be read as a PyTorch file ({reason}): an "
                              "incomplete download? fetch the file again") from error
    state = _state_dict_in(loaded, path)
    return {name.removeprefix("module."): _torch_to_numpy(tensor) for name, tensor in state.items()}


def _state_dict_in(loaded, path: str) -> Mapping:
    """Training checkpoints wrap the state dict; take the weights, not the EMA or optimizer."""
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            return loaded[key]
    if isinstance(loaded, Mapping):
        return {k: v for k, v in loaded.items() if hasattr(v, "numpy")}
    raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict")


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own
        return tensor.detach().float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.detach().cpu().numpy()


def _read_orbax(path: str) -> Arrays:
    import orbax.checkpoint as ocp
    try:
        tree = ocp.PyTreeCheckpointer().restore(path if is_remote(path) else os.path.abspath(path))
    except Exception as error:
        raise CheckpointError(f"{path} is a directory but not an orbax checkpoint that "
                              f"`python -m noisy_flax.pretrained convert` wrote: {error}") from error
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {name: np.asarray(value) for name, value in flat.items()}


# ---------------------------------------------------------------------------
# Names: any layout -> ours, 'params/...' and 'batch_stats/...'
# ---------------------------------------------------------------------------
def checkpoint_layout(arrays: Mapping[str, np.ndarray]) -> tuple[str, Optional[str]]:
    """(layout, architecture): layout is 'flax', 'timm_vit' or 'torchvision_resnet';
    architecture 'ViT', 'ResNet' or None when the names do not tell."""
    names = list(arrays)
    if any("/" in name for name in names):
        flax_names = _flax_names(arrays)
        if any(n.startswith(("params/Transformer/", "params/embedding/")) for n in flax_names):
            return "flax", "ViT"
        if any(n.startswith(("params/layer1_0/", "params/conv1/")) for n in flax_names):
            return "flax", "ResNet"
        return "flax", None
    if any(n in ("cls_token", "pos_embed") or n.startswith(("patch_embed.", "blocks.")) for n in names):
        return "timm_vit", "ViT"
    if any(n.startswith(("layer1.", "conv1.")) for n in names):
        return "torchvision_resnet", "ResNet"
    return "unknown", None


def to_flax_names(arrays: Arrays, model: nn.Module) -> tuple[Arrays, list[str]]:
    """Renames (and reshapes) a checkpoint's arrays to the model's flat names.

    Returns the converted arrays and the checkpoint names that have no place
    in our layout (reported as unexpected)."""
    layout, architecture = checkpoint_layout(arrays)
    if layout == "unknown":
        raise CheckpointError("unrecognised checkpoint layout; first names: "
                              + ", ".join(sorted(arrays)[:8]))
    _check_architecture(architecture, model, layout)
    if layout == "flax":
        return _flax_names(arrays), []
    if layout == "timm_vit":
        return _timm_vit_names(arrays, model.num_heads)
    return _torchvision_resnet_names(arrays)


def _check_architecture(architecture: Optional[str], model: nn.Module, layout: str) -> None:
    expected = "ViT" if isinstance(model, VisionTransformer) else "ResNet"
    if architecture is not None and architecture != expected:
        source = {"flax": "Flax / vit_jax", "timm_vit": "timm",
                  "torchvision_resnet": "torchvision"}[layout]
        raise CheckpointError(f"this checkpoint is a {architecture} ({source} layout) but the "
                              f"model is a {expected}; load it into a {architecture} model")


# The Linen renumbering of a block (per module type) -> the pre-Linen names we use.
_LINEN_BLOCK_NAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                      "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_LINEN_BLOCK = re.compile(r"(encoderblock_\d+)/(" + "|".join(_LINEN_BLOCK_NAMES) + ")/")


def _flax_names(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """'/'-joined Flax names (augreg, vit_jax Linen, ours) -> 'collection/...'."""
    renamed = {}
    for name, value in arrays.items():
        name = name.removeprefix("opt/target/")  # the first ViT release saved the optimizer
        if not name.startswith(("params/", "batch_stats/")):
            name = "params/" + name
        name = _LINEN_BLOCK.sub(lambda m: f"{m[1]}/{_LINEN_BLOCK_NAMES[m[2]]}/", name)
        name = name.replace("Transformer/pos_embedding", "Transformer/posembed_input/pos_embedding")
        renamed[name] = value
    return renamed


# timm module -> ours; the attention and the embeddings are handled apart.
_TIMM_VIT_MODULES = [
    (r"patch_embed\.proj", "embedding"),
    (r"blocks\.(\d+)\.norm1", r"Transformer/encoderblock_\1/LayerNorm_0"),
    (r"blocks\.(\d+)\.norm2", r"Transformer/encoderblock_\1/LayerNorm_2"),
    (r"blocks\.(\d+)\.mlp\.fc1", r"Transformer/encoderblock_\1/MlpBlock_3/Dense_0"),
    (r"blocks\.(\d+)\.mlp\.fc2", r"Transformer/encoderblock_\1/MlpBlock_3/Dense_1"),
    (r"norm", "Transformer/encoder_norm"),
    (r"pre_logits\.fc", "pre_logits"),
    (r"head", "head"),
]
_TIMM_ATTENTION = re.compile(r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)")


def _timm_vit_names(arrays: Arrays, num_heads: int) -> tuple[Arrays, list[str]]:
    converted, unknown = {}, []
    for name, value in arrays.items():
        if name == "cls_token":
            converted["params/cls"] = value
        elif name == "pos_embed":
            converted[POSEMB] = value
        elif match := _TIMM_ATTENTION.fullmatch(name):
            converted.update(_timm_attention(int(match[1]), match[2], match[3], value, num_heads))
        elif (leaf := _torch_leaf(name, value, _TIMM_VIT_MODULES)) is not None:
            converted[leaf[0]] = leaf[1]
        else:
            unknown.append(name)
    return converted, unknown


def _timm_attention(block: int, layer: str, kind: str, value: np.ndarray,
                    num_heads: int) -> Arrays:
    """timm's fused qkv Linear (3D, D) -> query/key/value (D, heads, head_dim);
    proj (D, D) -> out (heads, head_dim, D). timm orders qkv outputs as
    (3, heads, head_dim), which is what the reshapes below assume."""
    prefix = f"params/Transformer/encoderblock_{block}/MultiHeadDotProductAttention_1"
    dim = value.shape[-1] if kind == "weight" else value.shape[0] // (3 if layer == "qkv" else 1)
    if dim % num_heads:  # another model size: keep (D, D) so the fit check names it
        num_heads, head_dim = 1, dim
    else:
        head_dim = dim // num_heads
    if layer == "proj":
        if kind == "bias":
            return {f"{prefix}/out/bias": value}
        return {f"{prefix}/out/kernel": value.T.reshape(num_heads, head_dim, -1)}
    parts = np.split(value, 3, axis=0)
    if kind == "bias":
        return {f"{prefix}/{n}/bias": p.reshape(num_heads, head_dim)
                for n, p in zip(("query", "key", "value"), parts)}
    return {f"{prefix}/{n}/kernel": p.T.reshape(-1, num_heads, head_dim)
            for n, p in zip(("query", "key", "value"), parts)}


_TORCHVISION_RESNET_MODULES = [
    (r"layer(\d+)\.(\d+)\.downsample\.0", r"layer\1_\2/downsample_conv"),
    (r"layer(\d+)\.(\d+)\.downsample\.1", r"layer\1_\2/downsample_bn"),
    (r"layer(\d+)\.(\d+)\.(conv\d|bn\d)", r"layer\1_\2/\3"),
    (r"(conv1|bn1|fc)", r"\1"),
]


def _torchvision_resnet_names(arrays: Arrays) -> tuple[Arrays, list[str]]:
    converted, unknown = {}, []
    for name, value in arrays.items():
        if name.endswith(".num_batches_tracked"):  # a counter, not a weight
            continue
        if (leaf := _torch_leaf(name, value, _TORCHVISION_RESNET_MODULES)) is not None:
            converted[leaf[0]] = leaf[1]
        else:
            unknown.append(name)
    return converted, unknown


def _torch_leaf(name: str, value: np.ndarray, modules) -> Optional[tuple[str, np.ndarray]]:
    """One PyTorch tensor -> (our name, our array), or None for an unknown name.

    weight: 4-D conv OIHW -> kernel HWIO, 2-D Linear (out, in) -> kernel
    (in, out), 1-D norm -> scale; BatchNorm running stats -> batch_stats.
    ``modules`` maps module names (regex, replacement) to ours."""
    module, _, leaf = name.rpartition(".")
    ours = next((re.sub(p, r, module) for p, r in modules if re.fullmatch(p, module)), None)
    if ours is None:
        return None
    if leaf == "running_mean":
        return f"batch_stats/{ours}/mean", value
    if leaf == "running_var":
        return f"batch_stats/{ours}/var", value
    if leaf == "bias":
        return f"params/{ours}/bias", value
    if leaf != "weight":
        return None
    if value.ndim == 4:
        return f"params/{ours}/kernel", value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return f"params/{ours}/kernel", value.T
    if value.ndim == 1:
        return f"params/{ours}/scale", value
    return None


# ---------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------
def resample_posemb(posemb: np.ndarray, new_num_tokens_or_grid) -> np.ndarray:
    """Resamples a (1, 1 + h*w, D) position embedding to a new grid.

    The class token's embedding is kept as it is; the square grid of patch
    embeddings is resized bilinearly with corners aligned, as vit_jax does
    with ``scipy.ndimage.zoom(order=1)``. The target is a token count
    (class token included, square grid) or a (rows, cols) grid."""
    posemb = np.asarray(posemb)
    tokens = posemb.shape[1] - 1 if posemb.ndim == 3 else -1
    side = int(round(np.sqrt(max(tokens, 0))))
    if side * side != tokens:
        raise CheckpointError(f"position embedding of shape {posemb.shape} is not a class token "
                              "plus a square grid")
    rows, cols = _grid_of(new_num_tokens_or_grid)
    grid = posemb[0, 1:].reshape(side, side, -1).astype(np.float64)
    grid = _bilinear(_bilinear(grid, rows, axis=0), cols, axis=1)
    resampled = np.concatenate([posemb[0, :1], grid.reshape(rows * cols, -1)], axis=0)
    return resampled[None].astype(posemb.dtype)


def _grid_of(new_num_tokens_or_grid) -> tuple[int, int]:
    if isinstance(new_num_tokens_or_grid, (tuple, list)):
        rows, cols = new_num_tokens_or_grid
        return int(rows), int(cols)
    side = int(round(np.sqrt(new_num_tokens_or_grid - 1)))
    if side * side != new_num_tokens_or_grid - 1:
        raise CheckpointError(f"{new_num_tokens_or_grid} tokens are not a class token plus a "
                              "square grid; pass the grid as (rows, cols)")
    return side, side


def _bilinear(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation along one axis, first and last samples aligned."""
    old = x.shape[axis]
    step = (old - 1) / (size - 1) if size > 1 else 0.0
    coords = np.arange(size) * step
    low = np.clip(np.floor(coords).astype(int), 0, old - 1)
    high = np.minimum(low + 1, old - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = (coords - low).reshape(shape)
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


# ---------------------------------------------------------------------------
# Fitting the arrays onto the model
# ---------------------------------------------------------------------------
def load_params(path: str, model: nn.Module, *, num_classes: Optional[int] = None,
                dont_load: Sequence[str] = (), image_size: Optional[int] = None,
                channels: int = 3) -> dict:
    """Flax variables ({'params'[, 'batch_stats']}) for ``model`` from a checkpoint.

    Args:
      path: an augreg/vit_jax .npz, a timm ViT or torchvision ResNet state
        dict (.safetensors, or .pth/.bin with torch installed), or an orbax
        directory written by ``convert``.
      model: a model from ``noisy_flax.models.create_model``.
      num_classes: builds the head for this many classes (default: the
        model's). A checkpoint head of another size is replaced by the model's
        freshly initialised head.
      dont_load: regular expressions (full match) over names inside their
        collection, e.g. ``'head/.*'`` or ``'layer4_.*'``: those keep the
        model's initial values, and file arrays they match are ignored.
      image_size: the image side the ViT will see (default: the model's);
        the position embedding is resampled to its grid.
      channels: the input images' channels; the first layer's kernel must
        match (RGB weights do not fit a grayscale model).
    """
    if num_classes is not None and num_classes != model.num_classes:
        model = model.clone(num_classes=num_classes)
    converted, unknown = to_flax_names(read_checkpoint(path), model)
    return fit_to_model(converted, model, unknown=unknown, dont_load=dont_load,
                        image_size=image_size, channels=channels)


def load_variables(path: str, model: nn.Module, **kwargs) -> dict:
    """What the trainer calls for ``config.init_from``: a converted orbax
    directory or any raw file that ``load_params`` reads (same arguments)."""
    return load_params(path, model, **kwargs)


def fit_to_model(converted: Arrays, model: nn.Module, *, unknown: Iterable[str] = (),
                 dont_load: Sequence[str] = (), image_size: Optional[int] = None,
                 channels: int = 3) -> dict:
    """Checks flat converted arrays against the model and nests them as variables."""
    initial = _Initial(model, image_size, channels)
    shapes = initial.shapes
    converted = _resample_posemb_to(dict(converted), shapes)
    _check_patterns_match(dont_load, list(shapes) + list(converted) + list(unknown))
    from_init = _names_reset_to_init(converted, shapes, dont_load)
    converted = _drop_representation(converted, shapes, from_init)
    ignored = set(_matching(unknown, dont_load)) | set(_matching(converted, dont_load))
    _check_fit(converted, shapes, from_init, [n for n in unknown if n not in ignored],
               ignored, model)
    values = dict(converted, **initial.values(from_init))
    flat = {name: np.asarray(values[name], dtype=shape.dtype) for name, shape in shapes.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


class _Initial:
    """The model's variable shapes, and initial values of the names asked for."""

    def __init__(self, model: nn.Module, image_size: Optional[int], channels: int = 3):
        # Noise has no parameters and may want a key or a given batch: leave it out.
        self._model = model.clone(noise=None)
        # A ResNet's shapes do not depend on the image side: a small one inits fast.
        side = (image_size or input_size(model)) if isinstance(model, VisionTransformer) else 32
        self._images = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
        self.shapes = traverse_util.flatten_dict(
            jax.eval_shape(self._init, jax.random.key(0), self._images), sep="/")

    def _init(self, key, images):
        return self._model.init(key, images, train=False)

    def values(self, names: Iterable[str]) -> Arrays:
        """Only the requested values leave the jitted init, so XLA drops the
        forward pass and the other initialisers (seconds saved per load)."""
        names = sorted(names)
        if not names:
            return {}

        def selected(key, images):
            flat = traverse_util.flatten_dict(self._init(key, images), sep="/")
            return {name: flat[name] for name in names}

        images = jnp.zeros(self._images.shape, self._images.dtype)
        return jax.device_get(jax.jit(selected)(jax.random.key(0), images))


def _drop_representation(converted: Arrays, shapes: Mapping, from_init: set[str]) -> Arrays:
    """A model without a pre-logits layer takes the checkpoint without it, as
    vit_jax does, but only with a new head: the checkpoint's head was trained
    on the pre-logits' output, and without them its logits would be wrong."""
    if any(n.startswith("params/pre_logits/") for n in shapes):
        return converted
    dropped = [n for n in converted if n.startswith("params/pre_logits/")]
    if not dropped:
        return converted
    if not any(f"params/{c}/kernel" in from_init for c in CLASSIFIERS):
        width = converted.get("params/pre_logits/kernel", np.zeros((0, 0))).shape[-1]
        raise CheckpointError(
            f"the checkpoint has a representation layer (pre_logits, width {width}) that the "
            "model lacks, and its head was trained on that layer's output; build the model "
            f"with representation_size={width}, or give it a new head (another num_classes, "
            "or dont_load=('head/.*',))")
    logging.info("pretrained: dropping the representation layer %s", dropped)
    return {n: v for n, v in converted.items() if n not in dropped}


def _resample_posemb_to(converted: Arrays, shapes: Mapping) -> Arrays:
    if POSEMB not in converted or POSEMB not in shapes:
        return converted
    old, new = converted[POSEMB].shape, shapes[POSEMB].shape
    if old != new and old[-1] == new[-1] and len(old) == len(new) == 3:
        logging.info("pretrained: resampling the position embedding from %s to %s", old, new)
        converted[POSEMB] = resample_posemb(converted[POSEMB], new[1])
    return converted


def _names_reset_to_init(converted: Arrays, shapes: Mapping, dont_load: Sequence[str]) -> set[str]:
    """Names whose value comes from the model's init: dont_load matches, and
    the head when the checkpoint has one for another class count. A file
    without a head leaves it missing (an error) unless dont_load resets it:
    a fresh head would otherwise score at chance without a word."""
    reset = set(_matching(shapes, dont_load))
    for classifier in CLASSIFIERS:
        kernel = f"params/{classifier}/kernel"
        if kernel not in shapes or kernel not in converted:
            continue
        classes = converted[kernel].shape[-1]
        if classes != shapes[kernel].shape[-1]:
            logging.info("pretrained: new %s for %d classes (the checkpoint's has %s)",
                         classifier, shapes[kernel].shape[-1], classes)
            reset.update(n for n in shapes if n.startswith(f"params/{classifier}/"))
    return reset


def _check_patterns_match(dont_load: Sequence[str], names: list[str]) -> None:
    """A pattern that matches nothing is a typo that would load what it meant to skip."""
    unused = [p for p in dont_load if not _matching(names, [p])]
    if unused:
        raise CheckpointError(f"dont_load patterns {unused} match no name; names look like "
                              "'head/kernel', 'Transformer/encoderblock_0/.*', 'layer4_.*'")


def _matching(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """Names whose part inside the collection fully matches a pattern."""
    compiled = [re.compile(p) for p in patterns]
    return [n for n in names if any(p.fullmatch(n.split("/", 1)[-1]) for p in compiled)]


def _check_fit(converted: Arrays, shapes: Mapping, from_init: set[str], unknown: list[str],
               ignored: set[str], model: nn.Module) -> None:
    missing = [n for n in shapes if n not in from_init and n not in converted]
    unexpected = unknown + [n for n in converted if n not in shapes and n not in ignored]
    misshaped = [f"{n}: checkpoint {tuple(converted[n].shape)}, model {tuple(shapes[n].shape)}"
                 for n in shapes if n not in from_init and n in converted
                 and tuple(converted[n].shape) != tuple(shapes[n].shape)]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"the checkpoint does not fit the {type(model).__name__}: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped names "
             "(a different model size? dont_load=... skips names on purpose)"]
    for title, names in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
        if names:
            lines.append(f"{title}:")
            lines += [f"  {n}" for n in names[:MAX_LISTED]]
            if len(names) > MAX_LISTED:
                lines.append(f"  ... and {len(names) - MAX_LISTED} more")
    raise CheckpointError("\n".join(lines))


# ---------------------------------------------------------------------------
# Converted checkpoints and the command line
# ---------------------------------------------------------------------------
def save_variables(variables: Mapping, path: str) -> None:
    """Writes Flax variables as an orbax checkpoint that load_variables reads."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise CheckpointError(f"{path} exists; remove it or choose another destination")
    ocp.PyTreeCheckpointer().save(path, jax.tree.map(np.asarray, dict(variables)))


def checkpoint_classes(converted: Mapping[str, np.ndarray]) -> Optional[int]:
    """The class count of a converted checkpoint's head, None without one."""
    for classifier in CLASSIFIERS:
        if (kernel := converted.get(f"params/{classifier}/kernel")) is not None:
            return int(kernel.shape[-1])
    return None


def convert(src: str, dst: str, model_name: str, *, num_classes: Optional[int] = None,
            image_size: Optional[int] = None, dont_load: Sequence[str] = ()) -> dict:
    """Reads ``src`` for the registry model ``model_name`` and writes it to ``dst``.

    The head keeps the checkpoint's class count unless ``num_classes`` is given."""
    arrays = read_checkpoint(src)
    # The class count does not change the names: any will do for this first model.
    converted, unknown = to_flax_names(arrays, create_model(model_name, num_classes=1))
    num_classes = num_classes or checkpoint_classes(converted)
    if num_classes is None:
        raise CheckpointError(f"{src} has no classifier head: pass --num_classes")
    model = create_model(model_name, num_classes=num_classes)
    variables = fit_to_model(converted, model, unknown=unknown, dont_load=dont_load,
                             image_size=image_size)
    save_variables(variables, dst)
    return variables


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m noisy_flax.pretrained",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser(
        "convert", help="checkpoint file -> orbax directory for config.init_from")
    convert_parser.add_argument("src", help=".npz, .safetensors, .pth/.bin or orbax directory")
    convert_parser.add_argument("dst", help="orbax directory to create")
    convert_parser.add_argument("--model", required=True,
                                help="registry name, e.g. vit_base_patch16_384 or resnet50")
    convert_parser.add_argument("--num_classes", type=int,
                                help="head size (default: the checkpoint's); another size "
                                     "gets a fresh head")
    convert_parser.add_argument("--image_size", type=int,
                                help="ViT input side (default: the model name's)")
    convert_parser.add_argument("--dont_load", action="append", default=[],
                                help="regex of names to keep at their initial value (repeatable)")
    args = parser.parse_args(argv)
    try:
        for flag in ("num_classes", "image_size"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag}={value} must be >= 1 (leave it out for the default)")
        for pattern in args.dont_load:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"--dont_load {pattern!r} is not a regular expression ({error}); "
                                 "give a pattern such as 'head/.*'") from None
        variables = convert(args.src, args.dst, args.model, num_classes=args.num_classes,
                            image_size=args.image_size, dont_load=args.dont_load)
    except (ValueError, FileNotFoundError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)  # a fit error lists the names after its line
        return EXIT_USER_ERROR
    count = sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
    print(f"wrote {args.dst}: {args.model}, {count:,} parameters, "
          f"collections {', '.join(sorted(variables))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

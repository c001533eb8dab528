"""Google's ViT checkpoints (`.npz`, original and big_vision layouts) read into a Conformer, exact to timm's loader.

Never unpickles: only the arrays' headers are read up front, and only the arrays the model needs are decompressed.
Data flows one way: read the architecture from the arrays' shapes -> map every array through one table of (npz key,
our key, transform) -> `adapt_state_dict` (position embeddings resampled, a head that does not fit replaced).
"""

import math
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError

from configuration_conformer import PRESETS, ConformerConfig
from conformer_vit.cards import IMAGENET_1K_CLASSES, SEED_CHECKPOINTS, UPSTREAM_FILE_NAMES
from conformer_vit.sources import adapt_state_dict
from modeling_conformer import ConformerForImageClassification

# What a checkpoint's shapes decide (and a preset of Google's releases fixes).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")
SHAPE_FIELDS += ("backbone_depths",)
# Config fields the checkpoint decides; `**overrides` may set anything else (merging, classifier, dropout).
ARCHITECTURE_FIELDS = (*SHAPE_FIELDS, "num_channels", "layer_norm_eps", "qkv_bias")


class ConversionError(ValueError):
    """Bad input: the command line prints its message as one `error:` line and exits with status 2."""


def machine_memory() -> int:
    """Bytes of physical memory: no array of a checkpoint this machine converts can be larger."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --------------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# --------------------------------------------------------------------------------------------------------------------


def load_npz(path) -> np.lib.npyio.NpzFile:
    """`np.load(path, allow_pickle=False)` once every entry's `.npy` header declares floats of a size this machine can
    hold. Only the headers are read here: an entry is decompressed when the conversion reads it, so unused ones never
    are."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with path.open("rb") as handle:
        if handle.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive of .npy files, as numpy.savez writes
            raise ConversionError(f"{path} is not an .npz archive (numpy.savez's zip of .npy arrays)")
    memory, header = machine_memory(), np.lib.format
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                raise ConversionError(f"{path} holds no arrays")
            for member in archive.namelist():
                key = member.removesuffix(".npy")
                if key == member:
                    raise ConversionError(f"{path}: `{member}` is not an .npy array")
                with archive.open(member) as stream:  # decompresses only the header's bytes
                    version = header.read_magic(stream)
                    read = header.read_array_header_1_0 if version == (1, 0) else header.read_array_header_2_0
                    shape, _, dtype = read(stream)
                if dtype.hasobject:
                    raise ConversionError(
                        f"{path}: `{key}` is an object array; refusing to unpickle it (a checkpoint holds numbers)"
                    )
                if dtype.kind != "f":
                    raise ConversionError(f"{path}: `{key}` has dtype {dtype}; expected floating-point weights")
                if math.prod(shape) * dtype.itemsize > memory:
                    raise ConversionError(
                        f"{path}: `{key}` declares shape {shape} ({math.prod(shape) * dtype.itemsize / 2**30:.3g} "
                        f"GiB), more than this machine's {memory / 2**30:.3g} GiB of memory: not a checkpoint to read"
                    )
        return np.load(path, allow_pickle=False)
    except ConversionError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"{path} is truncated or corrupt ({type(error).__name__}: {error})") from None


BIG_VISION_NAMES = {
    "MultiHeadDotProductAttention_1/": "MultiHeadDotProductAttention_0/",
    "LayerNorm_2/": "LayerNorm_1/",
    "MlpBlock_3/": "MlpBlock_0/",
    "Transformer/posembed_input/pos_embedding": "pos_embedding",
}


class CheckpointReader:
    """Reads arrays by their names in Google's original layout from either layout; errors name the file's own key.
    Each array is read once, as float32, and only when asked for.

    Google's original release (google-research/vision_transformer) names one module per layer,
    `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/...`, and stores the position embedding under
    `Transformer/posembed_input/`. big_vision names the same modules `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
    `MlpBlock_0`, keeps `pos_embedding` at the top, may prefix everything with `params/`, and may stack all layers on a
    leading axis in `Transformer/encoderblock/...`. Detection follows timm's `_load_weights`.
    """

    def __init__(self, params: Mapping[str, np.ndarray]):
        self.params, self.arrays = params, {}
        self.prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in params), None)
        if self.prefix is None:
            raise ConversionError(
                "missing key `embedding/kernel` (looked also under `params/` and `opt/target/`): not a ViT checkpoint"
            )
        self.stacked = f"{self.prefix}Transformer/encoderblock/LayerNorm_0/scale" in params
        self.big_vision = self.prefix == "params/" or f"{self.prefix}pos_embedding" in params or self.stacked

    def npz_key(self, key: str, layer: int | None = None) -> str:
        """The file's key for `key` (original names; a layer's keys relative to its block)."""
        if self.big_vision:
            for original, renamed in BIG_VISION_NAMES.items():
                key = key.replace(original, renamed)
        if layer is not None:
            key = ("Transformer/encoderblock/" if self.stacked else f"Transformer/encoderblock_{layer}/") + key
        return self.prefix + key

    def has(self, key: str) -> bool:
        return self.npz_key(key) in self.params

    def _read(self, npz_key: str) -> np.ndarray:
        if npz_key not in self.arrays:
            try:
                array = np.asarray(self.params[npz_key], dtype=np.float32)
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as error:
                raise ConversionError(
                    f"`{npz_key}` is truncated or corrupt ({type(error).__name__}: {error})"
                ) from None
            if array.ndim == 0:
                raise ConversionError(f"`{npz_key}` is a scalar (a 0-d array); a weight has at least one axis")
            self.arrays[npz_key] = array
        return self.arrays[npz_key]

    def get(self, key: str, layer: int | None = None) -> np.ndarray:
        npz_key = self.npz_key(key, layer)
        if npz_key not in self.params:
            raise ConversionError(f"missing key `{npz_key}`")
        array = self._read(npz_key)
        if layer is not None and self.stacked:
            if array.shape[0] <= layer:
                raise ConversionError(f"`{npz_key}` stacks {array.shape[0]} layers, but layer {layer} is needed")
            array = array[layer]
        return array

    def num_layers(self) -> int:
        if self.stacked:
            return self._read(self.npz_key("LayerNorm_0/scale", 0)).shape[0]
        pattern = re.compile(re.escape(self.prefix) + r"Transformer/encoderblock_(\d+)/")
        indices = {int(m.group(1)) for m in map(pattern.match, self.params) if m}
        if not indices:
            raise ConversionError(f"missing key `{self.npz_key('LayerNorm_0/scale', 0)}`: no transformer layers")
        gap = min(set(range(max(indices) + 2)) - indices)
        if gap <= max(indices):  # checked before a model of `max(indices) + 1` layers is built
            raise ConversionError(f"missing key `{self.npz_key('LayerNorm_0/scale', gap)}`: layer {gap} is absent")
        return gap

    def backbone_depths(self) -> list[int] | None:
        """Units per ResNet stage of the hybrid (`block{s}/unit{u}/...`), or None for a plain patch embedding."""
        if not self.has("conv_root/kernel"):
            return None
        pattern = re.compile(re.escape(self.prefix) + r"block(\d+)/unit(\d+)/")
        units = {}
        for match in filter(None, map(pattern.match, self.params)):
            stage, unit = int(match.group(1)), int(match.group(2))
            units[stage] = max(units.get(stage, 0), unit)
        if not units:
            raise ConversionError(f"`{self.npz_key('conv_root/kernel')}` is there but no `block1/unit1/...` keys")
        # A missing stage or unit surfaces as a missing key when the table reads it.
        return [units.get(stage, 1) for stage in range(1, max(units) + 1)]


@dataclass(frozen=True)
class CheckpointArchitecture:
    """What the arrays' shapes say about the network that produced them."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    num_channels: int
    backbone_depths: list[int] | None
    representation_size: int | None
    num_classes: int | None  # None: no head in the file
    image_size: int
    position_has_class_slot: bool  # False for big_vision's [1, grid**2, dim] position embeddings

    @property
    def model_type(self) -> str | None:
        """The released model of this shape (`ViT-B_16`, `R50-ViT-B_16`, ...), if any."""
        return next((name for name in SEED_CHECKPOINTS if self.is_shaped_like(name)), None)

    def is_shaped_like(self, preset: str) -> bool:
        return all(PRESETS[preset].get(field) == getattr(self, field) for field in SHAPE_FIELDS)

    def describe(self) -> str:
        parts = [f"width {self.hidden_size}", f"{self.num_hidden_layers} layers", f"{self.num_attention_heads} heads"]
        parts += [f"MLP {self.intermediate_size}", f"patch {self.patch_size}"]
        parts += [f"ResNet stages {self.backbone_depths}"] * bool(self.backbone_depths) + [f"{self.image_size} px"]
        parts += [f"pre_logits {self.representation_size}"] * bool(self.representation_size)
        parts.append(f"{self.num_classes} classes" if self.num_classes else "no head")
        return ", ".join(parts) + (f" (that is {self.model_type})" if self.model_type else "")


def read_architecture(reader: CheckpointReader) -> CheckpointArchitecture:
    """Width, depth, heads, MLP size, patch size, hybrid stages, pre-logits, classes and resolution, from shapes."""
    embedding = reader.get("embedding/kernel")  # [p, p, in_channels, hidden]
    if embedding.ndim != 4 or embedding.shape[0] != embedding.shape[1]:
        raise ConversionError(
            f"`{reader.npz_key('embedding/kernel')}` has shape {embedding.shape}; expected [p, p, in, dim]"
        )
    hidden_size = embedding.shape[-1]
    backbone_depths = reader.backbone_depths()
    if backbone_depths:
        stride = 2 ** (len(backbone_depths) + 1)  # the ResNet stem (4) times 2 per stage after the first
        patch_size, num_channels = embedding.shape[0] * stride, reader.get("conv_root/kernel").shape[-2]
    else:
        patch_size, num_channels = embedding.shape[0], embedding.shape[2]

    query = reader.get("MultiHeadDotProductAttention_1/query/kernel", layer=0)  # [hidden, heads, head_dim]
    if query.ndim != 3 or query.shape[0] != hidden_size:
        raise ConversionError(
            f"`{reader.npz_key('MultiHeadDotProductAttention_1/query/kernel', 0)}` has shape {query.shape}, "
            f"but the patch embedding says width {hidden_size}: expected ({hidden_size}, heads, head_dim)"
        )
    intermediate_size = reader.get("MlpBlock_3/Dense_0/kernel", layer=0).shape[-1]
    representation_size = reader.get("pre_logits/kernel").shape[-1] if reader.has("pre_logits/kernel") else None
    num_classes = reader.get("head/kernel").shape[-1] if reader.has("head/kernel") else None

    position = reader.get("Transformer/posembed_input/pos_embedding")  # [1, (1 +) grid**2, hidden]
    tokens = position.shape[-2] if position.ndim >= 2 else 0
    if tokens > 1 and math.isqrt(tokens - 1) ** 2 == tokens - 1:
        grid, has_class_slot = math.isqrt(tokens - 1), True
    elif tokens > 0 and math.isqrt(tokens) ** 2 == tokens:
        grid, has_class_slot = math.isqrt(tokens), False
    else:
        raise ConversionError(
            f"`{reader.npz_key('Transformer/posembed_input/pos_embedding')}` has shape {position.shape}: "
            "its tokens form no square grid (with or without a class token)"
        )
    return CheckpointArchitecture(
        hidden_size=hidden_size,
        num_hidden_layers=reader.num_layers(),
        num_attention_heads=query.shape[1],
        intermediate_size=intermediate_size,
        patch_size=patch_size,
        num_channels=num_channels,
        backbone_depths=backbone_depths,
        representation_size=representation_size,
        num_classes=num_classes,
        image_size=grid * patch_size,
        position_has_class_slot=has_class_slot,
    )


# --------------------------------------------------------------------------------------------------------------------
# The mapping table: (npz key, our key, transform)
# --------------------------------------------------------------------------------------------------------------------


class Transform(NamedTuple):
    """How one Flax array becomes one torch parameter, and which npz shape a torch shape needs (for clear errors)."""

    apply: Callable[[np.ndarray], np.ndarray]
    npz_shape: Callable[[tuple, int], tuple]  # (our shape, heads) -> the file's shape


KEEP = Transform(lambda a: a, lambda shape, heads: shape)
# Biases and norm scales; big_vision's ResNet stores GroupNorm parameters as [1, 1, 1, C].
VECTOR = Transform(lambda a: a.reshape(-1), lambda shape, heads: shape)
DENSE = Transform(lambda a: a.T, lambda shape, heads: shape[::-1])  # [in, out] -> [out, in]
CONV = Transform(  # [h, w, in, out] -> [out, in, h, w]
    lambda a: a.transpose(3, 2, 0, 1), lambda shape, heads: (shape[2], shape[3], shape[1], shape[0])
)
QKV_KERNEL = Transform(  # [hidden, heads, head_dim] -> [heads * head_dim, hidden]
    lambda a: a.reshape(a.shape[0], -1).T, lambda shape, heads: (shape[1], heads, shape[0] // heads)
)
QKV_BIAS = Transform(lambda a: a.reshape(-1), lambda shape, heads: (heads, shape[0] // heads))
OUT_KERNEL = Transform(  # [heads, head_dim, hidden] -> [hidden, heads * head_dim]
    lambda a: a.reshape(-1, a.shape[-1]).T, lambda shape, heads: (heads, shape[1] // heads, shape[0])
)

EMBEDDING_TABLE = [
    ("embedding/kernel", "conformer.embeddings.patch_embeddings.projection.weight", CONV),
    ("embedding/bias", "conformer.embeddings.patch_embeddings.projection.bias", VECTOR),
    ("cls", "conformer.embeddings.cls_token", KEEP),
]
# Per layer, relative to `Transformer/encoderblock_{i}/` and `conformer.layers.{i}.`.
LAYER_TABLE = [
    ("LayerNorm_0/scale", "layernorm_before.weight", VECTOR),
    ("LayerNorm_0/bias", "layernorm_before.bias", VECTOR),
    *[
        (f"MultiHeadDotProductAttention_1/{name}/{kind}", f"attention.{proj}_proj.{our}", transform)
        for name, proj in (("query", "q"), ("key", "k"), ("value", "v"))
        for kind, our, transform in (("kernel", "weight", QKV_KERNEL), ("bias", "bias", QKV_BIAS))
    ],
    ("MultiHeadDotProductAttention_1/out/kernel", "attention.o_proj.weight", OUT_KERNEL),
    ("MultiHeadDotProductAttention_1/out/bias", "attention.o_proj.bias", VECTOR),
    ("LayerNorm_2/scale", "layernorm_after.weight", VECTOR),
    ("LayerNorm_2/bias", "layernorm_after.bias", VECTOR),
    ("MlpBlock_3/Dense_0/kernel", "mlp.fc1.weight", DENSE),
    ("MlpBlock_3/Dense_0/bias", "mlp.fc1.bias", VECTOR),
    ("MlpBlock_3/Dense_1/kernel", "mlp.fc2.weight", DENSE),
    ("MlpBlock_3/Dense_1/bias", "mlp.fc2.bias", VECTOR),
]
ENCODER_NORM_TABLE = [
    ("Transformer/encoder_norm/scale", "conformer.layernorm.weight", VECTOR),
    ("Transformer/encoder_norm/bias", "conformer.layernorm.bias", VECTOR),
]
PRE_LOGITS_TABLE = [
    ("pre_logits/kernel", "pre_logits.0.weight", DENSE),
    ("pre_logits/bias", "pre_logits.0.bias", VECTOR),
]
HEAD_TABLE = [("head/kernel", "classifier.weight", DENSE), ("head/bias", "classifier.bias", VECTOR)]
HEAD_KEYS = {row[0] for row in PRE_LOGITS_TABLE + HEAD_TABLE}


def backbone_table(depths: list[int]) -> list[tuple[str, str, Transform]]:
    """The hybrid's ResNet in transformers' `BitBackbone` names: `block{s}/unit{u}/conv{k}` and `gn{k}` become
    `stages.{s-1}.layers.{u-1}.conv{k}` and `norm{k}`; each stage's first unit adds `conv_proj`/`gn_proj`, the
    shortcut, as `downsample.conv`/`downsample.norm`."""
    bit = "conformer.embeddings.patch_embeddings.backbone.bit."
    rows = [
        ("conv_root/kernel", bit + "embedder.convolution.weight", CONV),
        ("gn_root/scale", bit + "embedder.norm.weight", VECTOR),
        ("gn_root/bias", bit + "embedder.norm.bias", VECTOR),
    ]
    for stage, depth in enumerate(depths):
        for unit in range(depth):
            source, target = f"block{stage + 1}/unit{unit + 1}/", f"{bit}encoder.stages.{stage}.layers.{unit}."
            pairs = [(f"conv{k}", f"gn{k}", f"conv{k}", f"norm{k}") for k in (1, 2, 3)]
            if unit == 0:
                pairs.append(("conv_proj", "gn_proj", "downsample.conv", "downsample.norm"))
            for conv, norm, our_conv, our_norm in pairs:
                rows += [
                    (f"{source}{conv}/kernel", f"{target}{our_conv}.weight", CONV),
                    (f"{source}{norm}/scale", f"{target}{our_norm}.weight", VECTOR),
                    (f"{source}{norm}/bias", f"{target}{our_norm}.bias", VECTOR),
                ]
    return rows


def mapping_table(config: ConformerConfig, with_head: bool) -> list[tuple[str, str, Transform, int | None]]:
    """Every array taken from a checkpoint but the position embeddings: (npz key, our key, transform, layer)."""
    rows = [(*row, None) for row in EMBEDDING_TABLE]
    if config.backbone_depths:
        rows += [(*row, None) for row in backbone_table(config.backbone_depths)]
    for layer in range(config.num_hidden_layers):
        rows += [
            (npz_key, f"conformer.layers.{layer}.{key}", transform, layer) for npz_key, key, transform in LAYER_TABLE
        ]
    rows += [(*row, None) for row in ENCODER_NORM_TABLE]
    if with_head:
        rows += [(*row, None) for row in (PRE_LOGITS_TABLE if config.representation_size else []) + HEAD_TABLE]
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------------------------


def keeps_checkpoint_head(config: ConformerConfig, architecture: CheckpointArchitecture) -> bool:
    """Whether the converted model uses the checkpoint's head (and pre-logits): same classes, class-token features."""
    return config.num_labels == architecture.num_classes and config.classifier != "cnn"


def _check_model_type(model_type: str, architecture: CheckpointArchitecture):
    name = {google: ours for ours, google in UPSTREAM_FILE_NAMES.items()}.get(model_type, model_type)
    if name not in SEED_CHECKPOINTS:
        known = ", ".join(UPSTREAM_FILE_NAMES.get(name, name) for name in SEED_CHECKPOINTS)
        raise ConversionError(f"unknown --model_type {model_type!r}; known: {known}")
    if not architecture.is_shaped_like(name):
        raise ConversionError(
            f"--model_type {model_type} does not match the checkpoint, which contains {architecture.describe()}"
        )


def _resolve_labels(num_labels: int | None, id2label: dict | None, checkpoint_classes: int) -> tuple[int, dict | None]:
    """(num_labels, id2label) from either or both (they must agree), else the checkpoint's; ImageNet-1k's names."""
    if id2label is not None:
        id2label = {int(index): str(name) for index, name in dict(id2label).items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ConversionError(f"id2label must number its classes 0..{len(id2label) - 1} without gaps")
        if num_labels is not None and num_labels != len(id2label):
            raise ConversionError(
                f"--num_labels {num_labels} contradicts id2label, which names {len(id2label)} classes"
            )
        num_labels = len(id2label)
    num_labels = checkpoint_classes if num_labels is None else num_labels
    if not isinstance(num_labels, int) or num_labels <= 0:
        raise ConversionError(f"--num_labels must be a positive int, got {num_labels!r}")
    if id2label is None and num_labels == IMAGENET_1K_CLASSES:
        from timm.data import ImageNetInfo  # ships the class names, so no download is needed

        info = ImageNetInfo("imagenet-1k")
        id2label = {index: info.index_to_description(index) for index in range(IMAGENET_1K_CLASSES)}
    return num_labels, id2label


def label_maps(id2label: dict[int, str] | None) -> dict:
    """The config fields of named classes: `id2label` and its inverse `label2id` (none without names)."""
    if id2label is None:
        return {}
    return {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}


def infer_config(
    params: Mapping[str, np.ndarray],
    model_type: str | None = None,
    image_size: int | None = None,
    num_labels: int | None = None,
    id2label: dict | None = None,
    **overrides,
) -> tuple[ConformerConfig, CheckpointArchitecture]:
    """The `ConformerConfig` of a checkpoint and the architecture its arrays' shapes show.

    `model_type` (`ViT-B_16`, `R50+ViT-B_16`, ...) is only a cross-check. `image_size` other than the checkpoint's
    resamples the position embeddings; `num_labels` other than the checkpoint's head gives a new, zero-initialised head
    without `pre_logits` (the ViT paper's transfer recipe). `overrides` set the other fields (`merge_mode`, `merge_r`,
    `classifier`, ...; `hidden_act="gelu_pytorch_tanh"` for Flax's GELU); the architecture's own fields cannot.
    """
    reader = params if isinstance(params, CheckpointReader) else CheckpointReader(params)
    architecture = read_architecture(reader)
    if model_type is not None:
        _check_model_type(model_type, architecture)
    fixed = sorted(set(overrides) & {*ARCHITECTURE_FIELDS, "image_size", "num_labels", "id2label", "label2id"})
    if fixed:
        raise ConversionError(f"{', '.join(fixed)} cannot be overridden: the checkpoint (or its own argument) decides")
    image_size = architecture.image_size if image_size is None else image_size
    if not isinstance(image_size, int) or image_size <= 0 or image_size % architecture.patch_size:
        raise ConversionError(
            f"--image_size must be a positive multiple of the patch size {architecture.patch_size}, got {image_size}"
        )
    if num_labels is None and id2label is None and architecture.num_classes is None:
        raise ConversionError(f"missing key `{reader.npz_key('head/kernel')}`; pass --num_labels for a new head")
    num_labels, id2label = _resolve_labels(num_labels, id2label, architecture.num_classes)
    if num_labels == architecture.num_classes and overrides.get("classifier") != "cnn":
        overrides["representation_size"] = architecture.representation_size  # the checkpoint's head, kept
    fields = {name: getattr(architecture, name) for name in (*SHAPE_FIELDS, "num_channels")}
    # The exact erf GELU, as timm; Google's Flax used the tanh approximation.
    fields.update(hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, image_size=image_size, num_labels=num_labels)
    fields.update(label_maps(id2label))
    try:
        config = ConformerConfig(**{**fields, **overrides})
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ConversionError(str(error)) from None
    # Refuse an `image_size` whose position embeddings cannot be allocated, before trying to.
    tokens = 1 + config.num_patches
    needed = 3 * tokens * config.hidden_size * 4  # float32: the parameter, the resampled copy, interpolate's buffer
    if needed > machine_memory():
        raise ConversionError(
            f"--image_size {config.image_size} gives {tokens} tokens, whose position embeddings need "
            f"{needed / 2**30:.3g} GiB, more than the {machine_memory() / 2**30:.3g} GiB here: choose a smaller size"
        )
    return config, architecture


def _position_embeddings(reader: CheckpointReader, config: ConformerConfig, architecture) -> torch.Tensor:
    """The checkpoint's position embeddings with a class-token slot, on the checkpoint's own grid."""
    key = "Transformer/posembed_input/pos_embedding"
    array = reader.get(key)  # [1, (1 +) grid**2, hidden]
    if array.shape[-1] != config.hidden_size:
        raise ConversionError(
            f"`{reader.npz_key(key)}` has shape {array.shape}, but the architecture read from the checkpoint "
            f"({architecture.describe()}) needs width {config.hidden_size} there"
        )
    position = torch.from_numpy(np.ascontiguousarray(array.reshape(1, -1, config.hidden_size)))
    if not architecture.position_has_class_slot:
        # big_vision adds position embeddings before prepending the class token: its slot is zero.
        position = torch.cat([position.new_zeros(1, 1, config.hidden_size), position], dim=1)
    return position


def _state_dict(reader: CheckpointReader, model, architecture) -> dict[str, torch.Tensor]:
    """The checkpoint's arrays under our key names, each checked against the shape `model` needs."""
    config, target = model.config, model.state_dict()
    state_dict = {"conformer.embeddings.position_embeddings": _position_embeddings(reader, config, architecture)}
    sources = {"conformer.embeddings.position_embeddings": reader.npz_key("Transformer/posembed_input/pos_embedding")}
    for npz_key, our_key, transform, layer in mapping_table(config, keeps_checkpoint_head(config, architecture)):
        array = reader.get(npz_key, layer)
        expected = transform.npz_shape(tuple(target[our_key].shape), config.num_attention_heads)
        flat_ok = transform is VECTOR and array.ndim == 4 and array.shape[:3] == (1, 1, 1)
        if array.shape != expected and not (flat_ok and array.shape[-1:] == expected):
            raise ConversionError(
                f"`{reader.npz_key(npz_key, layer)}` has shape {array.shape}, but the architecture read from the "
                f"checkpoint ({architecture.describe()}) needs {expected} there (for {our_key})"
            )
        state_dict[our_key] = torch.from_numpy(np.ascontiguousarray(transform.apply(array)))
        sources[our_key] = reader.npz_key(npz_key, layer)
    non_finite = list(dict.fromkeys(sources[key] for key, value in state_dict.items() if not value.isfinite().all()))
    if non_finite:
        names = ", ".join(f"`{key}`" for key in non_finite[:3])
        more = f" and {len(non_finite) - 3} more" if len(non_finite) > 3 else ""
        raise ConversionError(f"the checkpoint holds NaN or inf in {names}{more}: it cannot be converted as it is")
    return state_dict


@contextmanager
def seeded_new_weights(seed: int = 0):
    """Weights the source does not give (a new head, a CNN head) start the same in every conversion, drawn from a
    random state of their own: the caller's is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def convert_in_memory(params: Mapping, **options) -> tuple[ConformerForImageClassification, CheckpointArchitecture]:
    """(model, architecture) of the checkpoint `params`; `options` are `infer_config`'s."""
    reader = CheckpointReader(params)
    config, architecture = infer_config(reader, **options)
    try:
        with seeded_new_weights():
            model = ConformerForImageClassification(config)
    except (ValueError, StrictDataclassError) as error:  # e.g. a merge schedule the token count cannot support
        raise ConversionError(str(error)) from None
    # Bilinear, as timm's `_load_weights`, so a resized model stays equal to timm's (Google's fine-tuning code used
    # `scipy.ndimage.zoom(order=1)`, like `align_corners=True`: up to a fifth of the largest value apart on 14 -> 24).
    model.load_state_dict(adapt_state_dict(_state_dict(reader, model, architecture), model, mode="bilinear"))
    ignored = HEAD_KEYS if not keeps_checkpoint_head(config, architecture) else set()
    unused = sorted(key for key in params if key not in reader.arrays and key[len(reader.prefix) :] not in ignored)
    if unused:
        print(f"warning: {len(unused)} arrays of the checkpoint are not used, e.g. `{unused[0]}`", file=sys.stderr)
    return model.eval(), architecture


def convert_checkpoint(
    npz_path,
    image_size: int | None = None,
    num_labels: int | None = None,
    id2label: dict | None = None,
    model_type: str | None = None,
    **config_overrides,
) -> ConformerForImageClassification:
    """A `ConformerForImageClassification` with the weights of a Google ViT `.npz` (in memory; nothing is written).

    `npz_path` is a path (or a mapping of arrays, as `load_npz` returns); the other arguments are as in
    `infer_config`. With the checkpoint's own head, the head (and `pre_logits`) are converted exactly; with another
    `num_labels` (or `classifier="cnn"`) the classifier starts at zero and `pre_logits` is dropped.
    """
    options = dict(model_type=model_type, image_size=image_size, num_labels=num_labels, id2label=id2label)
    with nullcontext(npz_path) if isinstance(npz_path, Mapping) else load_npz(npz_path) as params:
        return convert_in_memory(params, **options, **config_overrides)[0]

"""Convert Google's ViT checkpoints (`.npz`) into Hub-ready Conformer folders, exact to timm's loader.

    python convert_npz_to_hf.py --npz_path ViT-B_16.npz --output_dir vit-b16-conformer --verify
    python convert_npz_to_hf.py --npz_path R50+ViT-B_16.npz --output_dir r50-vit-b16 --image_size 384 --num_labels 10
    python convert_npz_to_hf.py --from_transformers facebook/dinov2-small --output_dir dinov2-s-conformer
    python convert_npz_to_hf.py --write_model_cards model_cards   # regenerate the cards of the released checkpoints

Data flows one way: read the npz (never unpickling, only the arrays the model needs) -> read the architecture from
the arrays' shapes -> map every array through one table of (npz key, our key, transform) -> `adapt_state_dict`
(position embeddings resampled, a head that does not fit replaced) -> `save_pretrained` + image processor + model
card (`model_card.py`). The folder is assembled beside `--output_dir` and moved into place only once it is complete
(and verified).
"""

import argparse
import json
import math
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError

from configuration_conformer import CLASSIFIERS, MERGE_MODES, PRESETS, ConformerConfig
from model_card import (
    IMAGENET_1K_CLASSES,
    SEED_CHECKPOINTS,
    UPSTREAM_FILE_NAMES,
    CardFacts,
    render_model_card,
    write_model_cards,
)
from modeling_conformer import ConformerForImageClassification, adapt_state_dict

# What a checkpoint's shapes decide (and a preset of Google's releases fixes).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")
SHAPE_FIELDS += ("backbone_depths",)
# Config fields the checkpoint decides; `**overrides` may set anything else (merging, classifier, dropout).
ARCHITECTURE_FIELDS = (*SHAPE_FIELDS, "num_channels", "layer_norm_eps", "qkv_bias")
# Exactly what a conversion writes: `--overwrite` replaces a folder holding these and nothing else.
CONVERTED_FILES = ("README.md", "config.json", "configuration_conformer.py", "model.safetensors")
CONVERTED_FILES += ("modeling_conformer.py", "preprocessor_config.json")
STAGING_MARK = ".converting-"  # staging folders: `.{output name}.converting-{pid}` beside the output


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


def _convert(params: Mapping, **options) -> tuple[ConformerForImageClassification, CheckpointArchitecture]:
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
        return _convert(params, **options, **config_overrides)[0]


# --------------------------------------------------------------------------------------------------------------------
# Verification against timm's own loader
# --------------------------------------------------------------------------------------------------------------------


def timm_vit(config: ConformerConfig, **changes):
    """timm's `VisionTransformer` in `config`'s shape, random weights; `changes` are its own arguments."""
    from timm.models.vision_transformer import VisionTransformer

    shape = dict(
        img_size=config.image_size,
        in_chans=config.num_channels,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        num_classes=config.num_labels,
    )
    return VisionTransformer(**shape | changes)


def timm_reference(npz_path, config: ConformerConfig, architecture: CheckpointArchitecture):
    """timm's `VisionTransformer` of the same shape (for the hybrid, its R50 `ResNetV2` with `StdConv2dSame`,
    `preact=False`, `stem_type="same"`, as `vit_base_r50_s16_224` builds it), loaded by timm's `_load_weights`.

    timm has no `pre_logits` layer (its loader skips those arrays), so the reference has timm's head only when ours is
    the checkpoint's own head without pre-logits; `verify_folder` computes the pre-logits case by hand.
    """
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import _load_weights
    from timm.models.vision_transformer_hybrid import _resnetv2

    plain_head = config.representation_size is None and keeps_checkpoint_head(config, architecture)
    changes = dict(
        no_embed_class=not architecture.position_has_class_slot,
        num_classes=config.num_labels if plain_head else 0,
        patch_size=config.patch_size // config.backbone_stride,
    )
    if config.backbone_depths:
        backbone = _resnetv2(layers=tuple(config.backbone_depths), in_chans=config.num_channels)
        changes["embed_layer"] = partial(HybridEmbed, backbone=backbone)
    model = timm_vit(config, **changes).eval()
    _load_weights(model, str(npz_path))
    return model


@torch.no_grad()
def verify_folder(folder, npz_path, architecture, tolerance: float = 1e-4) -> dict[str, float]:
    """Load `folder` as a user would (remote code) and compare it with timm on a random batch in [-1, 1].

    Returns the largest differences: `features` (the final normed tokens) and, where timm gives the same head,
    `logits` (timm's head, or with `pre_logits` `head(tanh(W·cls + b))` computed by hand from the npz arrays); `scale`
    is the reference's largest value. Raises if an output is not finite or differs by more than `tolerance` times the
    scale (at least 1)."""
    from transformers import AutoModelForImageClassification

    # The weights are what is verified: merging changes the token count, so it is switched off for the comparison.
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, merge_mode="none").eval()
    config = model.config
    reference = timm_reference(npz_path, config, architecture)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, config.num_channels, config.image_size, config.image_size, generator=generator) * 2 - 1
    tokens = reference.forward_features(pixels)  # [batch, tokens, hidden], after the final norm
    ours = model.conformer(pixels).last_hidden_state
    result = {"features": (ours - tokens).abs().max().item(), "scale": tokens.abs().max().item()}
    if keeps_checkpoint_head(config, architecture) and config.classifier == "token":  # "gap" pools differently
        pooled = reference.forward_head(tokens, pre_logits=True)  # the class token
        if config.representation_size is None:
            expected = reference.head(pooled)  # as timm's loader filled it
        else:  # head(tanh(W·cls + b)), straight from the file's arrays
            with load_npz(npz_path) as params:
                reader = CheckpointReader(params)
                keys = ("pre_logits/kernel", "pre_logits/bias", "head/kernel", "head/bias")
                pre_weight, pre_bias, weight, bias = (torch.from_numpy(reader.get(key)) for key in keys)
            expected = torch.tanh(pooled @ pre_weight + pre_bias) @ weight + bias
        result["logits"] = (model(pixels).logits - expected).abs().max().item()
        result["scale"] = expected.abs().max().item()
    if not all(math.isfinite(value) for value in result.values()):
        raise ConversionError("verification failed: the outputs on a random batch are not finite (NaN or inf)")
    limit = tolerance * max(1.0, result["scale"])
    worst = max(result.get("logits", 0.0), result["features"])
    if worst > limit:
        raise ConversionError(
            f"verification failed: the converted model differs from timm's by {worst:.3g} (> {limit:.3g})"
        )
    return result


# --------------------------------------------------------------------------------------------------------------------
# The Hub folder, written without touching anything the converter did not write
# --------------------------------------------------------------------------------------------------------------------


def image_processor(config: ConformerConfig, image_mean=None, image_std=None):
    """transformers' `ViTImageProcessor` at the model's size; by default its own statistics, which are Google's (mean
    0.5, std 0.5: pixels scaled to [-1, 1]), repeated for the model's channels."""
    from transformers import ViTImageProcessor

    google = [0.5] * config.num_channels
    size = {"height": config.image_size, "width": config.image_size}
    return ViTImageProcessor(size=size, image_mean=list(image_mean or google), image_std=list(image_std or google))


def _foreign_entries(folder: Path) -> list[str]:
    """What in `folder` a conversion does not write (anything but plain files of `CONVERTED_FILES`)."""
    return sorted(
        p.name for p in folder.iterdir() if p.name not in CONVERTED_FILES or p.is_symlink() or not p.is_file()
    )


def _remove_conversion(folder: Path):
    """Delete a folder a conversion wrote: only its files by name, so `rmdir` fails on anything else."""
    for name in CONVERTED_FILES:
        (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def _check_output_dir(output_dir: Path, source: Path | None, overwrite: bool, onnx_path=None):
    """Refuse an `--output_dir` that holds the source (checkpoint file or folder) or the working directory, is a
    file, or holds anything but a previous conversion (without `overwrite`: anything at all); and an `onnx_path` whose
    file or `.data` file (the weights) exists, without `overwrite`."""
    target, cwd = output_dir.resolve(), Path.cwd().resolve()
    sources = (source.resolve(), *source.resolve().parents) if source is not None else ()
    if target in (cwd, *cwd.parents, *sources):
        raise ConversionError(
            f"--output_dir {output_dir} holds the checkpoint or the current directory; name a new folder for the result"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output_dir {output_dir} exists and is not a directory")
    for existing in (Path(onnx_path), Path(f"{onnx_path}.data")) if onnx_path else ():
        if existing.is_dir() or (existing.exists() and not overwrite):
            raise ConversionError(f"--export_onnx {onnx_path}: {existing} exists (pass --overwrite to replace it)")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise ConversionError(f"--output_dir {output_dir} exists and is not empty (pass --overwrite to replace it)")
    foreign = _foreign_entries(output_dir)
    if foreign:
        raise ConversionError(
            f"--output_dir {output_dir} holds what no conversion wrote ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); --overwrite replaces only a previous conversion"
        )


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def write_conversion(
    model,
    facts: CardFacts,
    output_dir: Path,
    source: Path | None,
    overwrite: bool,
    processor=None,
    source_license: str | None = None,
    verify: Callable[[Path], dict] | None = None,
):
    """Write the Hub folder of a conversion to `output_dir`, all or nothing: config.json (with `auto_map`),
    model.safetensors, the two remote-code files (`save_pretrained` copies them, as the classes are registered),
    preprocessor_config.json (`processor`, default `image_processor`) and README.md. It is staged beside `output_dir`
    and moved into place only once complete. `verify(staged folder) -> differences`: its result enters the card."""
    target = output_dir.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{STAGING_MARK}*"):  # left by killed conversions to `target`
        pid = stale.name.rpartition(STAGING_MARK)[2]
        if pid.isdigit() and not _process_is_running(int(pid)) and stale.is_dir() and not _foreign_entries(stale):
            _remove_conversion(stale)
    staging = target.parent / f".{target.name}{STAGING_MARK}{os.getpid()}"
    try:
        staging.mkdir()
        model.save_pretrained(staging)
        (processor or image_processor(model.config)).save_pretrained(staging)
        if verify:
            facts.verification = verify(staging)
        card = render_model_card(model.config, facts, source_license)
        (staging / "README.md").write_text(card, encoding="utf-8")
        _check_output_dir(output_dir, source, overwrite)  # again: another process may have written there meanwhile
        if target.exists():
            _remove_conversion(target)
        staging.replace(target)
    finally:
        if staging.is_dir():
            _remove_conversion(staging)


def publish(model, output_dir: Path, push_to_hub: str | None = None, onnx_path=None):
    """What follows a written folder: the ONNX export and the upload (the folder is complete if either fails)."""
    from huggingface_hub import create_repo, upload_folder

    if onnx_path:
        difference = export_onnx(model, onnx_path)
        print(f"wrote {onnx_path}: largest |onnxruntime - eager| on a random batch {difference:.3g}")
    if push_to_hub:
        try:  # the folder is already the repository: it is uploaded as it is
            create_repo(push_to_hub, exist_ok=True)
            upload_folder(repo_id=push_to_hub, folder_path=str(output_dir), commit_message="Convert a ViT checkpoint")
        except Exception as error:  # network, credentials, offline mode: the folder itself is complete
            raise ConversionError(
                f"wrote {output_dir}, but uploading it to {push_to_hub} failed ({type(error).__name__}: {error})"
            ) from None


def _merging_flags(config: ConformerConfig) -> str:
    if config.merge_mode == "none":
        return ""
    merge_r = ",".join(map(str, config.merge_r)) if isinstance(config.merge_r, list) else config.merge_r
    return f" --merge_mode {config.merge_mode} --merge_r {merge_r}"


def convert(
    npz_path,
    output_dir,
    model_type: str | None = None,
    image_size: int | None = None,
    num_labels: int | None = None,
    id2label: dict | None = None,
    overwrite: bool = False,
    verify: bool = False,
    push_to_hub: str | None = None,
    onnx_path: str | None = None,
    **config_overrides,
) -> Path:
    """Convert `npz_path` into the Hub-ready folder `output_dir`; returns its path.

    Nothing is written to `output_dir` unless the whole conversion (and, with `verify`, the comparison with timm)
    succeeds: the folder is staged beside it and moved into place at the end. `overwrite` replaces only a folder that
    a previous conversion wrote. `onnx_path`: also export the model, merging as configured, to this ONNX file.
    """
    npz_path, output_dir = Path(npz_path), Path(output_dir)
    _check_output_dir(output_dir, npz_path, overwrite, onnx_path)
    options = dict(model_type=model_type, image_size=image_size, num_labels=num_labels, id2label=id2label)
    with load_npz(npz_path) as params:
        model, architecture = _convert(params, **options, **config_overrides)
    config = model.config
    # The command that reproduces this conversion (file names only).
    command = f"python convert_npz_to_hf.py --npz_path {npz_path.name} --output_dir {output_dir.name}"
    command += f" --model_type {model_type}" * bool(model_type)
    command += f" --image_size {config.image_size}" * (config.image_size != architecture.image_size)
    if id2label is not None:
        command += " --id2label labels.json"
    elif config.num_labels != architecture.num_classes:
        command += f" --num_labels {config.num_labels}"
    command += _merging_flags(config) + f" --classifier {config.classifier}" * (config.classifier != "token")
    facts = CardFacts(
        model_type=architecture.model_type,
        source_file=npz_path.name,
        pretrained_classes=architecture.num_classes,
        source_image_size=architecture.image_size,
        keep_head=keeps_checkpoint_head(config, architecture),
        repo_id=push_to_hub or "path/to/this/folder",
        command=command + " --verify",
    )
    check = partial(verify_folder, npz_path=npz_path, architecture=architecture) if verify else None
    write_conversion(model, facts, output_dir, npz_path, overwrite, verify=check)
    if facts.verification:
        differences = ", ".join(f"{key} {value:.3g}" for key, value in facts.verification.items() if key != "scale")
        print(f"verify: largest |ours - timm| on a random batch: {differences}")
    publish(model, output_dir, push_to_hub, onnx_path)
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# transformers' ViT family (DeiT, DINOv2, CLIP and SigLIP towers, I-JEPA, ...) through `from_transformers`
# --------------------------------------------------------------------------------------------------------------------


def source_image_processor(source, config: ConformerConfig):
    """The source's own image processor when its folder (or Hub repo) has one and the resolution is unchanged;
    otherwise `ViTImageProcessor` at the model's size, with the source processor's statistics if it has some."""
    from transformers import AutoImageProcessor

    processor = None
    if isinstance(source, (str, os.PathLike)):
        try:
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError):  # no preprocessor_config.json
            pass
    source_size = getattr(getattr(source, "config", None), "image_size", None)
    if processor is not None and source_size in (None, config.image_size):
        return processor
    return image_processor(config, getattr(processor, "image_mean", None), getattr(processor, "image_std", None))


def source_license(source) -> str | None:
    """The `license` of the source's own model card (README.md of its folder or Hub repo), if it has one."""
    from huggingface_hub import ModelCard

    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return ModelCard.load(Path(source, "README.md") if Path(source).is_dir() else source).data.license
    except Exception:  # no card, offline, not a repo: the card then names no license
        return None


def convert_transformers(
    source,
    output_dir,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    onnx_path: str | None = None,
    **config_overrides,
) -> Path:
    """Convert a model of transformers' ViT family (a folder, a Hub id such as `facebook/dinov2-small`, or a model
    object) into the Hub-ready folder `output_dir`, as `convert` does for Google's npz; returns its path.

    `config_overrides` go to `ConformerForImageClassification.from_transformers` (`merge_mode`, `merge_r`,
    `image_size`, `num_labels`, `classifier`, ...); the card names the source as its base model."""
    from transformers import AutoConfig

    is_path = isinstance(source, (str, os.PathLike))
    output_dir, folder = Path(output_dir), Path(source) if is_path and Path(source).is_dir() else None
    _check_output_dir(output_dir, folder, overwrite, onnx_path)
    try:
        with seeded_new_weights():
            model = ConformerForImageClassification.from_transformers(source, **config_overrides).eval()
    except (TypeError, ValueError, StrictDataclassError) as error:  # an unsupported class, a bad override
        raise ConversionError(str(error)) from None
    if is_path:
        source_config = AutoConfig.from_pretrained(source)
        name, source_class = str(source), source_config.architectures[0]
    else:
        source_config, name = source.config, type(source).__name__
        source_class = name
    source_size = getattr(source_config, "vision_config", source_config).image_size  # CLIPModel: its vision tower
    has_head = "ForImageClassification" in source_class
    processor = source_image_processor(source, model.config)
    command = f"python convert_npz_to_hf.py --from_transformers {name} --output_dir {output_dir.name}"
    command += f" --image_size {model.config.image_size}" * (model.config.image_size != source_size)
    facts = CardFacts(
        model_type=None,
        source_file=name,
        pretrained_classes=source_config.num_labels if has_head else None,
        source_image_size=source_size,
        # from_transformers keeps the source's head unless the classes or the classifier change
        keep_head=has_head
        and model.config.num_labels == source_config.num_labels
        and "classifier" not in config_overrides,
        repo_id=push_to_hub or "path/to/this/folder",
        command=command + _merging_flags(model.config),
        source_class=source_class,
        preprocessing=f"`{type(processor).__name__}` (mean {processor.image_mean}, std {processor.image_std})",
        reference=f"`{source_class}`",
    )
    write_conversion(
        model, facts, output_dir, folder, overwrite, processor=processor, source_license=source_license(source)
    )
    publish(model, output_dir, push_to_hub, onnx_path)
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def export_onnx(model, path, tolerance: float = 1e-4) -> float:
    """Export `model` (eval mode, merging as configured) with torch's dynamo exporter to `path` (the weights to
    `path.data` beside it): input `pixel_values` with a dynamic batch dimension, output `logits`. Every merge mode is
    one graph, so the merging runs inside ONNX. Checked with onnxruntime against eager on a random batch of another
    size than the traced one; returns the largest difference (raises above `tolerance` times the logits' scale)."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (what torch's exporter needs)
    except ImportError as error:
        raise ConversionError(
            f"ONNX export needs the export extra: pip install 'conformer-vit[export]' ({error})"
        ) from None
    config, path = model.eval().config, Path(path)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, config.num_channels, config.image_size, config.image_size, generator=generator) * 2 - 1
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            model,
            (pixels[:2],),
            str(path),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    except Exception as error:  # the exporter raises many kinds, wrapping the cause; one line names the cause
        cause = error.__cause__ or error
        raise ConversionError(
            f"ONNX export failed ({type(cause).__name__}: {(str(cause) or '?').splitlines()[0]})"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
    expected = model(pixels).logits
    difference = (torch.from_numpy(exported) - expected).abs().max().item()
    if not difference <= tolerance * max(1.0, expected.abs().max().item()):  # NaN fails too
        raise ConversionError(f"ONNX export of {path} differs from eager by {difference:.3g} on a random batch")
    return difference


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_merge_r(text: str) -> int | list[int]:
    """`merge_r` as written on a command line: one int for every layer, or comma-separated ints, one per layer."""
    try:
        values = [int(value) for value in str(text).split(",")]
    except ValueError:
        raise ValueError(f"merge_r must be an int or comma-separated ints (one per layer), got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _read_id2label(path) -> dict[int, str]:
    try:
        labels = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"--id2label {path}: cannot read a JSON label map ({error})") from None
    if isinstance(labels, list):
        labels = dict(enumerate(labels))
    if not isinstance(labels, dict):
        raise ConversionError(f'--id2label {path}: expected a JSON object {{"0": "name", ...}} or a list of names')
    try:
        return {int(index): str(name) for index, name in labels.items()}
    except ValueError:
        raise ConversionError(f"--id2label {path}: class ids must be integers") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `ValueError`s, so that `main` reports them as it reports every other bad input."""

    def error(self, message):
        raise ConversionError(message)


ARGUMENTS = [  # (flag, argparse keywords, help)
    ("--npz_path", {}, "Google's checkpoint, e.g. ViT-B_16.npz or R50+ViT-B_16.npz."),
    (
        "--from_transformers",
        dict(metavar="MODEL"),
        "Instead of --npz_path: a transformers ViT-family folder or Hub id (ViT, DeiT, DINOv2, CLIP, SigLIP, ...).",
    ),
    ("--output_dir", {}, "Folder to write: absent, empty, or (with --overwrite) a previous conversion."),
    ("--model_type", {}, "Expected model (ViT-B_16, ..., R50+ViT-B_16): a cross-check of the shapes read."),
    ("--image_size", dict(type=int), "Resolution; position embeddings are resampled bilinearly (as timm)."),
    ("--num_labels", dict(type=int), "Classes (default: the checkpoint's); another count gives a zero head."),
    ("--id2label", {}, 'JSON file naming the classes ({"0": "cat", ...} or a list); sets num_labels.'),
    ("--merge_mode", dict(choices=MERGE_MODES, default="none"), "Token merging between attention and MLP."),
    ("--merge_r", dict(default="0"), "Tokens merged per layer: one int, or one per layer (comma-separated)."),
    ("--classifier", dict(choices=CLASSIFIERS), "Pooling for the head (default: the source's); 'cnn' gets a new head."),
    ("--push_to_hub", dict(metavar="REPO_ID"), "Upload the folder to this Hub repository afterwards."),
    ("--verify", dict(action="store_true"), "Load the folder back and compare its outputs with timm's loader."),
    ("--export_onnx", dict(metavar="PATH"), "Also export the model (merging on) to this ONNX file (+ PATH.data)."),
    ("--overwrite", dict(action="store_true"), "Replace an --output_dir that a previous conversion wrote."),
    (
        "--write_model_cards",
        dict(nargs="?", const="model_cards", metavar="DIR"),
        "Regenerate the cards of the released checkpoints (default: model_cards/) and exit.",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Convert a Google ViT checkpoint (.npz) or a transformers ViT-family model into a Hub-ready "
        "Conformer folder."
    )
    for flag, keywords, help_text in ARGUMENTS:
        parser.add_argument(flag, help=help_text, **keywords)
    return parser


def main(argv=None) -> int:
    """The command line: 0 on success; on bad input one `error: ...` line on stderr and status 2."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        args = build_parser().parse_args(argv)
        if args.write_model_cards:
            print("\n".join(map(str, write_model_cards(args.write_model_cards))))
            return 0
        if bool(args.npz_path) == bool(args.from_transformers) or not args.output_dir:
            raise ConversionError("--output_dir and one of --npz_path, --from_transformers are required")
        merge_r = parse_merge_r(args.merge_r)
        if merge_r != 0 and args.merge_mode == "none":
            raise ConversionError(f"--merge_r needs --merge_mode ({', '.join(MERGE_MODES[1:])})")
        id2label = _read_id2label(args.id2label) if args.id2label else None
        common = dict(overwrite=args.overwrite, push_to_hub=args.push_to_hub, onnx_path=args.export_onnx)
        common.update(merge_mode=args.merge_mode, merge_r=merge_r)
        if args.npz_path:
            options = dict(model_type=args.model_type, image_size=args.image_size, num_labels=args.num_labels)
            options.update(id2label=id2label, verify=args.verify, classifier=args.classifier or "token")
            output_dir = convert(args.npz_path, args.output_dir, **options, **common)
        elif args.model_type or args.verify:
            raise ConversionError("--model_type and --verify check an .npz against timm; not for a transformers model")
        else:
            overrides = dict(image_size=args.image_size, num_labels=args.num_labels, classifier=args.classifier)
            overrides = {key: value for key, value in overrides.items() if value is not None}
            if id2label is not None:
                overrides.update(label_maps(id2label), num_labels=len(id2label))
            output_dir = convert_transformers(args.from_transformers, args.output_dir, **common, **overrides)
    except (ValueError, OSError) as error:  # OSError: disk full, permissions; still one line
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    print(f"wrote {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

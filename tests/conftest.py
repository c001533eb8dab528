"""Shared fixtures: the one synthetic checkpoint in Google's `.npz` layout that every test converts or trains from."""

from pathlib import Path

import numpy as np
import pytest

from conformer_vit.hub_folder import hub_folder_files

# The tiny ViT of the synthetic checkpoints: width, depth, heads, MLP width, patch size, grid side, classes.
# What a conversion writes into its folder: the Hub layout users load with `trust_remote_code=True`.
HUB_FOLDER_FILES = list(hub_folder_files())
TINY_VIT = dict(width=32, depth=2, heads=2, mlp=64, patch=8, grid=4, classes=5)


def google_vit_params(
    width=TINY_VIT["width"],
    depth=TINY_VIT["depth"],
    heads=TINY_VIT["heads"],
    mlp=TINY_VIT["mlp"],
    patch=TINY_VIT["patch"],
    grid=TINY_VIT["grid"],
    classes=TINY_VIT["classes"],
    representation_size=None,
    backbone_depths=None,
    gn_4d=False,
    big_vision=False,
    position_class_slot=True,
    seed=0,
) -> dict[str, np.ndarray]:
    """Random weights under the keys of google-research/vision_transformer (or big_vision's stacked layout).

    Hybrid: a BiT ResNet of `backbone_depths` stages at R50 widths (64 stem; 256, 512, ... per stage), then a
    (patch / stride)-sized embedding over its feature map. `gn_4d` stores GroupNorm parameters as [1, 1, 1, C].
    """
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.2, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    def norm(name, channels, shape=None):
        params[f"{name}/scale"] = rand(*(shape or (channels,)), scale=0.1, offset=1.0)
        params[f"{name}/bias"] = rand(*(shape or (channels,)), scale=0.1)

    params = {}
    if backbone_depths:
        params["conv_root/kernel"] = rand(7, 7, 3, 64)
        group_norm = (lambda c: (1, 1, 1, c)) if gn_4d else (lambda c: (c,))
        norm("gn_root", 64, group_norm(64))
        in_channels = 64
        for stage, stage_depth in enumerate(backbone_depths):
            out_channels = 256 * 2**stage
            mid = out_channels // 4
            for unit in range(stage_depth):
                block = f"block{stage + 1}/unit{unit + 1}/"
                convs = [("conv1", (1, 1, in_channels, mid)), ("conv2", (3, 3, mid, mid))]
                convs.append(("conv3", (1, 1, mid, out_channels)))
                if unit == 0:
                    convs.append(("conv_proj", (1, 1, in_channels, out_channels)))
                for conv, shape in convs:
                    params[f"{block}{conv}/kernel"] = rand(*shape)
                    norm(block + conv.replace("conv", "gn"), shape[-1], group_norm(shape[-1]))
                in_channels = out_channels
        kernel = patch // 2 ** (len(backbone_depths) + 1)
        params["embedding/kernel"] = rand(kernel, kernel, in_channels, width, scale=0.05)
    else:
        params["embedding/kernel"] = rand(patch, patch, 3, width, scale=0.05)
    params["embedding/bias"] = rand(width)
    params["cls"] = rand(1, 1, width)
    position = rand(1, grid * grid + int(position_class_slot), width)

    head_dim = width // heads
    layers = []
    for _ in range(depth):
        layer = {
            "MultiHeadDotProductAttention_1/out/kernel": rand(heads, head_dim, width),
            "MultiHeadDotProductAttention_1/out/bias": rand(width),
            "MlpBlock_3/Dense_0/kernel": rand(width, mlp),
            "MlpBlock_3/Dense_0/bias": rand(mlp),
            "MlpBlock_3/Dense_1/kernel": rand(mlp, width),
            "MlpBlock_3/Dense_1/bias": rand(width),
        }
        for name in ("LayerNorm_0", "LayerNorm_2"):
            layer[f"{name}/scale"], layer[f"{name}/bias"] = rand(width, scale=0.1, offset=1.0), rand(width, scale=0.1)
        for name in ("query", "key", "value"):
            layer[f"MultiHeadDotProductAttention_1/{name}/kernel"] = rand(width, heads, head_dim)
            layer[f"MultiHeadDotProductAttention_1/{name}/bias"] = rand(heads, head_dim)
        layers.append(layer)
    norm("Transformer/encoder_norm", width)
    head_in = width
    if representation_size:
        params["pre_logits/kernel"], params["pre_logits/bias"] = (
            rand(width, representation_size),
            rand(representation_size),
        )
        head_in = representation_size
    params["head/kernel"], params["head/bias"] = rand(head_in, classes), rand(classes)

    if not big_vision:
        params["Transformer/posembed_input/pos_embedding"] = position
        for index, layer in enumerate(layers):
            params.update({f"Transformer/encoderblock_{index}/{key}": value for key, value in layer.items()})
        return params
    # big_vision: `params/` prefix, its own module numbering, position embedding at the top, layers stacked.
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1"}
    renames["MlpBlock_3"] = "MlpBlock_0"
    stacked = {f"params/{key}": value for key, value in params.items()}
    stacked["params/pos_embedding"] = position
    for key in layers[0]:
        new_key = key
        for old, new in renames.items():
            new_key = new_key.replace(old, new)
        stacked[f"params/Transformer/encoderblock/{new_key}"] = np.stack([layer[key] for layer in layers])
    return stacked


@pytest.fixture
def google_npz():
    """`make(path, **kwargs) -> Path`: writes `google_vit_params(**kwargs)` to `path` with `numpy.savez`."""

    def make(path, **kwargs) -> Path:
        np.savez(path, **google_vit_params(**kwargs))
        return Path(path)

    return make

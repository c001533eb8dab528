"""Seeing what a Conformer does: attention rollout and merge maps, as one PNG.

    python visualize_attention.py --model runs/demo --image digits:0 digits:1 digits:2 --compare-modes \
        --output docs/attention_sample.png

draws, one row per image, the image as the model sees it, the attention rollout from the class token to the patches
(Abnar & Zuidema, 2020) overlaid on it, and one merge map per merge mode of `MERGE_MODES`: each final token's patches
painted with their mean colour and the token's border drawn, as in ToMe's figures (Bolya et al., 2023).

`--model` is a Conformer folder or a folder (or Hub id) of any class of transformers' ViT family in `SOURCE_CLASSES`
(DeiT, DINOv2 with or without registers, CLIP and SigLIP vision towers, I-JEPA, ...), converted on the fly by
`ConformerForImageClassification.from_transformers`. Prefix tokens (class, distillation, registers) come first and
never merge; models without a class token (SigLIP, I-JEPA) pool all their tokens, so their rollout is read from the
mean over all tokens instead of the class token's row.

The numbers come from pure functions that work on any batch: `attention_rollout` and `rollout_map` for the rollout,
`merge_map` for the token each patch ended in. `trace_model` collects what they need from one forward pass (with
forward pre-hooks on the layers; the model is not changed); `paint_merge_map` and `plot_panels` draw.
"""

import argparse
import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from PIL import Image

from configuration_conformer import MERGE_MODES
from conformer_vit.data import load_digits_dataset, load_rgb_image
from conformer_vit.output_paths import check_output as check_output_path
from conformer_vit.sources import SOURCE_CLASSES, load_image_processor, reconfigured
from conformer_vit.sources import load_model as load_model_from_source
from token_merging import check_merge_schedule, merge_schedule

SAMPLE_IMAGES = ("chelsea", "astronaut", "coffee")  # shipped inside scikit-image: no download
PICTURE_MARK = "conformer-vit visualize_attention.py"  # in every PNG drawn here: only those are replaced
DISPLAY_SIZE = 224  # panels are drawn at least this many pixels wide


class VisualizeError(ValueError):
    """Bad input, with a message that says what is wrong and what to do; `main` prints it as one `error:` line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise `VisualizeError`, so that they end as every other bad input does."""

    def error(self, message):
        raise VisualizeError(f"{message} (see --help)")


# --------------------------------------------------------------------------------------------------------------------
# Rollout and merge maps: pure functions of what one forward pass returns.
# --------------------------------------------------------------------------------------------------------------------


def token_sizes_from_source_map(source_map: torch.LongTensor, num_tokens: int) -> torch.Tensor:
    """How many original tokens each of `num_tokens` current tokens stands for: [batch, num_tokens] (float).

    `source_map` [batch, original tokens] gives each original token's current token. These counts are the model's
    `token_sizes` (sizes start at one and add up when tokens merge), so nothing else has to be carried.
    """
    sizes = torch.zeros(source_map.shape[0], num_tokens, dtype=torch.float32, device=source_map.device)
    return sizes.scatter_add_(1, source_map, torch.ones_like(source_map, dtype=torch.float32))


def expand_to_original_tokens(matrix: torch.Tensor, source_map: torch.LongTensor) -> torch.Tensor:
    """Carry a [batch, tokens, tokens] row-stochastic matrix between current tokens back to original tokens.

    `expanded[b, i, j] = matrix[b, s(i), s(j)] / size(s(j))` with `s = source_map[b]`: original token i takes the row
    of its token, and each key token's weight is split equally among the original tokens it stands for. Rows still
    sum to 1; with nothing merged (`s` the identity, all sizes 1) the matrix is returned unchanged.
    Returns [batch, original tokens, original tokens].
    """
    num_original = source_map.shape[1]
    sizes = token_sizes_from_source_map(source_map, matrix.shape[-1]).to(matrix.dtype)
    rows = matrix.gather(1, source_map[:, :, None].expand(-1, -1, matrix.shape[-1]))  # [batch, original, tokens]
    expanded = rows.gather(2, source_map[:, None, :].expand(-1, num_original, -1))  # [batch, original, original]
    return expanded / sizes.gather(1, source_map)[:, None, :]


def attention_rollout(
    attentions: Sequence[torch.Tensor], source_maps: Sequence[torch.LongTensor | None] | None = None
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) in the space of the original tokens (prefix tokens, then patches).

    `attentions[l]` is layer l's attention [batch, heads, N_l, N_l] between the N_l tokens entering it, and
    `source_maps[l]` [batch, prefix + patches] the source map entering layer l (original token -> its current token);
    `None` (or no `source_maps`) means nothing was merged before that layer. Returns the rollout
    [batch, prefix + patches, prefix + patches]: row i says how much of original token i's final representation comes
    from each original token's input. Every row sums to 1.

    Each layer is as in the paper: average the heads, add the identity and renormalise, i.e.
    `A_l = (mean_heads(attention_l) + I) / 2` (attention rows sum to 1), and the rollout is `A_L ... A_2 A_1`.

    With merging, `A_l` is a matrix between the N_l tokens of layer l, and the merge that follows the attention changes
    the tokens. To multiply the layers on one grid, each `A_l` is carried back to the original tokens with that layer's
    source map `s` and token sizes `n` (`expand_to_original_tokens`): `A_l[s(i), s(j)] / n(s(j))`. A query patch takes
    the row of the token it belongs to. A key token's weight is split equally among its patches because with
    proportional attention its logits carry `+log(n)`: the weight it gets is exactly what `n` identical copies of it
    would get together, so each patch receives what one copy would. The identity is carried the same way: a patch's
    residual stream is its token, the mean of the token's patches, so its identity row spreads `1/n` over them.
    This carrying respects products (`E(A) E(B) = E(AB)` for one source map), so between merges it is plain rollout
    in token space, and the merge itself (a size-weighted mean) needs no matrix of its own: right-multiplied by the
    next layer's carried matrix it changes nothing. With merging off every source map is the identity and every size 1,
    and the result is exactly plain rollout.
    """
    rollout = None
    for layer, attention in enumerate(attentions):
        attention = attention.float().mean(dim=1)  # [batch, tokens, tokens]
        identity = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
        layer_matrix = attention + identity
        layer_matrix = layer_matrix / layer_matrix.sum(dim=-1, keepdim=True)
        source_map = source_maps[layer] if source_maps is not None else None
        if source_map is not None:
            layer_matrix = expand_to_original_tokens(layer_matrix, source_map.to(attention.device))
        if rollout is not None and rollout.shape != layer_matrix.shape:
            raise ValueError(
                f"Layer {layer} has {layer_matrix.shape[-1]} tokens where layer 0 had {rollout.shape[-1]}: pass the "
                "source map entering each layer that follows a merge."
            )
        rollout = layer_matrix if rollout is None else layer_matrix @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the attention of at least one layer.")
    return rollout


def rollout_map(rollout: torch.Tensor, grid: tuple[int, int], class_token: bool = True) -> torch.Tensor:
    """How much the output reads from each patch, on the grid: [batch, grid_h, grid_w].

    `rollout` [batch, prefix + patches, prefix + patches] (patches last). The query is the class token's row (token 0);
    a model without a class token (SigLIP, I-JEPA) pools all its tokens, so its query is the mean of all rows, as
    rollout is read for mean-pooled transformers. Only the patches' columns are kept; each query row sums to 1.
    """
    query = rollout[:, 0] if class_token else rollout.mean(dim=1)  # [batch, prefix + patches]
    return query[:, query.shape[1] - math.prod(grid) :].reshape(rollout.shape[0], *grid)


def merge_map(source_map: torch.LongTensor, grid: tuple[int, int]) -> torch.LongTensor:
    """The token each patch ended in, on the patch grid: [batch, grid_h, grid_w] integer labels.

    The labels are the final token indices of `source_map` [batch, prefix + patches] (patches last). Prefix tokens
    (class, distillation, registers) never merge, so the patches carry the labels after them, each patch exactly one.
    """
    return source_map[:, source_map.shape[1] - math.prod(grid) :].reshape(source_map.shape[0], *grid)


# --------------------------------------------------------------------------------------------------------------------
# One forward pass, with what merging did in each layer.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MergeTrace:
    """What one forward pass did. `source_maps[l]` enters layer l and the last one is the output's, so there is one
    more source map than attention map; token sizes are counted from them (`token_sizes_from_source_map`)."""

    logits: torch.Tensor | None  # None for a backbone (a ConformerModel)
    attentions: list[torch.Tensor]  # [batch, heads, N_l, N_l] each
    source_maps: list[torch.LongTensor]  # [batch, prefix + patches] each


def trace_model(model, pixel_values: torch.Tensor, **forward_kwargs) -> MergeTrace:
    """Run a Conformer image classifier (loaded with `attn_implementation="eager"`) and collect each layer's attention
    and the source map entering it. The source maps come from forward pre-hooks on `model.conformer.layers`, removed
    before returning."""
    classifier = hasattr(model, "conformer")  # a ConformerForImageClassification, or a ConformerModel backbone
    layers = (model.conformer if classifier else model).layers
    source_maps = []

    def record(module, args, kwargs):  # the layer's arguments: hidden_states, token_sizes, source_map
        source_maps.append(args[2] if len(args) > 2 else kwargs["source_map"])

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            merge_info = {"output_merge_info": True} if classifier else {}  # a base model always returns it
            outputs = model(pixel_values, output_attentions=True, **merge_info, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    attentions = list(outputs.attentions or ())
    if len(attentions) != len(layers):
        raise VisualizeError(
            "the model returned no attention weights: load it with attn_implementation='eager'"
            if not attentions
            else f"the model returned {len(attentions)} attention maps for {len(layers)} layers"
        )
    return MergeTrace(getattr(outputs, "logits", None), attentions, [*source_maps, outputs.source_map])


# --------------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------------


def label_borders(labels: np.ndarray, border_width: int = 1) -> np.ndarray:
    """Pixels of `labels` [h, w] within `border_width` pixels of another label (the image's edge is no border)."""
    padded = np.pad(labels, border_width, mode="edge")
    height, width = labels.shape
    border = np.zeros(labels.shape, dtype=bool)
    for dy in range(-border_width, border_width + 1):
        for dx in range(-border_width, border_width + 1):
            shifted = padded[
                border_width + dy : border_width + dy + height, border_width + dx : border_width + dx + width
            ]
            border |= shifted != labels
    return border


def paint_merge_map(image: np.ndarray, labels: np.ndarray, border_width: int = 2, seed: int = 0) -> np.ndarray:
    """ToMe-style merge map: every pixel of a token painted with the token's mean colour, its border in a colour of its
    own. `image` [h, w, 3] floats in [0, 1]; `labels` [grid_h, grid_w] token per patch, repeated to fill the image
    (h and w must be multiples of the grid). Returns [h, w, 3] floats in [0, 1]."""
    cell_h, cell_w = image.shape[0] // labels.shape[0], image.shape[1] // labels.shape[1]
    if (cell_h * labels.shape[0], cell_w * labels.shape[1]) != image.shape[:2]:
        raise ValueError(
            f"Image of {image.shape[:2]} pixels is not a whole number of cells of the {labels.shape} grid."
        )
    pixel_labels = np.repeat(np.repeat(labels, cell_h, axis=0), cell_w, axis=1)
    _, flat = np.unique(pixel_labels, return_inverse=True)
    flat = flat.reshape(pixel_labels.shape)
    counts = np.bincount(flat.ravel()).astype(np.float64)
    means = np.stack([np.bincount(flat.ravel(), image[..., c].ravel()) / counts for c in range(3)], axis=-1)
    painted = means[flat]
    hues = np.random.default_rng(seed).uniform(0.0, 1.0, size=len(counts))
    border_colours = hsv_to_rgb(np.stack([hues, np.full_like(hues, 0.85), np.ones_like(hues)], axis=-1))
    border = label_borders(flat, border_width)
    painted[border] = border_colours[flat[border]]
    return painted.clip(0.0, 1.0)


def upsample_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a [grid_h, grid_w] map to `size` (height, width) pixels."""
    tensor = torch.as_tensor(values, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass
class Panel:
    """One picture of the figure: an RGB image, optionally a heat map laid over it, and a title."""

    image: np.ndarray  # [h, w, 3] floats in [0, 1]
    title: str
    heat: np.ndarray | None = None  # [h, w], drawn with a colour map, half transparent


def plot_panels(rows: Sequence[Sequence[Panel]], path: Path, dpi: int = 100) -> Path:
    """Draw `rows` of panels with their titles into the PNG `path` (folders created) and return its path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    num_columns = max(len(row) for row in rows)
    figure = Figure(figsize=(3.2 * num_columns, 3.6 * len(rows)), dpi=dpi, layout="constrained")
    axes = figure.subplots(len(rows), num_columns, squeeze=False)
    for row_axes, row in zip(axes, rows):
        for axis in row_axes:
            axis.set_axis_off()
        for axis, panel in zip(row_axes, row):
            axis.imshow(panel.image, interpolation="nearest")
            if panel.heat is not None:
                axis.imshow(panel.heat, cmap="jet", alpha=0.5, interpolation="bilinear", vmin=0.0, vmax=1.0)
            axis.set_title(panel.title, fontsize=10)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", bbox_inches="tight", pad_inches=0.1, metadata={"Software": PICTURE_MARK})
    except OSError as exc:  # read-only folder or file, disk full
        raise VisualizeError(f"cannot write {path}: {exc.strerror or exc}; choose another --output") from None
    return path


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def is_our_picture(path: Path) -> bool:
    """Whether `path` is a PNG this tool drew (it marks its pictures), which a new picture may replace."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PICTURE_MARK
    except (OSError, ValueError):
        return False


def check_output(path: Path, inputs: Sequence[str]):
    """Refuse, before any work, an output that is or lies inside an input (an image, the model's folder), a folder,
    a path under a file, or a file this tool did not draw."""
    check_output_path(path, inputs, flag="--output", is_ours=is_our_picture)


@functools.cache
def digits_validation_split():
    """The digits the demo model did not train on (image_data's split, the same every time)."""
    return load_digits_dataset()["validation"]


def load_image(spec: str) -> tuple[Image.Image, str]:
    """The RGB image `spec` names and its caption. `spec` is a file path, `sample` (scikit-image's photograph of
    Chelsea the cat), `sample:NAME` for another photograph scikit-image ships (`astronaut`, `coffee`), or
    `digits:INDEX` for an image of the digits' validation split."""
    kind, _, name = spec.partition(":")
    if kind == "sample":
        name = name or "chelsea"
        if name not in SAMPLE_IMAGES:
            raise VisualizeError(f"unknown sample image {name!r}; choose one of {', '.join(SAMPLE_IMAGES)}")
        import skimage.data

        return load_rgb_image(Image.fromarray(getattr(skimage.data, name)())), spec
    if kind == "digits":
        split = digits_validation_split()
        if not (name.isdigit() and int(name) < len(split)):
            raise VisualizeError(f"{spec!r}: give digits:INDEX with INDEX from 0 to {len(split) - 1}")
        example = split[int(name)]
        label = split.features["label"].int2str(example["label"])
        return load_rgb_image(example["image"]), f"{spec} (a {label})"
    return load_rgb_image(spec), Path(spec).name


def load_model(model_id: str):
    """A Conformer classifier with eager attention (attention maps need it) from any source the project's loader takes:
    a Conformer folder or Hub id, or a model of transformers' ViT family converted on the fly."""
    try:
        return load_model_from_source(model_id, attn_implementation="eager").eval()
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        raise VisualizeError(f"cannot load model {model_id}: {first_line(exc)}") from None


def preprocess(image: Image.Image, processor, num_channels: int) -> tuple[torch.Tensor, np.ndarray]:
    """`pixel_values` [1, channels, h, w] for the model and the same picture as [h, w, 3] floats in [0, 1] for display
    (undoing the processor's normalisation, so the panels show exactly what the model saw)."""
    image = image.convert("L" if num_channels == 1 else "RGB")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].float()
    height, width = pixel_values.shape[-2:]
    if image.width * height != image.height * width:  # the model sees it stretched: say so once
        print(
            f"note: a {image.width}x{image.height} image is resized to {width}x{height}, not keeping its aspect ratio"
        )
    display = pixel_values[0]
    if getattr(processor, "do_normalize", False):
        mean = torch.as_tensor(processor.image_mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(processor.image_std, dtype=torch.float32).reshape(-1, 1, 1)
        display = display * std + mean
    display = display.permute(1, 2, 0).clamp(0, 1).numpy()
    return pixel_values, np.broadcast_to(display, (*display.shape[:2], 3))


def default_merge_r(
    num_patches: int, num_layers: int, modes: Sequence[str], share: float = 0.75, num_prefix_tokens: int = 1
) -> list[int]:
    """r per layer removing about `share` of the patches over all layers, lowered where a layer has too few tokens
    for one of `modes` (the `num_prefix_tokens` never merge)."""
    merge_r = max(1, int(share * num_patches / num_layers))
    return merge_schedule(merge_r, num_prefix_tokens + num_patches, num_layers, modes, num_prefix_tokens)


def describe_merging(config) -> str:
    if not merging_on(config):
        return "no merging"
    if config.merge_layers is not None:  # ATC's staged merging: the sites and their r
        sites = ",".join(f"{layer}:{r}" for layer, r in enumerate(config.merge_r_per_layer) if r)
        return f"{config.merge_mode}, staged r at layers {sites}"
    merge_r = config.merge_r_per_layer
    return f"{config.merge_mode}, r={merge_r[0] if len(set(merge_r)) == 1 else '/'.join(map(str, merge_r))}"


def prediction(logits: torch.Tensor | None, config) -> str:
    """`predicts LABEL` for the title (`logits` [batch, labels]: the first image's), or that there is no classifier."""
    if logits is None or config.num_labels == 0:
        return "has no classifier"
    predicted = int(logits[0].argmax())
    return f"predicts {(config.id2label or {}).get(predicted, str(predicted))}"


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def merging_on(config) -> bool:
    return config.merge_mode != "none" and any(config.merge_r_per_layer)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Draw a Conformer's attention rollout and merge maps for some images into a PNG, one row each.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Conformer folder (saved with save_pretrained) or Hub id, or a folder or Hub id of transformers' ViT "
        f"family, converted on the fly: {', '.join(SOURCE_CLASSES)}.",
    )
    parser.add_argument(
        "--image",
        required=True,
        nargs="+",
        help="Image files, `digits:INDEX` for an image of the digits' validation split, or `sample` for "
        "scikit-image's photograph of a cat (`sample:astronaut`, `sample:coffee`: other bundled photographs).",
    )
    parser.add_argument("--output", default="attention.png", type=Path, help="PNG to write (default: %(default)s).")
    parser.add_argument(
        "--layer",
        type=int,
        default=-1,
        help="Last layer the rollout runs through, counting from 0; negative counts from the end (default: -1, all). "
        "The merge maps show the tokens after that layer.",
    )
    parser.add_argument(
        "--compare-modes",
        action="store_true",
        help=f"Run the same weights with every merge mode ({', '.join(MERGE_MODES[1:])}) and draw each merge map.",
    )
    parser.add_argument(
        "--merge-r",
        "--merge_r",
        dest="merge_r",
        type=non_negative_int,
        default=None,
        help="r for --compare-modes (default: the model's own r, or, if it does not merge, one that removes about "
        "three quarters of the patches).",
    )
    return parser


def display_image(display: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """The part of `display` [h, w, 3] that the patches cover, resized to whole cells of at least DISPLAY_SIZE pixels
    across, so that patch borders fall on pixel borders."""
    cell = max(1, math.ceil(DISPLAY_SIZE / max(grid)))
    covered = display[: grid[0] * patch_size, : grid[1] * patch_size]
    picture = Image.fromarray((covered * 255).round().astype(np.uint8))
    picture = picture.resize((grid[1] * cell, grid[0] * cell), Image.Resampling.BICUBIC)
    return np.asarray(picture, dtype=np.float32) / 255.0


def merge_panel(image: np.ndarray, trace: MergeTrace, layer: int, grid: tuple[int, int], config) -> Panel:
    """The merge map after `layer` of one traced run, painted over `image`."""
    labels = merge_map(trace.source_maps[layer + 1], grid)[0].numpy()
    num_patch_tokens = len(np.unique(labels))
    border_width = max(1, image.shape[0] // (8 * grid[0]))
    predicted = prediction(trace.logits, config)
    title = f"{describe_merging(config)}: {num_patch_tokens} patch tokens\nafter layer {layer}, {predicted}"
    return Panel(paint_merge_map(image, labels, border_width), title)


def merge_settings(config, compare_modes: bool, merge_r: int | None, num_patches: int) -> list[tuple]:
    """The (merge_mode, merge_r) whose merge maps are drawn: the model's own if it merges, or with `compare_modes`
    every merge mode at `merge_r` (default: the model's own, or `default_merge_r` if it does not merge)."""
    if not compare_modes:
        return [(config.merge_mode, config.merge_r)] if merging_on(config) else []
    modes = [mode for mode in MERGE_MODES if mode != "none"]
    if merge_r is None:
        merge_r = config.merge_r
        if not merging_on(config):
            merge_r = default_merge_r(
                num_patches, config.num_hidden_layers, modes, num_prefix_tokens=config.num_prefix_tokens
            )
    return [(mode, merge_r) for mode in modes]


def draw_row(caption: str, pixel_values: torch.Tensor, display: np.ndarray, model, settings, layer: int, model_name):
    """The panels of one image: the image with the predicted label, the rollout, one merge map per merge setting."""
    config = model.config
    grid = (pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size)
    forward_kwargs = {}
    if tuple(pixel_values.shape[-2:]) != (config.image_size, config.image_size):
        forward_kwargs["interpolate_pos_encoding"] = True  # the processor's size is not the model's
    shown = display_image(display, grid, config.patch_size)

    trace = trace_model(model, pixel_values, **forward_kwargs)
    rollout = attention_rollout(trace.attentions[: layer + 1], trace.source_maps[: layer + 1])
    heat = rollout_map(rollout, grid, config.class_token)[0].numpy()
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)  # stretched to [0, 1] for display
    query = "the class token" if config.class_token else "the mean of all tokens"  # no class token: all are pooled
    panels = [
        Panel(shown, f"{caption}, {grid[0]}x{grid[1]} patches\n{model_name} {prediction(trace.logits, config)}"),
        Panel(
            shown,
            f"attention rollout, layers 0-{layer}\nfrom {query}\n({describe_merging(config)}; min-max scaled)",
            heat=upsample_map(heat, shown.shape[:2]),
        ),
    ]
    own_setting = (config.merge_mode, config.merge_r)
    for merge_mode, merge_r in settings:
        if (merge_mode, merge_r) == own_setting:
            merge_trace = trace
        else:  # the same weights, built again with this merge setting
            num_tokens = config.num_prefix_tokens + math.prod(grid)
            check_merge_schedule(merge_r, config.num_hidden_layers, num_tokens, merge_mode, config.num_prefix_tokens)
            merged = reconfigured(model, merge_mode=merge_mode, merge_r=merge_r)
            merge_trace = trace_model(merged, pixel_values, **forward_kwargs)
        panels.append(merge_panel(shown, merge_trace, layer, grid, config))
    return panels


def render(args: argparse.Namespace) -> Path:
    """Everything the command does; bad input raises `ValueError` or `OSError`."""
    check_output(args.output, [args.model, *args.image])
    images = [load_image(spec) for spec in args.image]
    model = load_model(args.model)
    config = model.config
    if config.num_channels not in (1, 3):
        raise VisualizeError(f"the model takes {config.num_channels}-channel images; pictures are grey or RGB")
    num_layers = config.num_hidden_layers
    if not -num_layers <= args.layer < num_layers:
        raise VisualizeError(f"--layer {args.layer} is out of range: the model has layers 0..{num_layers - 1}")
    layer = args.layer % num_layers

    processor = load_image_processor(args.model, config)
    inputs = [preprocess(image, processor, config.num_channels) for image, _ in images]
    num_patches = math.prod(size // config.patch_size for size in inputs[0][0].shape[-2:])
    settings = merge_settings(config, args.compare_modes, args.merge_r, num_patches)
    model_name = Path(args.model).name
    rows = [
        draw_row(caption, pixel_values, display, model, settings, layer, model_name)
        for (_, caption), (pixel_values, display) in zip(images, inputs)
    ]
    return plot_panels(rows, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        path = render(build_parser().parse_args(argv))
    except (ValueError, OSError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

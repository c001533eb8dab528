"""Seeing what a Conformer does: attention rollout and merge maps, as one PNG.

    python visualize_attention.py --model runs/demo --image sample --compare-modes --output docs/attention_sample.png

draws, side by side, the image as the model sees it, the attention rollout from the class token to the patches
(Abnar & Zuidema, 2020) overlaid on it, and one merge map per merge mode: each final token's patches painted with
their mean colour and the token's border drawn, as in ToMe's figures (Bolya et al., 2023).

The numbers come from pure functions that work on any batch: `attention_rollout` and `rollout_map` for the rollout,
`merge_map` for the token each patch ended in. `trace_model` collects what they need from one forward pass (with
forward pre-hooks on the layers; the model is not changed); `paint_merge_map` and `plot_panels` draw.
"""

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from PIL import Image, UnidentifiedImageError

from modeling_conformer import max_merge_r

MERGE_MODES_COMPARED = ("bipartite", "submodular")
SAMPLE_IMAGES = ("chelsea", "astronaut", "coffee")  # shipped inside scikit-image: no download
DISPLAY_SIZE = 224  # panels are drawn at least this many pixels wide


class VisualizeError(Exception):
    """Bad input the command reports in one line (exit status 2)."""


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
    """Attention rollout (Abnar & Zuidema, 2020) in the space of the original tokens (class token, then patches).

    `attentions[l]` is layer l's attention [batch, heads, N_l, N_l] between the N_l tokens entering it, and
    `source_maps[l]` [batch, 1 + patches] the source map entering layer l (original token -> its current token);
    `None` (or no `source_maps`) means nothing was merged before that layer. Returns the rollout
    [batch, 1 + patches, 1 + patches]: row i says how much of original token i's final representation comes from each
    original token's input. Every row sums to 1.

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


def rollout_map(rollout: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The class token's row of `rollout` [batch, 1 + patches, 1 + patches] on the grid: [batch, grid_h, grid_w]."""
    return rollout[:, 0, 1:].reshape(rollout.shape[0], *grid)


def merge_map(source_map: torch.LongTensor, grid: tuple[int, int]) -> torch.LongTensor:
    """The token each patch ended in, on the patch grid: [batch, grid_h, grid_w] integer labels.

    The labels are the final token indices of `source_map` [batch, 1 + patches]. The class token (token 0) is never
    merged, so the patches carry labels 1 .. N_final - 1, each patch exactly one.
    """
    return source_map[:, 1:].reshape(source_map.shape[0], *grid)


# --------------------------------------------------------------------------------------------------------------------
# One forward pass, with what merging did in each layer.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MergeTrace:
    """What one forward pass did. `source_maps[l]` and `token_sizes[l]` enter layer l; the last entry is the output
    (so both lists have one more entry than `attentions`)."""

    logits: torch.Tensor
    attentions: list[torch.Tensor]  # [batch, heads, N_l, N_l] each
    source_maps: list[torch.LongTensor]  # [batch, 1 + patches] each
    token_sizes: list[torch.Tensor]  # [batch, N_l] each


def trace_model(model, pixel_values: torch.Tensor, **forward_kwargs) -> MergeTrace:
    """Run a Conformer image classifier (loaded with `attn_implementation="eager"`) and collect each layer's attention,
    source map and token sizes. The per-layer maps come from forward pre-hooks on `model.conformer.layers`, removed
    before returning."""
    layers = model.conformer.layers
    entering = []

    def record(module, args, kwargs):
        names = ("hidden_states", "token_sizes", "source_map")
        values = {name: args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)}
        entering.append(values)

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            outputs = model(pixel_values, output_attentions=True, output_merge_info=True, **forward_kwargs)
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
    source_maps, token_sizes = [], []
    for values in entering:
        hidden_states, sizes = values["hidden_states"], values["token_sizes"]
        source_maps.append(values["source_map"])
        token_sizes.append(hidden_states.new_ones(hidden_states.shape[:2]) if sizes is None else sizes[..., 0])
    source_maps.append(outputs.source_map)
    token_sizes.append(outputs.token_sizes)
    return MergeTrace(outputs.logits, attentions, source_maps, token_sizes)


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


def plot_panels(panels: Sequence[Panel], path: str | Path, dpi: int = 100) -> Path:
    """Draw `panels` side by side with their titles into the PNG `path` (folders created) and return its path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    figure = Figure(figsize=(3.2 * len(panels), 3.6), dpi=dpi, layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, panel in zip(axes, panels):
        axis.imshow(panel.image, interpolation="nearest")
        if panel.heat is not None:
            axis.imshow(panel.heat, cmap="jet", alpha=0.5, interpolation="bilinear", vmin=0.0, vmax=1.0)
        axis.set_title(panel.title, fontsize=10)
        axis.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight", pad_inches=0.1)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def load_image(spec: str) -> Image.Image:
    """`spec` is a file path, `sample` (scikit-image's photograph of Chelsea the cat) or `sample:NAME` for another of
    the photographs scikit-image ships (`astronaut`, `coffee`)."""
    if spec == "sample" or spec.startswith("sample:"):
        name = spec.partition(":")[2] or "chelsea"
        if name not in SAMPLE_IMAGES:
            raise VisualizeError(f"unknown sample image {name!r}; choose one of {', '.join(SAMPLE_IMAGES)}")
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)())
    path = Path(spec)
    if not path.is_file():
        raise VisualizeError(f"image not found: {spec}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise VisualizeError(f"cannot read {spec} as an image ({type(exc).__name__})") from None


def load_model(model_id: str, **config_overrides):
    """A Conformer classifier from a folder or Hub id, with eager attention; `config_overrides` (e.g. another
    `merge_mode`) go into a fresh config, validated as any other."""
    from transformers import AutoConfig, AutoModelForImageClassification

    path = Path(model_id)
    # A Hub id is `name` or `owner/name`; anything else, or a path inside an existing local folder, is a local path.
    looks_local = path.is_absolute() or model_id.startswith(".") or model_id.count("/") > 1 or path.parent.is_dir()
    if not path.exists() and looks_local and str(path.parent) != ".":
        raise VisualizeError(f"model folder not found: {model_id}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise VisualizeError(f"{model_id} has no config.json: not a saved model folder")
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=True)
        if getattr(config, "model_type", None) != "conformer":
            raise VisualizeError(f"{model_id} is a {config.model_type!r} model, not a Conformer")
        if config_overrides:
            config = config.__class__.from_dict({**config.to_dict(), **config_overrides})
        return AutoModelForImageClassification.from_pretrained(
            model_id, config=config, trust_remote_code=True, attn_implementation="eager"
        ).eval()
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise VisualizeError(f"cannot load model {model_id}: {_first_line(exc)}") from None


def load_image_processor(model_id: str):
    """The model's image processor if it has one; `None` means: resize to the model's size, mean and std 0.5."""
    from transformers import AutoImageProcessor

    path = Path(model_id)
    if path.is_dir() and not (path / "preprocessor_config.json").is_file():
        return None
    try:
        return AutoImageProcessor.from_pretrained(model_id)
    except (OSError, ValueError, KeyError):
        return None


def preprocess(image: Image.Image, processor, config) -> tuple[torch.Tensor, np.ndarray]:
    """`pixel_values` [1, channels, h, w] for the model and the same picture as [h, w, 3] floats in [0, 1] for display
    (undoing the processor's normalisation, so the panels show exactly what the model saw)."""
    image = image.convert("L" if config.num_channels == 1 else "RGB")
    if processor is not None:
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].float()
        mean = getattr(processor, "image_mean", None)
        std = getattr(processor, "image_std", None)
    else:
        resized = image.resize((config.image_size, config.image_size), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.float32).reshape(config.image_size, config.image_size, -1) / 255.0
        pixel_values = (torch.from_numpy(array).permute(2, 0, 1)[None] - 0.5) / 0.5
        mean, std = 0.5, 0.5
    channels = pixel_values.shape[1]
    if mean is not None and std is not None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        display = pixel_values[0] * std + mean
    else:  # unknown normalisation: stretch each channel to [0, 1]
        flat = pixel_values[0].reshape(channels, -1)
        low, high = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
        display = (pixel_values[0] - low) / (high - low).clamp_min(1e-6)
    display = display.permute(1, 2, 0).clamp(0, 1).numpy()
    if channels == 1:
        display = np.repeat(display, 3, axis=-1)
    return pixel_values, display


def default_merge_r(num_patches: int, num_layers: int, share: float = 0.75) -> int:
    """A constant r that removes about `share` of the patches over all layers, lowered until bipartite matching (the
    stricter mode) can remove it in every layer."""
    merge_r = max(1, int(share * num_patches / num_layers))
    while merge_r > 0:
        num_tokens, feasible = 1 + num_patches, True
        for _ in range(num_layers):
            feasible &= merge_r <= max_merge_r(num_tokens, "bipartite")
            num_tokens -= merge_r
        if feasible:
            return merge_r
        merge_r -= 1
    return 0


def merging_on(config) -> bool:
    return config.merge_mode != "none" and any(config.merge_r_per_layer)


def describe_merging(config) -> str:
    return f"{config.merge_mode}, r={config.merge_r}" if merging_on(config) else "no merging"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw a Conformer's attention rollout and merge maps for one image into a PNG.",
    )
    parser.add_argument("--model", required=True, help="Model folder (saved with save_pretrained) or Hub id.")
    parser.add_argument(
        "--image",
        required=True,
        help="Image file, or `sample` for scikit-image's photograph of a cat (`sample:astronaut`, `sample:coffee`: "
        "other bundled photographs).",
    )
    parser.add_argument("--output", default="attention.png", help="PNG to write (default: %(default)s).")
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
        help="Also run the same weights with merge_mode bipartite and with submodular and draw both merge maps.",
    )
    parser.add_argument(
        "--merge-r",
        "--merge_r",
        dest="merge_r",
        type=int,
        default=None,
        help="r for --compare-modes (default: the model's own r, or, if it does not merge, one that removes about "
        "three quarters of the patches).",
    )
    return parser


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def display_image(display: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """The part of `display` [h, w, 3] that the patches cover, resized to whole cells of at least DISPLAY_SIZE pixels
    across, so that patch borders fall on pixel borders."""
    cell = max(1, math.ceil(DISPLAY_SIZE / max(grid)))
    covered = display[: grid[0] * patch_size, : grid[1] * patch_size]
    picture = Image.fromarray((covered * 255).round().astype(np.uint8))
    picture = picture.resize((grid[1] * cell, grid[0] * cell), Image.Resampling.BICUBIC)
    return np.asarray(picture, dtype=np.float32) / 255.0


def merge_panel(image: np.ndarray, trace: MergeTrace, layer: int, grid: tuple[int, int], mode: str, merge_r) -> Panel:
    """The merge map after `layer` of one traced run, painted over `image`."""
    labels = merge_map(trace.source_maps[layer + 1], grid)[0].numpy()
    num_patch_tokens = trace.token_sizes[layer + 1].shape[1] - 1
    border_width = max(1, image.shape[0] // (8 * grid[0]))
    title = f"{mode} merge map (r={merge_r})\n{num_patch_tokens} patch tokens after layer {layer}"
    return Panel(paint_merge_map(image, labels, border_width), title)


def render(args: argparse.Namespace) -> Path:
    """Everything the command does; bad input raises `VisualizeError`."""
    image = load_image(args.image)
    model = load_model(args.model)
    config = model.config
    num_layers = config.num_hidden_layers
    if not -num_layers <= args.layer < num_layers:
        raise VisualizeError(f"--layer {args.layer} is out of range: the model has layers 0..{num_layers - 1}")
    layer = args.layer % num_layers
    if args.merge_r is not None and args.merge_r < 0:
        raise VisualizeError(f"--merge-r must be >= 0, got {args.merge_r}")

    pixel_values, display = preprocess(image, load_image_processor(args.model), config)
    grid = (pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size)
    forward_kwargs = {}
    if tuple(pixel_values.shape[-2:]) != (config.image_size, config.image_size):
        forward_kwargs["interpolate_pos_encoding"] = True  # the processor's size is not the model's
    shown = display_image(display, grid, config.patch_size)

    trace = trace_model(model, pixel_values, **forward_kwargs)
    rollout = attention_rollout(trace.attentions[: layer + 1], trace.source_maps[: layer + 1])
    heat = rollout_map(rollout, grid)[0].numpy()
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)  # stretched to [0, 1] for display
    predicted = int(trace.logits[0].argmax())
    label = (config.id2label or {}).get(predicted, str(predicted))
    panels = [
        Panel(shown, f"{args.image} ({grid[0]}x{grid[1]} patches)\n{Path(args.model).name} predicts: {label}"),
        Panel(
            shown,
            f"attention rollout, layers 0-{layer}\n({describe_merging(config)}; min-max scaled)",
            heat=upsample_map(heat, shown.shape[:2]),
        ),
    ]

    if args.compare_modes:
        merge_r = args.merge_r
        if merge_r is None:
            merge_r = config.merge_r if merging_on(config) else default_merge_r(grid[0] * grid[1], num_layers)
        for mode in MERGE_MODES_COMPARED:
            if mode == config.merge_mode and merge_r == config.merge_r:
                mode_trace = trace
            else:
                mode_model = load_model(args.model, merge_mode=mode, merge_r=merge_r)
                mode_trace = trace_model(mode_model, pixel_values, **forward_kwargs)
            panels.append(merge_panel(shown, mode_trace, layer, grid, mode, merge_r))
    elif merging_on(config):
        panels.append(merge_panel(shown, trace, layer, grid, config.merge_mode, config.merge_r))
    return plot_panels(panels, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    args = build_parser().parse_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        path = render(args)
    except VisualizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A task where merging matters: cluttered digits. scikit-learn's 8x8 digits, scaled up to a random size (half to
three quarters of the image side), pasted in black or white (whichever shows) at a random place on random crops of
scikit-image's bundled photographs and textures (32 px in 4-px patches: 64 patch tokens, most of them background). A
small Conformer is trained on it without merging, then evaluated with every merge mode over a sweep of r (off the
shelf), and again after a short fine-tune with merging on (ToMe's second setting); images/s of every setting are
measured in one run, so that the modes can be compared at equal speed and not only at equal r.

    python benchmarks/merge_task.py             # 5-8 minutes on 2 CPU threads
    python benchmarks/merge_task.py --train_images 512 --test_images 128 --epochs 1 --r_values 4  # a quick check

Train and test use disjoint digit images (a fixed split of scikit-learn's 1797) and disjoint background pixels (each
photograph's left three quarters for training, the rest for testing). Writes `results/merge_task.{md,csv,png}`
(`--name` renames them).
"""

import argparse
import functools
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODES,
    REFERENCE_MODE,
    RESULTS_DIR,
    digits_config,
    on_frontier,
    schedule_for,
    time_models,
    with_merging,
)
from common import predict as predict_pixels  # noqa: E402
from common import train as common_train  # noqa: E402
from common import write_results as write_tables  # noqa: E402

from configuration_conformer import ConformerConfig  # noqa: E402
from conformer_vit.hub_folder import remote_code_files  # noqa: E402
from conformer_vit.sources import load_model  # noqa: E402
from conformer_vit.sweep import (  # noqa: E402
    UNMERGED,
    MergeSetting,
    accuracy,
    mean_kl,
    predict_settings,
    quartiles,
    setting_models,
    time_interleaved,
)
from modeling_conformer import ConformerForImageClassification, ConformerModel  # noqa: E402
from token_merging import (  # noqa: E402
    MATCHING_FUNCTIONS,
    keep_rate_for_token_layers,
    merge_schedule,
    merge_wavg,
    staged_schedule,
    token_layers,
)

# Photographs and textures that scikit-image ships inside its wheel (no download).
BACKGROUNDS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text",
)  # fmt: skip
TRAIN_FRACTION = 0.75  # of each background's width (left part) and of the digit images
DIGIT_SPLIT_SEED = 0  # the train/test split of the digit images does not depend on --seed


# --------------------------------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------------------------------


def load_backgrounds() -> list[torch.Tensor]:
    """Each bundled image as float RGB in [0, 1], [3, height, width] (grey ones repeated, alpha dropped)."""
    import skimage.data

    backgrounds = []
    for name in BACKGROUNDS:
        image = torch.from_numpy(np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0)
        image = image[..., None].expand(-1, -1, 3) if image.ndim == 2 else image[..., :3]
        backgrounds.append(image.permute(2, 0, 1).contiguous())
    return backgrounds


def background_columns(width: int, split: str) -> tuple[int, int]:
    """The columns [start, stop) of a background that `split` may crop from: train and test never share a pixel."""
    boundary = int(width * TRAIN_FRACTION)
    return (0, boundary) if split == "train" else (boundary, width)


def digit_pool(split: str, num_digits: int = 1797) -> np.ndarray:
    """Indices of scikit-learn's digit images that `split` draws from (a fixed permutation, cut at TRAIN_FRACTION)."""
    order = np.random.default_rng(DIGIT_SPLIT_SEED).permutation(num_digits)
    cut = int(num_digits * TRAIN_FRACTION)
    return order[:cut] if split == "train" else order[cut:]


def sample_layout(rng: np.random.Generator, background_shapes, pool, split: str, image_size: int) -> dict:
    """Where one image comes from: a digit, a square background crop (inside the split's columns) and where and how
    big the digit goes."""
    background = int(rng.integers(len(background_shapes)))
    height, width = background_shapes[background]
    start, stop = background_columns(width, split)
    largest = min(height, stop - start, 3 * image_size)
    crop_side = int(rng.integers(min(image_size // 2, largest), largest + 1))
    digit_side = int(rng.integers(image_size // 2, 3 * image_size // 4 + 1))
    crop_top = int(rng.integers(height - crop_side + 1))
    crop_left = start + int(rng.integers(stop - start - crop_side + 1))
    box_top, box_left = (int(value) for value in rng.integers(image_size - digit_side + 1, size=2))
    return {
        "digit": int(rng.choice(pool)),
        "background": background,
        "crop": (crop_top, crop_left, crop_side),
        "box": (box_top, box_left, digit_side),
    }  # fmt: skip


def background_crop(background: torch.Tensor, crop, image_size: int) -> torch.Tensor:
    top, left, side = crop
    patch = background[None, :, top : top + side, left : left + side]
    return F.interpolate(patch, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)[0]


def paste_digit(canvas: torch.Tensor, digit: np.ndarray, box, contrast: float = 1.0, ink=(0.0, 0.0, 0.0)):
    """Blend `digit` (8x8, 0-16) into `canvas` [3, size, size] inside `box` as alpha times `contrast`; the ink as given
    on light backgrounds and mirrored (1 - ink) on dark ones, so that every digit stays visible: black or white by
    default."""
    top, left, side = box
    alpha = torch.from_numpy(np.asarray(digit, dtype=np.float32) / 16.0)[None, None]
    alpha = F.interpolate(alpha, size=(side, side), mode="bilinear", align_corners=False)[0].clamp(0, 1) * contrast
    region = canvas[:, top : top + side, left : left + side]
    ink = torch.tensor(ink).view(3, 1, 1)
    ink = ink if region.mean() > 0.5 else 1 - ink
    canvas = canvas.clone()
    canvas[:, top : top + side, left : left + side] = region * (1 - alpha) + ink * alpha
    return canvas


def cluttered_digits(num_images: int, split: str, image_size: int = 64, seed: int = 0, backgrounds=None) -> dict:
    """`num_images` cluttered digits of `split` ("train" or "test"), the same for the same arguments: `images` uint8
    [N, 3, size, size], `labels` [N], and each image's `layouts` (digit index, background, crop, digit box)."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    digits = load_digits()
    backgrounds = load_backgrounds() if backgrounds is None else backgrounds
    shapes = [tuple(background.shape[1:]) for background in backgrounds]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    layouts = [sample_layout(rng, shapes, digit_pool(split), split, image_size) for _ in range(num_images)]
    images = torch.empty(num_images, 3, image_size, image_size)
    for i, layout in enumerate(layouts):
        canvas = background_crop(backgrounds[layout["background"]], layout["crop"], image_size)
        images[i] = paste_digit(canvas, digits.images[layout["digit"]], layout["box"])
    images = images.mul_(255).round_().clamp_(0, 255).to(torch.uint8)  # one call: per-image calls cost more here
    labels = torch.tensor([int(digits.target[layout["digit"]]) for layout in layouts])
    return {"images": images, "labels": labels, "layouts": layouts}


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the model's input range [-1, 1] (ViT's mean 0.5, std 0.5)."""
    return images.float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------------------------------
# The model, its training and its evaluation
# --------------------------------------------------------------------------------------------------------------------


def task_config(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    image_size: int,
    patch_size: int = 8,
    init_std: float = 0.1,
    classifier: str = "token",
):
    """The digits model's config (10 classes, no merging) in another shape. ViT's init std 0.02 suits width 768; a
    model of width 64 drawn so small stays near chance, hence 0.1 by default."""
    return digits_config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=init_std,
        classifier=classifier,
    )


def train(model, images, labels, epochs: int, lr: float, seed: int):
    """`common.train` (AdamW, warm-up then cosine) on the images as pixel values, without its random shifts: the digit
    already sits at a random place."""
    return common_train(model, to_pixel_values(images), labels, epochs, lr, seed, max_shift=0)


def predict(model, images) -> torch.Tensor:
    return predict_pixels(model, to_pixel_values(images))[0]


RECIPE_FILE = "merge_task_training.json"  # how the saved model was trained, for --base_model
SAVED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", RECIPE_FILE, *remote_code_files())
RECIPE = ("train_images", "image_size", "patch_size", "hidden_size", "layers", "heads", "epochs", "lr", "init_std")
RECIPE += ("classifier", "seed")


def written_by_save_model(path: Path) -> bool:
    """Whether `save_model` writes a file of this name (so that saving again may replace it)."""
    return path.is_file() and (
        path.name in SAVED_FILES or re.fullmatch(r"test_\d+_digit_\d\.png", path.name) is not None
    )


def save_model(model, test: dict, folder: Path, recipe: dict, num_images: int = 6):
    """The model (with ViT's image processor at its size, which computes `to_pixel_values`), its training `recipe`
    (`RECIPE_FILE`, read by `--base_model`) and the first test images as PNG files, for
    `visualize_attention.py --model FOLDER --image FOLDER/test_0_digit_7.png ...`."""
    from PIL import Image
    from transformers import ViTImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    size = model.config.image_size
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    for i, (image, label) in enumerate(zip(test["images"][:num_images], test["labels"].tolist())):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"test_{i}_digit_{label}.png")


def compare(logits, labels, reference_logits) -> dict:
    """Accuracy and mean KL(reference || model), the reference being the unmerged model (`conformer_vit.sweep`'s)."""
    return {"accuracy %": 100 * accuracy(logits, labels), "KL": mean_kl(reference_logits, logits)}


# --------------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------------


def schedules(r_values, num_tokens: int, num_layers: int, staged_layers: list[int] | None = None) -> dict:
    """Label -> tokens merged per layer, the same for every mode (equal r, equal token counts): ToMe's constant r
    (label `"r"`), and with `staged_layers` ATC's staged reduction at the same token-layers (label `"staged r"`, its
    keep rate computed by `keep_rate_for_token_layers`, then clamped for every mode as the constant one is)."""
    schedule_of = {}
    for r in r_values:
        constant = schedule_for(r, num_tokens, num_layers)
        schedule_of[str(r)] = constant
        if staged_layers:
            rate = keep_rate_for_token_layers(token_layers(constant, num_tokens), num_tokens, num_layers, staged_layers)
            staged = staged_schedule(num_tokens, num_layers, staged_layers, rate)
            schedule_of[f"staged {r}"] = merge_schedule(staged, num_tokens, num_layers, MODES)
    return schedule_of


def settings_of(schedule_of: dict) -> dict:
    """(mode, label) -> the `conformer_vit.sweep.MergeSetting` running that schedule; (None, 0): the unmerged model."""
    settings = {(None, 0): UNMERGED}
    settings |= {
        (mode, r): MergeSetting(mode, tuple(schedule)) for mode in MODES for r, schedule in schedule_of.items()
    }
    return settings


def models_by_key(base, schedule_of: dict) -> dict:
    """`settings_of`'s keys -> `base` under that setting (every model shares `base`'s weights)."""
    settings = settings_of(schedule_of)
    built = setting_models(base, settings.values())
    return {key: built[setting] for key, setting in settings.items()}


def measure_speed(models: dict, inputs, repeats: int, keys=None) -> dict:
    """The `conformer_vit.sweep.Timing` of each model of `keys` (by default all: the unmerged model, key (None, 0), and
    every (mode, r)), timed in one interleaved run. A run of two lasts a fraction of a second a round, so the two
    timings of a ratio are taken closer together than in the run of every setting."""
    keys = list(models) if keys is None else keys
    return time_interleaved({key: models[key] for key in keys}, inputs, repeats, warmup=1, calls=1)


def pooled_speed(runs: list[dict]) -> dict:
    """(mode, r) -> (images/s, spread %) over separate timing runs: the median of all their rounds, and the larger of
    the rounds' interquartile range and the range of the runs' medians, in % of that median."""
    speed = {}
    for key in runs[0]:
        samples = [value for run in runs for value in run[key].samples]
        run_medians = [statistics.median(run[key].samples) for run in runs]
        lower, median, upper = quartiles(samples)
        spread = max(upper - lower, max(run_medians) - min(run_medians))
        speed[key] = (median, 100 * spread / median)
    return speed


def result_row(mode, r, schedule, num_tokens, logits, test, reference_logits) -> dict:
    """One setting's quality; `add_speed` adds its speed once every timing run is done."""
    return {
        "mode": mode or "none",
        "r": r,
        "schedule": "/".join(map(str, schedule)) if any(schedule) else "-",
        "token-layers": token_layers(schedule, num_tokens),
        "tokens left": num_tokens - sum(schedule),
        **compare(logits, test["labels"], reference_logits),
    }


def timing_key(row: dict) -> tuple:
    """The key of a row's setting in `measure_speed`'s timings."""
    return (None, 0) if row["mode"] == "none" else (row["mode"], row["r"])


def slower_beyond_noise(runs: list[dict], key, than) -> bool:
    """Whether setting `key` ran slower than `than` in every timing run by more than the rounds' noise: the upper
    quartile of its per-round speed ratio to `than` below 1. The rounds are interleaved, so each ratio pairs two
    timings taken moments apart, and a change of machine load falls on both."""
    return all(quartiles(round_ratios(run, key, than))[2] < 1 for run in runs)


def round_ratios(run: dict, key, than) -> list[float]:
    """images/s of `key` over `than`'s in each round of a timing run."""
    return [mine / theirs for mine, theirs in zip(run[key].samples, run[than].samples)]


def doubtful_points(rows: list[dict], as_fast) -> list[tuple[dict, dict]]:
    """(bipartite point, row) pairs whose timing decides a row's equal-speed columns: for each merged row of another
    mode, the bipartite points slower at the median that `as_fast` still counts as fast as the row, and that would
    change its columns (higher accuracy or lower KL than every bipartite point at least as fast at the median), best
    KL first."""
    points = [row for row in rows if row["mode"] == REFERENCE_MODE]
    pairs = []
    for row in rows:
        if row["mode"] in ("none", REFERENCE_MODE):
            continue
        counted = [point for point in points if as_fast(point, row)]
        surely = [point for point in counted if point["images/s"] >= row["images/s"]]
        doubtful = [point for point in counted if point["images/s"] < row["images/s"]]
        best_accuracy = max((point["accuracy %"] for point in surely), default=-math.inf)
        best_kl = min((point["KL"] for point in surely), default=math.inf)
        for point in sorted(doubtful, key=lambda point: point["KL"]):
            if point["accuracy %"] > best_accuracy or point["KL"] < best_kl:
                pairs.append((point, row))
    return pairs


def confirm_head_to_head(tables: dict, as_fast, time_pair) -> tuple[dict, list[dict]]:
    """Times each of `doubtful_points`' pairs alone (`time_pair(point key, row key)` returns runs of `measure_speed`
    on just the two) and rules a point slower when `slower_beyond_noise` says so there. Returns
    `{(point key, row key): slower}` for every pair timed, once per pair across the tables, and one report row each."""
    verdicts, report = {}, []
    for rows in tables.values():
        for point, row in doubtful_points(rows, as_fast):
            keys = (timing_key(point), timing_key(row))
            if keys in verdicts:
                continue
            runs = time_pair(*keys)
            verdicts[keys] = slower_beyond_noise(runs, *keys)
            ratios = [quartiles(round_ratios(run, *keys)) for run in runs]
            report.append({
                "setting": f"{row['mode']} {row['r']}",
                f"{REFERENCE_MODE} point": str(point["r"]),
                "speed ratio per round, quartiles of each run": "; ".join(
                    "/".join(f"{value:.2f}" for value in run) for run in ratios
                ),
                "verdict": "slower" if verdicts[keys] else "as fast",
            })  # fmt: skip
    return verdicts, report


def overruled(as_fast, verdicts: dict):
    """`as_fast`, except for the pairs that `confirm_head_to_head` ruled slower."""

    def as_fast_after_head_to_head(point: dict, row: dict) -> bool:
        return as_fast(point, row) and not verdicts.get((timing_key(point), timing_key(row)), False)

    return as_fast_after_head_to_head


def add_speed(rows: list[dict], speed: dict) -> list[dict]:
    """images/s, spread % and speed-up over the unmerged model (`pooled_speed`'s) beside each row."""
    for row in rows:
        key = timing_key(row)
        row["images/s"], row["spread %"] = speed[key]
        row["speed-up"] = row["images/s"] / speed[(None, 0)][0]
    return rows


def off_the_shelf(models: dict, schedule_of: dict, test, num_tokens: int, batch_size: int = 256) -> list[dict]:
    """The trained model evaluated with every mode and r (`models_by_key`'s), weights unchanged
    (`conformer_vit.sweep`'s evaluation: every setting shares the weights and reads each batch once)."""
    batches = (
        {"pixel_values": to_pixel_values(test["images"][start : start + batch_size]),
         "labels": test["labels"][start : start + batch_size]}
        for start in range(0, len(test["images"]), batch_size)
    )  # fmt: skip
    logits, _, _, _ = predict_settings(models, batches, progress=False)
    reference_logits = logits[(None, 0)]
    unmerged = [0] * models[(None, 0)].config.num_hidden_layers
    rows = []
    for (mode, r), setting_logits in logits.items():
        schedule = schedule_of[r] if mode else unmerged
        rows.append(result_row(mode, r, schedule, num_tokens, setting_logits, test, reference_logits))
    return rows


def fine_tuned(base, schedule_of: dict, train_set, test, num_tokens: int, epochs: int, lr: float, seed: int):
    """Each mode and r fine-tuned with merging on, from the same weights, on the same batches (ToMe's second
    setting); KL is still against the unmerged base model."""
    reference_logits = predict(base, test["images"])
    unmerged = [0] * base.config.num_hidden_layers
    rows = [result_row(None, 0, unmerged, num_tokens, reference_logits, test, reference_logits)]
    for mode in MODES:
        for r, schedule in schedule_of.items():
            print(f"Fine-tuning with {mode} merging, r={r} ({'/'.join(map(str, schedule))})", flush=True)
            model = train(with_merging(base, mode, schedule), *train_set, epochs=epochs, lr=lr, seed=seed + 1)
            rows.append(
                result_row(mode, r, schedule, num_tokens, predict(model, test["images"]), test, reference_logits)
            )
    return rows


KL_AT_EQUAL_SPEED = f"KL over {REFERENCE_MODE}'s at equal speed"
HEAD_TO_HEAD_NOTE = (
    "; where such a point is slower at the median and would change a row's columns, the two are timed again alone, "
    "interleaved, in as many runs, and that rule applied to those rounds decides"
)


def add_equal_speed_columns(rows: list[dict], as_fast=None) -> list[dict]:
    """Beside each row, the best the reference mode does with any of its schedules at the same speed or faster: its
    highest accuracy among its points that are `as_fast(point, row)` ("-" where none is), the difference, and the
    row's KL over the reference's lowest KL there (below 1: the predictions move less than bipartite's at equal
    speed). By default a point is as fast when its median images/s is at least the row's; `main` passes
    `not slower_beyond_noise`, so that a gain holds outside the noise of the timings. The unmerged model is not a
    reference point: on a small model it can run faster than bipartite."""
    as_fast = as_fast or (lambda point, row: point["images/s"] >= row["images/s"])
    points = [row for row in rows if row["mode"] == REFERENCE_MODE]
    for row in rows:
        as_fast_points = [point for point in points if as_fast(point, row)]
        best_accuracy = max((point["accuracy %"] for point in as_fast_points), default=math.nan)
        best_kl = min((point["KL"] for point in as_fast_points), default=math.nan)
        row[f"{REFERENCE_MODE} at same images/s"] = best_accuracy
        row["gain at equal speed"] = row["accuracy %"] - best_accuracy
        row[KL_AT_EQUAL_SPEED] = row["KL"] / best_kl if best_kl > 0 else math.nan
    return rows


def add_frontier_columns(rows: list[dict]) -> list[dict]:
    """Whether each (mode, schedule) lies on the accuracy and on the KL frontier of its table: no other point, the
    unmerged model included, is at least as fast and at least as good, and better in one of them."""
    speeds = [row["images/s"] for row in rows]
    for metric, cost in (("accuracy", lambda row: -row["accuracy %"]), ("KL", lambda row: row["KL"])):
        for row, kept in zip(rows, on_frontier(list(zip(speeds, map(cost, rows))))):
            row[f"frontier {metric}"] = "yes" if kept else "no"
    return rows


def merge_once(mode: str, keys: torch.Tensor, merge_r: int, hidden: torch.Tensor, _inputs=None):
    """One layer's merge: `mode`'s matching on the keys averaged over heads, then the size-weighted means."""
    return merge_wavg(MATCHING_FUNCTIONS[mode](keys, merge_r, None)[0], hidden)


@torch.inference_mode()
def merge_share(config, merge_r: int, batch: int, repeats: int) -> dict:
    """Mode -> the time of one merge as a share (%) of one layer without merging plus that merge, on random tokens of
    `config`'s shape, all timed interleaved."""
    single = ConformerConfig(**{**config.to_dict(), "num_hidden_layers": 1, "merge_mode": "none", "merge_r": 0})
    layer = ConformerModel(single).layers[0].eval()  # built by the model: its attention implementation is sdpa's
    tokens = config.num_prefix_tokens + config.num_patches
    hidden = torch.randn(batch, tokens, config.hidden_size)
    keys = torch.randn(batch, tokens, config.hidden_size // config.num_attention_heads)
    calls = {"layer": layer} | {mode: functools.partial(merge_once, mode, keys, merge_r, hidden) for mode in MODES}
    timed = time_models(calls, hidden, repeats, warmup=2)
    layer_time = 1 / timed["layer"][0]
    return {mode: 100 * (1 / timed[mode][0]) / (layer_time + 1 / timed[mode][0]) for mode in MODES}


def merge_share_rows(shapes: dict, batch: int, repeats: int) -> list[dict]:
    """One row per model shape and mode: the merge's share of the layer time (`merge_share`)."""
    rows = []
    for name, (config, merge_r) in shapes.items():
        for mode, share in merge_share(config, merge_r, batch, repeats).items():
            rows.append({"shape": name, "mode": mode, "merge share %": share})
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------------------------

COLUMNS = ["mode", "r", "schedule", "token-layers", "tokens left", "accuracy %", "KL", "images/s", "spread %"]
COLUMNS += ["speed-up"]
COLUMNS += [f"{REFERENCE_MODE} at same images/s", "gain at equal speed", KL_AT_EQUAL_SPEED]
COLUMNS += ["frontier accuracy", "frontier KL"]
DIGITS = {"accuracy %": 1, "KL": ".2e", "images/s": 0, "spread %": 1, "speed-up": 2}
DIGITS |= {f"{REFERENCE_MODE} at same images/s": 1, "gain at equal speed": 1, KL_AT_EQUAL_SPEED: 2}


def write_results(results_dir: Path, name: str, settings: str, tables: dict) -> str:
    """`{name}.md` (the settings and one table per entry of `tables`), `{name}.csv` (all rows, a `table` column
    naming theirs) and `{name}.png`; returns the Markdown."""
    sections = [
        (
            heading,
            rows,
            COLUMNS if "mode" in rows[0] and "r" in rows[0] else list(rows[0]),
            DIGITS | {"merge share %": 1},
        )
        for heading, rows in tables.items()
    ]
    text = write_tables(name, "Merging on cluttered digits", settings, sections, results_dir=results_dir)
    plot(results_dir / f"{name}.png", tables)
    return text


def plot(path: Path, tables: dict):
    """Accuracy (top) and KL (bottom, log) against measured images/s, one column per table, one line per mode and
    schedule kind (the unmerged model on each); points on the frontier ringed in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {heading: rows for heading, rows in tables.items() if "images/s" in rows[0]}  # the accuracy tables
    figure, axes = plt.subplots(2, len(tables), figsize=(6 * len(tables), 9), sharex="col", squeeze=False)
    for column, (heading, rows) in enumerate(tables.items()):
        unmerged = [row for row in rows if row["mode"] == "none"]
        for axis, metric in zip(axes[:, column], ("accuracy %", "KL")):
            for mode in MODES:
                for staged in (False, True):  # one line per schedule kind, staged points as squares
                    points = unmerged + [
                        row for row in rows if row["mode"] == mode and str(row["r"]).startswith("staged") == staged
                    ]
                    if len(points) == 1:
                        continue
                    points = points[1:] if metric == "KL" else points  # KL 0 has no place on a log axis
                    axis.plot([p["images/s"] for p in points], [p[metric] for p in points], "s--" if staged else "o-",
                              label=f"{mode}{', staged' * staged}", markersize=4)  # fmt: skip
            frontier = [row for row in rows if row[f"frontier {metric.split()[0]}"] == "yes" and row[metric] > 0]
            axis.plot([p["images/s"] for p in frontier], [p[metric] for p in frontier], "o", markersize=10,
                      markerfacecolor="none", markeredgecolor="black", label="on the frontier")  # fmt: skip
            axis.set(
                title=heading if metric != "KL" else None, ylabel=metric, yscale="log" if metric == "KL" else "linear"
            )
            axis.grid(alpha=0.3)
        axes[1][column].set_xlabel("images/s (measured)")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--train_images", type=int, default=20000, help="training images (digits drawn from the train digit pool)")
    add("--test_images", type=int, default=2000, help="test images (disjoint digits and background pixels)")
    add("--image_size", type=int, default=32, help="image side in pixels (a multiple of --patch_size)")
    add("--patch_size", type=int, default=4, help="patch side in pixels")
    add("--hidden_size", type=int, default=64, help="model width")
    add("--layers", type=int, default=4, help="transformer layers")
    add("--heads", type=int, default=4, help="attention heads")
    add("--epochs", type=int, default=8, help="epochs of training without merging")
    add("--lr", type=float, default=1e-3, help="peak learning rate of the training without merging")
    add("--init_std", type=float, default=0.1, help="std of the initial weights (ViT's is 0.02)")
    add("--classifier", choices=("token", "gap"), default="token", help="class token or mean of the tokens")
    add(
        "--base_model", type=Path,
        help="a folder written by --save_model: its model, and the data of its recipe, instead of training one "
        "(the model and data arguments above are then read from the folder)",
    )  # fmt: skip
    add("--r_values", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12], help="r of the off-the-shelf sweep")
    add("--finetune_r", type=int, nargs="*", default=[8], help="r values fine-tuned with merging on, every mode")
    add("--finetune_epochs", type=int, default=1, help="epochs of each fine-tune with merging on")
    add("--finetune_lr", type=float, default=2e-4, help="peak learning rate of the fine-tunes")
    add("--finetune_images", type=int, help="fine-tune on the first this many training images (default: all)")
    add(
        "--staged_layers", type=int, nargs="*", default=[],
        help="also ATC's staged schedule merging in these layers (0-based), at each r's token-layers",
    )  # fmt: skip
    add("--share_batch", type=int, default=8, help="batch of the merge's share of the layer time (0: not measured)")
    add("--timing_batch", type=int, default=64, help="batch size of the images/s measurement")
    add("--timing_repeats", type=int, default=9, help="rounds per timing run (the median is reported)")
    add("--timing_runs", type=int, default=2, help="separate timing runs (one before the evaluation, the rest last)")
    add(
        "--head_to_head", action=argparse.BooleanOptionalAction, default=True,
        help="time each bipartite point that is slower at the median but within the noise alone against the setting",
    )  # fmt: skip
    add("--threads", type=int, default=2, help="torch threads")
    add("--seed", type=int, default=0, help="seed of the data and of training")
    add("--results_dir", type=Path, default=RESULTS_DIR, help="folder of the results")
    add("--name", default="merge_task", help="file name of the results: NAME.md, .csv, .png")
    add("--save_model", type=Path, help="also save the model trained without merging, and 6 test images, here")
    args = parser.parse_args(argv)
    if args.base_model:
        recipe_path = args.base_model / RECIPE_FILE
        if not recipe_path.is_file():
            parser.error(
                f"--base_model {args.base_model} holds no {RECIPE_FILE}: name a folder written by --save_model"
            )
        try:
            recipe = json.loads(recipe_path.read_text())
            vars(args).update({name: type(getattr(args, name))(recipe[name]) for name in RECIPE})
            vars(args)["training_s"] = float(recipe["training_s"])
        except (ValueError, KeyError, TypeError) as error:
            parser.error(f"--base_model {args.base_model}: {RECIPE_FILE} is not a recipe of this script ({error!r})")
    folder = args.save_model
    if folder and folder.exists() and not (folder.is_dir() and all(map(written_by_save_model, folder.iterdir()))):
        parser.error(f"--save_model {folder} is a file or holds files this script does not write: name a new folder")
    if not re.fullmatch(r"[\w.-]+", args.name):
        parser.error(f"--name {args.name!r} must be a plain file name (letters, digits, _ . -)")
    if args.image_size % args.patch_size or min(args.train_images, args.test_images, args.epochs) < 1:
        parser.error("--image_size must be a multiple of --patch_size; images and epochs at least 1")
    if any(not 0 <= layer < args.layers for layer in args.staged_layers):
        parser.error(f"--staged_layers must be layers of 0..{args.layers - 1}")
    if min(args.r_values) < 1 or not set(args.finetune_r) <= set(args.r_values):
        parser.error("--r_values must be at least 1, and --finetune_r a subset of them (their speed is measured)")
    if min(args.timing_batch, args.timing_repeats, args.timing_runs, args.threads, args.finetune_epochs) < 1:
        parser.error("--timing_batch, --timing_repeats, --timing_runs, --threads, --finetune_epochs must be at least 1")
    return args


def base_model(args, train_set: dict, test: dict):
    """The model trained without merging: `--base_model`'s, or trained here (and saved with `--save_model`)."""
    from transformers import set_seed

    if args.base_model:
        return load_model(args.base_model).eval()
    print(f"Training without merging: {args.epochs} epochs on {args.train_images} images", flush=True)
    set_seed(args.seed)
    config = task_config(
        args.hidden_size, args.layers, args.heads, args.image_size, args.patch_size, args.init_std, args.classifier
    )
    model, start = ConformerForImageClassification(config), time.perf_counter()
    train(model, train_set["images"], train_set["labels"], args.epochs, args.lr, args.seed)
    args.training_s = time.perf_counter() - start
    if args.save_model:
        recipe = {name: getattr(args, name) for name in (*RECIPE, "training_s")}
        save_model(model, test, args.save_model, recipe)
    return model


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    backgrounds = load_backgrounds()
    train_set = cluttered_digits(args.train_images, "train", args.image_size, args.seed, backgrounds)
    test = cluttered_digits(args.test_images, "test", args.image_size, args.seed, backgrounds)
    base = base_model(args, train_set, test)
    num_tokens = base.config.num_prefix_tokens + base.config.num_patches
    schedule_of = schedules(args.r_values, num_tokens, args.layers, args.staged_layers)
    models = models_by_key(base, schedule_of)
    timing_inputs = to_pixel_values(test["images"][: args.timing_batch])
    timing_runs = [measure_speed(models, timing_inputs, args.timing_repeats)]
    tables = {"Off the shelf": off_the_shelf(models, schedule_of, test, num_tokens)}
    if args.finetune_r:
        labels = [str(r) for r in args.finetune_r] + [f"staged {r}" for r in args.finetune_r if args.staged_layers]
        finetune_schedules = {label: schedule_of[label] for label in labels}
        subset = slice(0, args.finetune_images)
        rows = fine_tuned(
            base, finetune_schedules, (train_set["images"][subset], train_set["labels"][subset]), test, num_tokens,
            args.finetune_epochs, args.finetune_lr, args.seed,
        )  # fmt: skip
        tables[f"After {args.finetune_epochs} epoch(s) of fine-tuning with merging on"] = rows
    for _ in range(args.timing_runs - 1):
        timing_runs.append(measure_speed(models, timing_inputs, args.timing_repeats))
    speed = pooled_speed(timing_runs)

    def as_fast_in_the_run(point: dict, row: dict) -> bool:
        return not slower_beyond_noise(timing_runs, timing_key(point), timing_key(row))

    tables = {heading: add_speed(rows, speed) for heading, rows in tables.items()}
    verdicts, head_to_head = {}, []
    if args.head_to_head:

        def time_pair(*keys) -> list[dict]:
            return [measure_speed(models, timing_inputs, args.timing_repeats, keys) for _ in range(args.timing_runs)]

        print("Timing doubtful bipartite points head to head", flush=True)
        verdicts, head_to_head = confirm_head_to_head(tables, as_fast_in_the_run, time_pair)

    as_fast = overruled(as_fast_in_the_run, verdicts)
    tables = {heading: add_frontier_columns(add_equal_speed_columns(rows, as_fast)) for heading, rows in tables.items()}
    source = f" (loaded from {args.base_model})" if args.base_model else ""
    settings = (
        f"{args.train_images} training / {args.test_images} test images of {args.image_size} px in "
        f"{args.patch_size}-px patches ({num_tokens} tokens); Conformer of width {args.hidden_size}, "
        f"{args.layers} layers, {args.heads} heads, {args.classifier} classifier, trained {args.epochs} epochs "
        f"without merging in {args.training_s / 60:.0f} min{source} (AdamW, lr {args.lr}, batch 32, weights drawn "
        f"with std {args.init_std}); fine-tunes {args.finetune_epochs} epoch(s) at lr {args.finetune_lr} on "
        f"{args.finetune_images or args.train_images} images"
        f"{f'; staged schedules merge in layers {args.staged_layers}' if args.staged_layers else ''}. KL is "
        f"KL(unmerged || merged) on the test set. images/s: median of {args.timing_runs} separate timing run(s) of "
        f"{args.timing_repeats} round-robin rounds at batch {args.timing_batch} (spread: the larger of the rounds' "
        f"interquartile range and the runs' range), torch {torch.__version__}, {args.threads} thread(s), seed "
        f"{args.seed}; a bipartite point counts as at least as fast as a row unless, in every timing run, the upper "
        f"quartile of its per-round speed ratio to the row is below 1"
        f"{HEAD_TO_HEAD_NOTE if args.head_to_head else ''}. This run took "
        f"{time.perf_counter() - start:.0f} s."
    )
    if head_to_head:
        tables["Bipartite points timed alone against a setting"] = head_to_head
    if args.share_batch:
        first_r = args.r_values[0]
        shapes = {
            f"this model ({num_tokens} tokens, width {args.hidden_size}), r={first_r}": (base.config, first_r),
            "ViT-S/16 at 224 px (197 tokens, width 384), r=13": (ConformerConfig.from_preset("ViT-S_16"), 13),
            "ViT-B/16 at 224 px (197 tokens, width 768), r=16": (ConformerConfig.from_preset("ViT-B_16"), 16),
        }
        tables["Merge cost per call, as a share of the layer's time"] = merge_share_rows(
            shapes, args.share_batch, args.timing_repeats
        )
    text = write_results(args.results_dir, args.name, settings, tables)
    print(text)
    return text


if __name__ == "__main__":
    main()

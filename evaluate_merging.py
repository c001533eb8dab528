"""How much faster can a model run with token merging, and what does it cost? Evaluates and times a model unmerged
and under every merge mode and r asked for, on your data, and writes a table, the raw numbers and one plot.

    python evaluate_merging.py --model_name_or_path runs/demo --dataset_name digits --output_dir runs/merging
    python evaluate_merging.py --model_name_or_path google/vit-base-patch16-224 --dataset_name imagenet-1k \
        --max_eval_samples 2000 --merge_modes bipartite ward --merge_r 8 13 --device cuda --dtype float16 \
        --pick max_drop=0.5 --save_folder vit-b16-merged --output_dir runs/vit-b16-merging

The model is anything `conformer_vit.sources.load_model` takes (a Conformer folder or Hub id, a model of
transformers' ViT family, a Google `.npz`); the data anything `run_image_classification.py` takes. Writes
`merging.{md,csv,json,png}` into --output_dir; with --pick, names the setting to run and, with --save_folder, writes
the model with that setting as a Hub-ready folder whose card carries the measurements. The sweep itself is
`conformer_vit.sweep`.
"""

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
from datasets import DatasetDict

from conformer_vit.cards import render_merging_card
from conformer_vit.data import (
    DataError,
    TransformedDataset,
    build_transforms,
    collate_fn,
    load_digits_dataset,
    load_image_dataset,
    load_named_dataset,
    prepare_splits,
)
from conformer_vit.hub_folder import is_hub_folder, write_folder
from conformer_vit.output_paths import check_output
from conformer_vit.sources import load_image_processor, load_model, source_license
from conformer_vit.sweep import (
    FLOP_FORMULA,
    SettingResult,
    build_settings,
    check_settings,
    default_r_values,
    format_merge_r,
    pick_setting,
    sweep,
)
from token_merging import MATCHING_FUNCTIONS, parse_merge_r, parse_staged

RESULT_FILES = ("merging.md", "merging.csv", "merging.json", "merging.png")
PICK_RULES = {  # what `--pick RULE=VALUE` chooses, as the card says it
    "max_drop": "the fastest setting within {value} accuracy points of the unmerged model",
    "speedup": "the most accurate setting at least {value}x as fast as the unmerged model",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EvaluationError(ValueError):
    """Bad input, with a message that says what is wrong; `main` prints it as one `error:` line and exits with 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise `EvaluationError`, so that they end as every other bad input does."""

    def error(self, message):
        raise EvaluationError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--model_name_or_path",
        required=True,
        help="A Conformer folder or Hub id, a ViT-family model, or a Google .npz.",
    )
    add("--dataset_name", help="A Hub dataset id, a save_to_disk folder, or `digits` (the default).")
    add("--dataset_config_name", help="The Hub dataset's configuration name.")
    add("--validation_dir", help="Instead of --dataset_name: a folder of images, one sub-folder per class.")
    add("--image_column_name", help="The image column. Default: image, img or pixel_values, or the Image feature.")
    add("--label_column_name", help="The label column. Default: label, labels or fine_label, or the ClassLabel.")
    add(
        "--eval_split",
        help="The split to evaluate on. Default: the one the training script evaluates on (validation, valid, val or "
        "test, else a held-out 15%% of train drawn with --seed).",
    )
    add("--max_eval_samples", type=int, help="Evaluate on this many images (a fixed random subset drawn with --seed).")
    add("--seed", type=int, default=42, help="Seed of the subset and held-out split (the training script's default).")
    add("--output_dir", required=True, help="Folder for merging.md, .csv, .json and .png.")
    add(
        "--merge_modes",
        nargs="+",
        choices=tuple(MATCHING_FUNCTIONS),
        default=list(MATCHING_FUNCTIONS),
        help="Merge modes to compare with the unmerged model. Default: all.",
    )
    add(
        "--merge_r",
        nargs="+",
        help="Tokens merged per layer, one value per setting: an int, or one int per layer (8,8,4,4). Default: a "
        "quarter, half and all of the largest r every mode can merge in every layer.",
    )
    add("--decreasing", action="store_true", help="Also ToMe's decreasing schedule of each int --merge_r.")
    add("--merge_layers", help="Also ATC's staged reduction in these layers (0-based, comma-separated, e.g. 3,6,9).")
    add("--keep_rates", nargs="+", type=float, default=[], help="With --merge_layers: the shares of patch tokens kept.")
    add("--batch_size", type=int, default=32, help="Images per forward pass, in evaluation and timing.")
    add("--timing_repeats", type=int, default=10, help="Timing rounds after warm-up; images/s is their median.")
    add("--device", choices=("cpu", "cuda"), help="Where to run. Default: cuda when available.")
    add("--dtype", choices=tuple(DTYPES), default="float32", help="Weights and inputs in this precision.")
    add("--cpu_threads", type=int, help="Threads for torch's CPU operations. Default: torch's choice.")
    add(
        "--pick",
        metavar="RULE=VALUE",
        help="Name the setting to run: max_drop=POINTS (the fastest at most POINTS accuracy points below the "
        "unmerged model) or speedup=FACTOR (the most accurate at least FACTOR times as fast).",
    )
    add("--save_folder", metavar="DIR", help="With --pick: write the model with the picked setting here (Hub-ready).")
    add("--overwrite", action="store_true", help="Replace results (and a --save_folder) this tool wrote before.")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Checking the arguments
# --------------------------------------------------------------------------------------------------------------------


def parse_pick(text: str) -> tuple[str, float]:
    """`max_drop=0.5` -> ("max_drop", 0.5); `speedup=1.5` -> ("speedup", 1.5)."""
    rule, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if rule not in PICK_RULES or not math.isfinite(number) or number < 0 or (rule == "speedup" and number == 0):
        raise EvaluationError(
            f"--pick {text!r}: give max_drop=POINTS (0 or more) or speedup=FACTOR (more than 0), e.g. max_drop=0.5"
        )
    return rule, number


def holds_only(names) -> Callable[[Path], bool]:
    """`is_ours` for `check_output`: a folder holding plain files of these names and nothing else."""
    return lambda folder: all(p.name in names and p.is_file() and not p.is_symlink() for p in folder.iterdir())


def check_arguments(args) -> tuple[tuple[str, float] | None, list | None]:
    """Refuse what can be refused before a model or a dataset is read, every output path included; return the parsed
    --pick (or None) and --merge_r values (None: the defaults)."""
    if args.dataset_name is not None and args.validation_dir is not None:
        raise EvaluationError("give either --dataset_name or --validation_dir, not both")
    if args.eval_split is not None and args.validation_dir is not None:
        raise EvaluationError("--eval_split names a split of --dataset_name; --validation_dir is one split already")
    for flag, value in (("--batch_size", args.batch_size), ("--timing_repeats", args.timing_repeats)):
        if value < 1:
            raise EvaluationError(f"{flag} must be at least 1, got {value}")
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise EvaluationError(f"--max_eval_samples must be at least 1, got {args.max_eval_samples}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: torch finds no CUDA device here")
    pick = parse_pick(args.pick) if args.pick else None
    if bool(args.merge_layers) != bool(args.keep_rates):
        raise EvaluationError("--merge_layers and --keep_rates go together")
    if args.merge_layers:
        try:
            parse_staged(args.merge_layers, "1")
        except ValueError as error:
            raise EvaluationError(f"--merge_layers: {error}") from None
    if args.save_folder and not pick:
        raise EvaluationError("--save_folder saves the picked setting: give --pick too")
    try:
        r_values = [parse_merge_r(text) for text in args.merge_r] if args.merge_r else None
    except ValueError as error:
        raise EvaluationError(f"--merge_r: {error}") from None
    inputs = [args.model_name_or_path, args.dataset_name, args.validation_dir]
    check_output(args.output_dir, inputs, flag="--output_dir", is_ours=holds_only(RESULT_FILES),
                 overwrite=args.overwrite, folder=True)  # fmt: skip
    if args.save_folder:
        results, folder = Path(args.output_dir).resolve(), Path(args.save_folder).resolve()
        if folder == results or folder in results.parents or results in folder.parents:
            raise EvaluationError("--save_folder and --output_dir must be separate folders, neither inside the other")
        check_output(args.save_folder, inputs, flag="--save_folder", is_ours=is_hub_folder,
                     overwrite=args.overwrite, folder=True)  # fmt: skip
    return pick, r_values


# --------------------------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------------------------


def load_eval_split(args):
    """The images to evaluate on (columns `image`, `label`) and the split's name."""
    subset = dict(max_eval_samples=args.max_eval_samples, seed=args.seed)
    columns = dict(image_column=args.image_column_name, label_column=args.label_column_name)
    if args.eval_split is None:  # the split the training script evaluates on, found as it finds it
        dataset = load_image_dataset(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
            validation_dir=args.validation_dir, **columns, **subset,
        )  # fmt: skip
        if "validation" not in dataset:
            raise DataError("the dataset has no split to evaluate on; give --eval_split")
        return dataset["validation"], "validation"
    if args.dataset_name in (None, "digits"):
        dataset = load_digits_dataset()
    else:
        dataset = load_named_dataset(args.dataset_name, args.dataset_config_name)
    if args.eval_split not in dataset:
        raise DataError(
            f"--eval_split {args.eval_split!r} is not a split of the dataset; its splits: {', '.join(dataset)}"
        )
    split = prepare_splits(DatasetDict(validation=dataset[args.eval_split]), **columns)["validation"]
    if args.max_eval_samples is not None and args.max_eval_samples < len(split):
        split = split.shuffle(seed=args.seed).select(range(args.max_eval_samples))  # as load_image_dataset draws it
    return split, args.eval_split


def model_class_ids(class_names: list[str], config) -> torch.Tensor:
    """The model's class id for each of the dataset's classes: by name when the model names every one of them
    (a model trained on this dataset), else by position."""
    if len(class_names) > config.num_labels:
        raise DataError(
            f"the dataset has {len(class_names)} classes but the model's head predicts {config.num_labels}: "
            "give a model trained on these classes"
        )
    if all(name in config.label2id for name in class_names):
        return torch.tensor([int(config.label2id[name]) for name in class_names])
    return torch.arange(len(class_names))


def batches_of(split, transform, class_ids: torch.Tensor, batch_size: int):
    """The split as batches of `{"pixel_values", "labels"}`, labels as the model's class ids."""
    loader = torch.utils.data.DataLoader(TransformedDataset(split, transform), batch_size, collate_fn=collate_fn)
    for batch in loader:
        yield {"pixel_values": batch["pixel_values"], "labels": class_ids[batch["labels"]]}


# --------------------------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------------------------


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(results: list[SettingResult]) -> str:
    """One row per setting; ★ marks the speed/accuracy frontier."""
    with_top5 = any(row.top5_accuracy is not None for row in results)
    columns = ["setting", "r per layer", "tokens left", "FLOPs", "accuracy %"] + ["top-5 %"] * with_top5
    columns += ["KL", "images/s", "speed-up", "frontier"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in results:
        cells = [row.setting, "/".join(map(str, row.schedule)), f"{row.tokens_left:g}", f"{row.flop_ratio:.2f}x"]
        cells += [percent(row.accuracy)] + [percent(row.top5_accuracy)] * with_top5
        cells += [f"{row.kl_divergence:.3g}", f"{row.images_per_s:.1f} ±{row.images_per_s_spread:.0f}%"]
        cells += [f"{row.speedup:.2f}x", "★" if row.on_frontier else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_value(value) -> str:
    """A JSON value in a CSV cell: lists as `parse_merge_r` reads them, None as empty, floats in full."""
    if isinstance(value, list):
        return format_merge_r(value)
    return "" if value is None else str(value)


def write_results(output_dir: Path, summary: dict, results: list[SettingResult], text: str) -> list[Path]:
    """merging.md (`text`), merging.csv and merging.json (the same rows) and merging.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in RESULT_FILES]
    paths[0].write_text(text, encoding="utf-8")
    columns = [field.name for field in fields(SettingResult)]
    with open(paths[1], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([csv_value(getattr(row, name)) for name in columns] for row in results)
    paths[2].write_text(
        json.dumps({**summary, "settings": [asdict(row) for row in results]}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    plot_results(results, paths[3], summary["model"])
    return paths


def plot_results(results: list[SettingResult], path: Path, title: str):
    """Accuracy and KL against images/s, one line per mode from the unmerged model, r beside each point; the
    frontier ringed (and joined on the accuracy panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    unmerged, modes = results[0], list(dict.fromkeys(row.merge_mode for row in results[1:]))
    for axis, metric in ((accuracy_axis, lambda row: 100 * row.accuracy), (kl_axis, lambda row: row.kl_divergence)):
        for mode in modes:
            rows = sorted((row for row in results if row.merge_mode == mode), key=lambda row: -row.images_per_s)
            points = [unmerged, *rows]  # from the unmerged model, slower and slower
            axis.plot([row.images_per_s for row in points], [metric(row) for row in points], "o-", label=mode)
            for row in rows:  # the schedule: `r=4`, `r=4 decreasing`, `layers 3,6,9 keep 0.63`
                axis.annotate(row.setting.split(" ", 1)[1], (row.images_per_s, metric(row)), fontsize=7)
        axis.plot(unmerged.images_per_s, metric(unmerged), "k*", markersize=12, label="unmerged")
        frontier = sorted((row for row in results if row.on_frontier), key=lambda row: row.images_per_s)
        axis.plot([row.images_per_s for row in frontier], [metric(row) for row in frontier], "o", markersize=13,
                  markerfacecolor="none", markeredgecolor="0.3", label="frontier")  # fmt: skip
        axis.set_xlabel("images/s (median of the interleaved rounds)")
        axis.grid(alpha=0.3)
    accuracy_axis.plot([row.images_per_s for row in frontier], [100 * row.accuracy for row in frontier], "--",
                       color="0.5", linewidth=1)  # fmt: skip
    accuracy_axis.set(ylabel="accuracy %  (numbers: r)", title="accuracy")
    kl_axis.set(ylabel="mean KL(unmerged || setting)", title="change of the predictions")
    accuracy_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe(summary: dict) -> str:
    """What was measured, and how, in a few sentences for the table's heading and the card."""
    top5 = " top-5 where the model predicts more than 5 classes;"
    return (
        f"{summary['images']} images of `{summary['dataset']}` ({summary['split']} split, {summary['classes']} "
        f"classes) on {summary['device_name']}, {summary['dtype']}, batch {summary['batch_size']}. Accuracy as "
        f"`evaluate`'s;{top5} KL: mean KL(unmerged || setting) of the softmax predictions; images/s: median (± "
        f"interquartile range) of {summary['timing_repeats']} rounds that time every setting in turn on the same "
        f"batch, after warm-up. FLOPs relative to the unmerged model, {FLOP_FORMULA}. ★: on the speed/accuracy "
        "frontier (no other setting is both faster and at least as accurate)."
    )


# --------------------------------------------------------------------------------------------------------------------
# The picked setting as a Hub folder
# --------------------------------------------------------------------------------------------------------------------


def render_card(folder_name: str, summary: dict, results: list[SettingResult], picked: SettingResult) -> str:
    """README.md of the saved folder (`conformer_vit.cards.render_merging_card`): why this setting, and the table."""
    rule, value = summary["pick"]["rule"].split("=")
    reason = (
        f"{PICK_RULES[rule].format(value=value)}, at {picked.speedup:.2f}x the unmerged model's images/s "
        f"and {100 * picked.accuracy:.1f}% accuracy (unmerged: {100 * results[0].accuracy:.1f}%)"
    )
    table, license_name, fields = markdown_table(results), source_license(summary["model"]), picked_config(picked)
    return render_merging_card(
        folder_name, summary, results, picked, fields, reason, describe(summary), table, license_name
    )


def picked_config(picked: SettingResult) -> dict:
    """The config fields of the picked setting (every schedule field, so a saved schedule of another kind goes)."""
    return {
        "merge_mode": picked.merge_mode, "merge_r": picked.merge_r, "merge_schedule": picked.merge_schedule,
        "merge_layers": picked.merge_layers, "merge_keep_rate": picked.merge_keep_rate,
    }  # fmt: skip


def save_picked(args, summary: dict, results: list[SettingResult], picked: SettingResult) -> Path:
    """The source model, freshly loaded as it is stored, with the picked setting in its config, as a Hub folder."""
    changes = picked_config(picked)
    model = load_model(args.model_name_or_path, **changes)
    processor = load_image_processor(args.model_name_or_path, model.config)
    folder = Path(args.save_folder)
    source = Path(args.model_name_or_path) if os.path.exists(args.model_name_or_path) else None
    card = lambda staged: render_card(folder.resolve().name, summary, results, picked)
    write_folder(model, folder, card, source, args.overwrite, processor)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def evaluate(args, command: str) -> int:
    """Check, load, sweep, write; returns the exit status."""
    start = time.perf_counter()
    pick, r_values = check_arguments(args)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = args.model_name_or_path
    try:
        model = load_model(source, dtype=torch.float32)
    except (OSError, ValueError, TypeError) as error:  # unreadable, or an architecture Conformer cannot represent
        raise EvaluationError(f"cannot load model {source!r}: {str(error).strip().splitlines()[0]}") from None
    config = model.config
    if not config.num_labels:
        raise EvaluationError(f"{source} has no classifier (num_labels=0): give a model with a classification head")
    r_values = r_values if r_values is not None else default_r_values(config, args.merge_modes)
    staged = parse_staged(args.merge_layers, "1")["merge_layers"] if args.merge_layers else None
    settings = build_settings(args.merge_modes, r_values, args.decreasing, staged, args.keep_rates)
    try:
        check_settings(config, settings)
    except ValueError as error:
        raise EvaluationError(f"--merge_r: {error}") from None

    split, split_name = load_eval_split(args)
    if len(split) == 0:
        raise DataError(f"the {split_name} split has no images")
    class_ids = model_class_ids(split.features["label"].names, config)
    processor = load_image_processor(source, config)
    _, transform = build_transforms(config.image_size, False, processor.image_mean, processor.image_std)
    model = model.to(device, DTYPES[args.dtype]).eval()

    results = sweep(
        model, settings, batches_of(split, transform, class_ids, args.batch_size), args.timing_repeats,
        num_batches=math.ceil(len(split) / args.batch_size),
    )  # fmt: skip
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    summary = {
        "model": source,
        "dataset": args.validation_dir or args.dataset_name or "digits",
        "split": split_name,
        "images": len(split),
        "classes": len(class_ids),
        "device": device.type,
        "device_name": f"{device_name} ({torch.get_num_threads()} thread(s))" if device.type == "cpu" else device_name,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "timing_repeats": args.timing_repeats,
        "flops": FLOP_FORMULA,
        "torch": torch.__version__,
        "command": command,
        "elapsed_s": None,
        "pick": None,
    }
    picked = None
    if pick:
        rule, value = pick
        options = {"max_drop": value} if rule == "max_drop" else {"min_speedup": value}
        picked = pick_setting(results, **options)
        summary["pick"] = {"rule": f"{rule}={value:g}", "setting": picked.setting if picked else None}
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    text = f"# Token merging: {source}\n\n{describe(summary)}\n\n{markdown_table(results)}\n"
    paths = write_results(Path(args.output_dir), summary, results, text)
    print(markdown_table(results))
    if picked is not None:
        print(f"picked ({summary['pick']['rule']}): {picked.setting} — merge_mode={picked.merge_mode!r}, "
              f"merge_r={picked.merge_r!r}, {100 * picked.accuracy:.1f}% accuracy, {picked.speedup:.2f}x")  # fmt: skip
        if args.save_folder:
            paths.append(save_picked(args, summary, results, picked))
    for path in paths:
        print(f"wrote {path}")
    if pick and picked is None:  # only speedup=... can ask too much: the unmerged model is within any drop
        fastest = max(results, key=lambda row: row.images_per_s)
        print(f"error: --pick {summary['pick']['rule']}: no setting is that fast (the fastest: {fastest.setting}, "
              f"{fastest.speedup:.2f}x){'; nothing saved' if args.save_folder else ''}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def main(argv=None) -> int:
    """The command line (`argv`: its words, default `sys.argv[1:]`). Returns 0; 1 when --pick finds no setting
    (the results are written); 2 after one `error: ...` line on stderr for bad input."""
    import datasets
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the sweep shows its own progress; the libraries' bars are noise
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    try:
        argv = sys.argv[1:] if argv is None else [str(word) for word in argv]
        return evaluate(build_parser().parse_args(argv), " ".join(["python evaluate_merging.py", *argv]))
    except (ValueError, OSError) as error:  # DataError, EvaluationError, OutputPathError, FolderError among them
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

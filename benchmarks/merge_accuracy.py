"""How much of a model's accuracy each merge mode keeps: a small Conformer trained on the digits set without merging,
then evaluated with each mode over a sweep of r (off the shelf, as ToMe reports), and again after a short fine-tuning
with merging on.

    python benchmarks/merge_accuracy.py                      # about 5 minutes on 2 CPU threads
    python benchmarks/merge_accuracy.py --epochs 5 --finetune_epochs 1 --r_values 4,8,12   # a quick check

Digits is easy, so accuracy alone barely separates the modes; beside it the tables give how far merging moves the
model: the KL divergence of the merged model's predictions from the unmerged model's, and the cosine of the final
class-token feature to the unmerged one (both against the base model without merging, on the test split).
Writes `results/merge_accuracy.{md,csv,png}`; the trained base model goes to `--model_dir` (reused when its training
settings match) and `merge_quality.py` reads its keys as real features.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    MODES,
    REFERENCE_MODE,
    RESULTS_DIR,
    ROOT,
    add_digits_model_arguments,
    append_notes,
    base_config,
    check_digits_model_arguments,
    environment_line,
    load_digits_split,
    markdown_table,
    merge_schedule,
    parse_int_list,
    predict,
    seed_everything,
    train,
    write_results,
)

from modeling_conformer import ConformerForImageClassification

DEFAULT_MODEL_DIR = ROOT / "runs" / "digits_conformer"


# --------------------------------------------------------------------------------------------------------------------
# Merging, evaluation
# --------------------------------------------------------------------------------------------------------------------


def with_merging(model: ConformerForImageClassification, mode: str, schedule: list[int]):
    """A copy of `model` with the same weights that merges `schedule[layer]` tokens per layer with `mode`."""
    config = copy.deepcopy(model.config)
    config.merge_mode, config.merge_r = mode, list(schedule)
    config.validate_conformer()
    merged = ConformerForImageClassification(config)
    merged.load_state_dict(model.state_dict())
    return merged.eval()


def compare(logits, features, labels, reference_logits, reference_features) -> dict:
    """Accuracy, mean KL(reference || model) of the predictive distributions, mean cosine of the pooled features."""
    kl = F.kl_div(
        F.log_softmax(logits.float(), -1),
        F.log_softmax(reference_logits.float(), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return {
        "accuracy %": 100 * (logits.argmax(-1) == labels).float().mean().item(),
        "agreement %": 100 * (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item(),
        "KL": kl.mean().item(),
        "cosine": F.cosine_similarity(features.float(), reference_features.float(), dim=-1).mean().item(),
    }


def training_settings(args) -> dict:
    keys = ("image_size", "patch_size", "hidden_size", "layers", "heads", "epochs", "batch_size", "lr")
    return {key: getattr(args, key) for key in keys} | {
        "data": "run_image_classification.load_digits_dataset",
        "weight_decay": args.weight_decay,
        "max_shift": args.max_shift,
        "seed": args.seed,
    }


def base_model(args, train_set, test_set):
    """Load the base model from `--model_dir` if it was trained with these settings, else train and save it."""
    model_dir, settings = Path(args.model_dir), training_settings(args)
    settings_file = model_dir / "training_settings.json"
    if not args.retrain and settings_file.exists() and json.loads(settings_file.read_text()) == settings:
        print(f"Loading the base model from {model_dir} (same training settings; --retrain to train anew)")
        return ConformerForImageClassification.from_pretrained(model_dir).eval(), None
    print(f"Training the base model (no merging) for {args.epochs} epochs on {len(train_set[1])} images")
    seed_everything(args.seed)
    model = ConformerForImageClassification(base_config(args))
    start = time.perf_counter()
    train(model, *train_set, epochs=args.epochs, lr=args.lr, args=args, seed=args.seed)
    seconds = time.perf_counter() - start
    model.save_pretrained(model_dir)
    settings_file.write_text(json.dumps(settings, indent=1))
    print(f"  trained in {seconds:.0f} s, saved to {model_dir}")
    return model, seconds


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def keeps_as_much_lines(rows: list[dict], phase: str, num_images: int) -> list[str]:
    """For each mode other than bipartite and each criterion: the r where it keeps less than bipartite (accuracy
    lower, KL higher, cosine lower), with by how much, so that differences at the noise level can be told apart."""
    reference = {row["r"]: row for row in rows if row["mode"] == REFERENCE_MODE}
    lines = []
    for mode in MODES:
        compared = [row for row in rows if row["mode"] == mode and row["r"] in reference and mode != REFERENCE_MODE]
        if not compared:
            continue
        for criterion, sign, spec in (("accuracy %", 1, "+.2f"), ("KL", -1, "+.1e"), ("cosine", 1, "+.1e")):
            worse = []
            for row in compared:
                delta = row[criterion] - reference[row["r"]][criterion]
                if sign * delta < 0:
                    images = f" = {round(delta * num_images / 100):+d} images" if criterion == "accuracy %" else ""
                    worse.append(f"r={row['r']} ({format(delta, spec)}{images})")
            verdict = "at every r" if not worse else "NOT at " + ", ".join(worse)
            lines.append(f"{phase}: {mode} keeps as much as {REFERENCE_MODE} by {criterion} {verdict}")
    return lines


def plot(off_the_shelf: list[dict], fine_tuned: list[dict], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    metrics = (
        ("accuracy %", "test accuracy (%)", False),
        ("KL", "KL(unmerged || merged)", True),
        ("cosine", "cosine to the unmerged class token", False),
    )
    for ax, (column, label, log_scale) in zip(axes, metrics):
        for index, mode in enumerate(MODES):
            color = f"C{index}"
            rows = sorted((row for row in off_the_shelf if row["mode"] == mode), key=lambda row: row["r"])
            ax.plot([row["r"] for row in rows], [row[column] for row in rows], "o-", color=color, label=mode)
            tuned = sorted((row for row in fine_tuned if row["mode"] == mode), key=lambda row: row["r"])
            ax.plot(
                [row["r"] for row in tuned],
                [row[column] for row in tuned],
                "*",
                markersize=12,
                color=color,
                label=f"{mode}, fine-tuned (vs control)",
            )
        ax.set_xlabel("r (tokens merged per layer)")
        ax.set_ylabel(label)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    base = next(row for row in off_the_shelf if row["mode"] == "none")["accuracy %"]
    axes[0].axhline(base, color="black", linestyle="--", linewidth=1, label="unmerged")
    axes[0].legend(fontsize=7)
    fig.suptitle("Digits: what each merge mode keeps (base model trained without merging)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_digits_model_arguments(parser, epochs=30, epochs_help="epochs to train the base model (no merging)")
    parser.add_argument(
        "--r_values",
        type=parse_int_list,
        default=[2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32],
        help="r per layer to evaluate off the shelf",
    )
    parser.add_argument(
        "--finetune_r", type=parse_int_list, default=[8, 14], help="r values to fine-tune with merging on"
    )
    parser.add_argument("--finetune_epochs", type=int, default=3, help="epochs of fine-tuning with merging on")
    parser.add_argument("--finetune_lr", type=float, default=2e-4, help="peak learning rate of the fine-tuning")
    parser.add_argument("--model_dir", default=str(DEFAULT_MODEL_DIR), help="where the base model is saved / reused")
    parser.add_argument("--retrain", action="store_true", help="train the base model even if --model_dir has one")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and the shifts")
    args = parser.parse_args(argv)
    check_digits_model_arguments(parser, args)
    if args.epochs < 0 or args.finetune_epochs < 0 or args.threads < 0 or args.max_shift < 0:
        parser.error("--epochs, --finetune_epochs, --threads and --max_shift must not be negative")
    if any(r <= 0 for r in args.r_values + args.finetune_r):
        parser.error("--r_values and --finetune_r must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train_set, test_set = load_digits_split(args.image_size)
    test_images, test_labels = test_set
    model, train_seconds = base_model(args, train_set, test_set)
    reference_logits, reference_features = predict(model, test_images)
    base_accuracy = 100 * (reference_logits.argmax(-1) == test_labels).float().mean().item()
    print(f"Base model without merging: test accuracy {base_accuracy:.2f}% on {len(test_labels)} images")

    num_tokens, layers = 1 + (args.image_size // args.patch_size) ** 2, args.layers
    columns = ["mode", "r", "schedule", "tokens left", "accuracy %", "agreement %", "KL", "cosine"]
    off_the_shelf = [{"mode": "none", "r": 0, "schedule": "-", "tokens left": num_tokens, "accuracy %": base_accuracy}]
    off_the_shelf[0] |= {"agreement %": 100.0, "KL": 0.0, "cosine": 1.0}
    for r in args.r_values:
        schedule = merge_schedule(num_tokens, r, layers)
        for mode in MODES:
            logits, features = predict(with_merging(model, mode, schedule), test_images)
            row = {"mode": mode, "r": r, "schedule": "/".join(map(str, schedule))}
            row |= {"tokens left": num_tokens - sum(schedule)}
            off_the_shelf.append(row | compare(logits, features, test_labels, reference_logits, reference_features))
    print(markdown_table(off_the_shelf, columns, {"KL": ".1e", "cosine": 5}), flush=True)

    fine_tuned = []
    if args.finetune_epochs:
        # The control fine-tunes the same way without merging; the merged runs are compared with it, so that what
        # fine-tuning alone changes does not count as an effect of merging.
        runs = [("none", 0)] + [(mode, r) for r in args.finetune_r for mode in MODES]
        for mode, r in runs:
            schedule = merge_schedule(num_tokens, r, layers) if mode != "none" else [0] * layers
            print(f"Fine-tuning with merge_mode={mode}, r={r} for {args.finetune_epochs} epoch(s)")
            tuned = with_merging(model, mode, schedule)
            train(tuned, *train_set, epochs=args.finetune_epochs, lr=args.finetune_lr, args=args, seed=args.seed + 1)
            logits, features = predict(tuned, test_images)
            if mode == "none":
                control_logits, control_features = logits, features
            row = {"mode": mode if mode != "none" else "none (control)", "r": r}
            row |= {"schedule": "/".join(map(str, schedule)) if r else "-", "tokens left": num_tokens - sum(schedule)}
            fine_tuned.append(row | compare(logits, features, test_labels, control_logits, control_features))

    trained = f"trained in {train_seconds:.0f} s" if train_seconds is not None else f"loaded from {args.model_dir}"
    settings = (
        f"Settings: `{' '.join(sys.argv[1:]) or '(defaults)'}`. Digits (scikit-learn, 8x8 upsampled to "
        f"{args.image_size} px), {len(train_set[1])} train / {len(test_labels)} test images. Base model: hidden "
        f"{args.hidden_size}, {args.layers} layers, {args.heads} heads, patch {args.patch_size} ({num_tokens} tokens), "
        f"{args.epochs} epochs without merging ({trained}); test accuracy {base_accuracy:.2f}%. "
        f"{environment_line(args.threads or None)}.\n\n"
        "r: tokens merged per layer (schedule: per layer, clamped where too few tokens are left, the same for every "
        "mode). agreement: predictions equal to the unmerged model's. KL: mean KL(unmerged || merged) of the "
        "predictive distributions. cosine: mean cosine of the final class-token feature to the unmerged model's. "
        "Off the shelf: against the base model without merging, on the test split. Fine-tuned: each run starts from "
        f"the base model and trains {args.finetune_epochs} epoch(s) with merging on (lr {args.finetune_lr}); the "
        "control fine-tunes the same way without merging, and agreement, KL and cosine are against the control "
        "(so that what fine-tuning alone changes is not counted as merging's effect)."
    )
    sections = [("Off the shelf (trained without merging)", off_the_shelf, columns, {"KL": ".1e", "cosine": 5})]
    if fine_tuned:
        sections.append(("After fine-tuning with merging on", fine_tuned, columns, {"KL": ".1e", "cosine": 5}))
    text = write_results("merge_accuracy", "Accuracy kept by merging (digits)", settings, sections)
    lines = keeps_as_much_lines(off_the_shelf, "off the shelf", len(test_labels))
    lines += keeps_as_much_lines(fine_tuned, "fine-tuned", len(test_labels))
    append_notes("merge_accuracy", "Against bipartite at equal r", lines)
    print(text)
    print("\n".join(lines))
    plot(off_the_shelf, fine_tuned, RESULTS_DIR / "merge_accuracy.png")
    print(f"wrote {RESULTS_DIR / 'merge_accuracy'}.md, .csv, .png")


if __name__ == "__main__":
    main()

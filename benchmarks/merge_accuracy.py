"""How much of a model's accuracy each merge mode keeps: a small Conformer trained on the digits set without merging,
then evaluated with each mode over a sweep of r (off the shelf, as ToMe reports), and again after a short fine-tuning
with merging on.

    python benchmarks/merge_accuracy.py                                                  # about 5 minutes, 2 threads
    python benchmarks/merge_accuracy.py --epochs 5 --finetune_epochs 1 --r_values 4 8 12  # a quick check

Digits is easy, so accuracy alone barely separates the modes; beside it the tables give how far merging moves the
model: the KL divergence of the merged model's predictions from the unmerged model's, and the cosine of the final
class token to the unmerged one (both against the base model without merging, on the test split).
Writes `results/merge_accuracy.{md,csv,png}`; the trained base model goes to `--model_dir` (reused while its training
settings match) and `merge_quality.py` reads its keys as real features.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch.nn.functional as F
from common import (
    DIGITS_SHAPE,
    MODES,
    REFERENCE_MODE,
    RESULTS_DIR,
    ROOT,
    digits_config,
    environment_line,
    markdown_table,
    predict,
    schedule_for,
    set_up_cpu,
    train,
    with_merging,
    write_results,
)
from transformers import set_seed

from conformer_vit.data import digits_tensors
from modeling_conformer import ConformerForImageClassification

COLUMNS = ["mode", "r", "schedule", "tokens left", "accuracy %", "agreement %", "KL", "cosine"]
DIGITS = {"KL": ".1e", "cosine": 5}


def compare(logits, features, labels, reference_logits, reference_features) -> dict:
    """Accuracy, agreement with the reference's predictions, mean KL(reference || model), mean feature cosine."""
    log_probs, reference_log_probs = F.log_softmax(logits.float(), -1), F.log_softmax(reference_logits.float(), -1)
    kl = F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="none").sum(-1)
    return {
        "accuracy %": 100 * (logits.argmax(-1) == labels).float().mean().item(),
        "agreement %": 100 * (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item(),
        "KL": kl.mean().item(),
        "cosine": F.cosine_similarity(features.float(), reference_features.float(), dim=-1).mean().item(),
    }


def base_model(model_dir: Path, train_set, epochs: int, lr: float, seed: int, retrain: bool):
    """The model saved in `model_dir` if it was trained with these settings, else a newly trained (and saved) one."""
    settings = DIGITS_SHAPE | {"data": "image_data.digits_tensors", "epochs": epochs, "lr": lr, "seed": seed}
    settings_file = model_dir / "training_settings.json"
    if not retrain and settings_file.exists() and json.loads(settings_file.read_text()) == settings:
        print(f"Loading the base model from {model_dir} (same training settings; --retrain to train anew)")
        return ConformerForImageClassification.from_pretrained(model_dir).eval(), f"loaded from {model_dir}"
    print(f"Training the base model (no merging) for {epochs} epochs on {len(train_set[1])} images")
    set_seed(seed)
    model = ConformerForImageClassification(digits_config())
    start = time.perf_counter()
    train(model, *train_set, epochs=epochs, lr=lr, seed=seed)
    model.save_pretrained(model_dir)
    settings_file.write_text(json.dumps(settings, indent=1))
    return model, f"trained in {time.perf_counter() - start:.0f} s"


def merged_row(model, mode: str, r: int, schedule: list[int], test_set, reference) -> dict:
    logits, features = predict(model, test_set[0])
    row = {"mode": mode, "r": r, "schedule": "/".join(map(str, schedule)) if r else "-"}
    return (
        row
        | {"tokens left": model.config.num_patches + 1 - sum(schedule)}
        | compare(logits, features, test_set[1], *reference)
    )


def off_the_shelf(model, test_set, r_values: list[int]) -> list[dict]:
    """Each mode at each r on the base model's weights, against the base model without merging."""
    reference = predict(model, test_set[0])
    rows = [merged_row(model, "none", 0, [0] * model.config.num_hidden_layers, test_set, reference)]
    for r in r_values:
        schedule = schedule_for(r, model.config.num_patches + 1, model.config.num_hidden_layers)
        rows += [
            merged_row(with_merging(model, mode, schedule), mode, r, schedule, test_set, reference) for mode in MODES
        ]
    return rows


def fine_tuned(model, train_set, test_set, r_values: list[int], epochs: int, lr: float, seed: int) -> list[dict]:
    """Each mode at each r fine-tuned from the base model with merging on, against a control fine-tuned the same way
    without merging (so that what fine-tuning alone changes does not count as merging's effect)."""
    rows, layers, reference = [], model.config.num_hidden_layers, None
    for mode, r in [("none", 0)] + [(mode, r) for r in r_values for mode in MODES]:
        schedule = schedule_for(r, model.config.num_patches + 1, layers)
        print(f"Fine-tuning with merge_mode={mode}, r={r} for {epochs} epoch(s)")
        tuned = train(with_merging(model, mode, schedule), *train_set, epochs=epochs, lr=lr, seed=seed + 1)
        reference = reference or predict(tuned, test_set[0])  # the control comes first
        rows.append(merged_row(tuned, mode if r else "none (control)", r, schedule, test_set, reference))
    return rows


def comparison_lines(rows: list[dict], phase: str, num_images: int) -> list[str]:
    """For each mode and criterion, the r where it keeps less than bipartite (accuracy or cosine lower, KL higher)."""
    reference = {row["r"]: row for row in rows if row["mode"] == REFERENCE_MODE}
    lines = []
    for mode in MODES[1:] if MODES[0] == REFERENCE_MODE else MODES:
        for criterion, sign in (("accuracy %", 1), ("KL", -1), ("cosine", 1)):
            worse = [
                f"r={row['r']} ({row[criterion] - reference[row['r']][criterion]:+.2g})"
                for row in rows
                if row["mode"] == mode and sign * (row[criterion] - reference[row["r"]][criterion]) < 0
            ]
            verdict = "at every r" if not worse else "not at " + ", ".join(worse)
            lines.append(f"{phase}: {mode} keeps as much as {REFERENCE_MODE} by {criterion} {verdict}")
    return lines + [f"one test image is {100 / num_images:.2f} points of accuracy"]


def plot(rows: list[dict], tuned_rows: list[dict], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (column, label) in zip(
        axes, (("accuracy %", "test accuracy (%)"), ("KL", "KL(unmerged || merged)"), ("cosine", "class-token cosine"))
    ):
        for index, mode in enumerate(MODES):
            own = [(row["r"], row[column]) for row in rows if row["mode"] == mode]
            ax.plot(*zip(*own), "o-", color=f"C{index}", label=mode)
            tuned = [(row["r"], row[column]) for row in tuned_rows if row["mode"] == mode]
            if tuned:
                ax.plot(*zip(*tuned), "*", markersize=12, color=f"C{index}", label=f"{mode}, fine-tuned (vs control)")
        ax.set(xlabel="r (tokens merged per layer)", ylabel=label, yscale="log" if column == "KL" else "linear")
        ax.grid(alpha=0.3)
    axes[0].axhline(rows[0]["accuracy %"], color="black", linestyle="--", linewidth=1, label="unmerged")
    axes[0].legend(fontsize=7)
    fig.suptitle("Digits: what each merge mode keeps (base model trained without merging)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="epochs to train the base model (no merging)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the base model")
    default_r = [2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32]
    parser.add_argument("--r_values", nargs="+", type=int, default=default_r, help="r per layer, off the shelf")
    parser.add_argument("--finetune_r", nargs="*", type=int, default=[8, 14], help="r values to fine-tune with")
    parser.add_argument("--finetune_epochs", type=int, default=3, help="epochs of fine-tuning with merging on")
    parser.add_argument("--finetune_lr", type=float, default=2e-4, help="peak learning rate of the fine-tuning")
    parser.add_argument("--model_dir", default="runs/digits_conformer", help="where the base model is saved / reused")
    parser.add_argument("--retrain", action="store_true", help="train the base model even if --model_dir has one")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and the shifts")
    args = parser.parse_args(argv)
    if min(args.epochs, args.finetune_epochs, args.threads) < 0 or min(args.r_values + args.finetune_r) <= 0:
        parser.error("--epochs, --finetune_epochs and --threads must not be negative, r values must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_up_cpu(args.threads, keep_memory=False)
    train_set, test_set = digits_tensors(digits_config().image_size)
    model, how = base_model(ROOT / args.model_dir, train_set, args.epochs, args.lr, args.seed, args.retrain)
    rows = off_the_shelf(model, test_set, args.r_values)
    print(markdown_table(rows, COLUMNS, DIGITS), flush=True)
    tuned_rows = []
    if args.finetune_epochs and args.finetune_r:
        tuned_rows = fine_tuned(
            model, train_set, test_set, args.finetune_r, args.finetune_epochs, args.finetune_lr, args.seed
        )

    settings = (
        f"`python benchmarks/merge_accuracy.py {' '.join(sys.argv[1:])}`. Digits (scikit-learn, 8x8 upsampled to "
        f"{model.config.image_size} px), {len(train_set[1])} train / {len(test_set[1])} test images. Base model: "
        f"{DIGITS_SHAPE}, {model.config.num_patches + 1} tokens, {args.epochs} epochs without merging ({how}); test "
        f"accuracy {rows[0]['accuracy %']:.2f}%. {environment_line()}.\n\n"
        "r: tokens merged per layer (schedule: per layer, clamped where too few tokens are left, the same for every "
        "mode). agreement: predictions equal to the unmerged model's. KL: mean KL(unmerged || merged) of the "
        "predictive distributions. cosine: mean cosine of the final class token to the unmerged model's. Fine-tuned: "
        f"each run trains {args.finetune_epochs} epoch(s) from the base model with merging on (lr {args.finetune_lr}); "
        "agreement, KL and cosine are against a control fine-tuned the same way without merging."
    )
    sections = [("Off the shelf (trained without merging)", rows, COLUMNS, DIGITS)]
    sections += [("After fine-tuning with merging on", tuned_rows, COLUMNS, DIGITS)] if tuned_rows else []
    notes = comparison_lines(rows, "off the shelf", len(test_set[1]))
    notes += comparison_lines(tuned_rows, "fine-tuned", len(test_set[1])) if tuned_rows else []
    print(write_results("merge_accuracy", "Accuracy kept by merging (digits)", settings, sections, notes))
    plot(rows, tuned_rows, RESULTS_DIR / "merge_accuracy.png")
    print(f"wrote {RESULTS_DIR / 'merge_accuracy'}.md, .csv, .png")


if __name__ == "__main__":
    main()

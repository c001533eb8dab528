"""Which classifier head to put on a merging Conformer: the class token (`classifier="token"`), the size-weighted mean
of the patch tokens (`"gap"`), or the final tokens laid back on the patch grid through the source map and read by a
small CNN (`"cnn"`: ViT globally, CNN locally).

    python benchmarks/classifier_heads.py                                     # about 5 minutes on 2 CPU threads
    python benchmarks/classifier_heads.py --merge_mode bipartite --merge_r 8
    python benchmarks/classifier_heads.py --epochs 2 --repeats 3 --skip_vit   # a quick check

The digits Conformer of merge_accuracy.py is trained from scratch with each head, with merging on and, as the
reference, without: the same seed, batches, shifts and schedule for every model. Reported per head: test accuracy and
mean test loss, the head's parameters, and inference images/s of the whole model at 32 px and of a randomly
initialised ViT-S_16 with the same head and merging at 224 px (batch 8, fp32), timed as throughput.py does.
Writes `results/classifier_heads.{md,csv,png}`.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from common import (
    DIGITS_SHAPE,
    MODES,
    RESULTS_DIR,
    digits_config,
    environment_line,
    predict,
    schedule_for,
    set_up_cpu,
    time_models,
    train,
    write_results,
)
from transformers import set_seed

from configuration_conformer import CLASSIFIERS, ConformerConfig
from conformer_vit.data import digits_tensors
from modeling_conformer import ConformerForImageClassification

HEAD_MODULES = ("cnn_head", "pre_logits", "classifier")  # what follows the final layer norm


def head_parameters(model: ConformerForImageClassification) -> int:
    """Parameters after the final norm (CNN head, pre-logits, classifier); the class token, in every model, is not."""
    modules = [getattr(model, name, None) for name in HEAD_MODULES]
    return sum(p.numel() for module in modules if module is not None for p in module.parameters())


def train_and_test(classifier: str, mode: str, merge_r: int, train_set, test_set, epochs, lr, seed, head_width):
    """One digits model with this head and merging, trained from scratch; its test numbers and the model."""
    num_tokens = 1 + digits_config().num_patches
    schedule = schedule_for(merge_r if mode != "none" else 0, num_tokens, DIGITS_SHAPE["num_hidden_layers"])
    print(f"Training classifier={classifier}, merge_mode={mode}, r={'/'.join(map(str, schedule))}", flush=True)
    set_seed(seed)
    config = digits_config(classifier=classifier, merge_mode=mode, merge_r=schedule, cnn_head_channels=head_width)
    model = ConformerForImageClassification(config)
    start = time.perf_counter()
    train(model, *train_set, epochs=epochs, lr=lr, seed=seed)
    logits, _ = predict(model, test_set[0])
    return {
        "head": classifier,
        "mode": mode,
        "schedule": "/".join(map(str, schedule)),
        "tokens left": num_tokens - sum(schedule),
        "head params": head_parameters(model),
        "train s": time.perf_counter() - start,
        "accuracy %": 100 * (logits.argmax(-1) == test_set[1]).float().mean().item(),
        "test loss": F.cross_entropy(logits.float(), test_set[1]).item(),
        "model": model,
    }


def vit_model(classifier: str, mode: str, merge_r: int, head_width: int) -> ConformerForImageClassification:
    """A randomly initialised ViT-S_16 at 224 px with this head and merging, for timing only."""
    schedule = schedule_for(merge_r if mode != "none" else 0, 197, 12)
    config = ConformerConfig.from_preset(
        "ViT-S_16", classifier=classifier, merge_mode=mode, merge_r=schedule, cnn_head_channels=head_width
    )
    return ConformerForImageClassification._from_config(config, attn_implementation="sdpa").eval()


def summary_rows(runs: list[dict], merge_mode: str) -> list[dict]:
    """One row per head: the merged model's numbers beside the unmerged reference's."""
    rows = []
    for head in dict.fromkeys(run["head"] for run in runs):
        pair = {run["mode"]: run for run in runs if run["head"] == head}
        row = {"head": head, "head params": pair[merge_mode]["head params"]}
        for column in ("accuracy %", "test loss", "img/s 32px", "img/s ViT-S_16"):
            row |= {f"{column} merged": pair[merge_mode][column], f"{column} unmerged": pair["none"][column]}
        rows.append(row)
    return rows


def comparison_lines(summary: list[dict], num_images: int) -> list[str]:
    """Each head against the class token, merged: accuracy in points and test images, loss, speed."""
    token = next((row for row in summary if row["head"] == "token"), None)
    lines = []
    for row in summary if token else []:
        if row is token:
            continue
        delta = row["accuracy % merged"] - token["accuracy % merged"]
        speed = row["img/s ViT-S_16 merged"] / token["img/s ViT-S_16 merged"]
        lines.append(
            f"{row['head']} vs token, merged: accuracy {delta:+.2f} points ({round(delta * num_images / 100):+d} test "
            f"images), test loss {row['test loss merged']:.3f} vs {token['test loss merged']:.3f}, "
            f"{row['head params'] / max(1, token['head params']):.0f}x the head parameters, images/s "
            f"x{row['img/s 32px merged'] / token['img/s 32px merged']:.2f} at 32 px, x{speed:.2f} for ViT-S_16"
        )
    return lines


def plot(summary: list[dict], merge_label: str, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("accuracy %", "test loss", "img/s 32px", "img/s ViT-S_16")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    positions = range(len(summary))
    for ax, column in zip(axes, panels):
        for offset, suffix, label in ((-0.2, "merged", merge_label), (0.2, "unmerged", "no merging")):
            ax.bar([p + offset for p in positions], [row[f"{column} {suffix}"] for row in summary], 0.4, label=label)
        ax.set_xticks(list(positions), [row["head"] for row in summary])
        ax.set_title(column, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8)
    fig.suptitle("Classifier heads on digits and their cost", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifiers", nargs="+", default=list(CLASSIFIERS), choices=list(CLASSIFIERS), help="heads")
    parser.add_argument("--merge_mode", default="submodular", choices=list(MODES), help="merging of the merged runs")
    parser.add_argument("--merge_r", type=int, default=6, help="tokens merged per layer (clamped where too few)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs to train each model")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--cnn_head_channels", type=int, default=256, help="width of the CNN head")
    parser.add_argument("--skip_vit", action="store_true", help="do not time the ViT-S_16 models")
    parser.add_argument("--repeats", type=int, default=10, help="timed measurements per model (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and the shifts")
    args = parser.parse_args(argv)
    if min(args.epochs, args.cnn_head_channels, args.repeats) <= 0 or min(args.merge_r, args.threads) < 0:
        parser.error("--epochs, --cnn_head_channels and --repeats must be positive, --merge_r and --threads not < 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    allocator = set_up_cpu(args.threads)
    train_set, test_set = digits_tensors(digits_config().image_size)
    training = (train_set, test_set, args.epochs, args.lr, args.seed, args.cnn_head_channels)
    runs = [
        train_and_test(head, mode, args.merge_r, *training)
        for head in args.classifiers
        for mode in (args.merge_mode, "none")
    ]
    print(f"Timing {len(runs)} digits models: {args.repeats} repeats x 10 passes of 64 images", flush=True)
    timed = time_models(dict(enumerate(run["model"] for run in runs)), test_set[0][:64], args.repeats, 3, 10)
    vit_models = (
        {}
        if args.skip_vit
        else {
            index: vit_model(run["head"], run["mode"], args.merge_r, args.cnn_head_channels)
            for index, run in enumerate(runs)
        }
    )
    print(f"Timing {len(vit_models)} ViT-S_16 models: {args.repeats} repeats x 1 pass of 8 images", flush=True)
    vit_timed = time_models(vit_models, torch.randn(8, 3, 224, 224), args.repeats, 3) if vit_models else {}
    for index, run in enumerate(runs):
        run |= {"img/s 32px": timed[index][0], "spread %": timed[index][1]}
        run |= {"img/s ViT-S_16": vit_timed.get(index, (float("nan"),))[0]}

    summary = summary_rows(runs, args.merge_mode)
    details = ["head", "mode", "schedule", "tokens left", "head params", "train s", "accuracy %", "test loss"]
    details += ["img/s 32px", "spread %", "img/s ViT-S_16"]
    digits = {"train s": 0, "accuracy %": 2, "test loss": 4, "img/s 32px": 1, "spread %": 0, "img/s ViT-S_16": 1}
    digits |= {f"{column} {kind}": digits[column] for column in digits for kind in ("merged", "unmerged")}
    settings = (
        f"`python benchmarks/classifier_heads.py {' '.join(sys.argv[1:])}`. Digits (scikit-learn, 8x8 upsampled to 32 "
        f"px), {len(train_set[1])} train / {len(test_set[1])} test images. Each model: {DIGITS_SHAPE}, trained from "
        f"scratch for {args.epochs} epochs (AdamW, lr {args.lr}, cosine, batch 32, shifts up to 2 px), seed "
        f"{args.seed} for all; merged: {args.merge_mode}, r={args.merge_r} per layer; CNN head width "
        f"{args.cnn_head_channels}. {environment_line()}; {allocator}.\n\n"
        "head params: parameters after the final layer norm. test loss: mean cross-entropy on the test split. img/s: "
        f"median of {args.repeats} interleaved repeats (spread %: interquartile range over the median); digits models "
        "at 32 px, batch 64, 10 passes per measurement; ViT-S_16 at 224 px, random weights, batch 8, fp32, with the "
        "same head and merging."
    )
    sections = [("By head", summary, list(summary[0]), digits), ("Each model", runs, details, digits)]
    notes = comparison_lines(summary, len(test_set[1]))
    print(write_results("classifier_heads", "Classifier heads (digits)", settings, sections, notes))
    plot(summary, f"{args.merge_mode} r={args.merge_r}", RESULTS_DIR / "classifier_heads.png")
    print(f"wrote {RESULTS_DIR / 'classifier_heads'}.md, .csv, .png")


if __name__ == "__main__":
    main()

"""Which classifier head to put on a merging Conformer: the class token (`classifier="token"`), the size-weighted mean
of the patch tokens (`"gap"`), or the final tokens laid back on the patch grid through the source map and read by a
small CNN (`"cnn"`: ViT globally, CNN locally).

    python benchmarks/classifier_heads.py                                  # about 5 minutes on 2 CPU threads
    python benchmarks/classifier_heads.py --merge_mode bipartite --merge_r 8
    python benchmarks/classifier_heads.py --epochs 2 --repeats 3 --skip_vit   # a quick check

The digits Conformer of merge_accuracy.py (hidden 64, 4 layers, 4 heads, 32 px in 4-px patches) is trained from
scratch with each head, with merging on and, as the reference, without: the same seed, batches, shifts and schedule
for every model. Reported per head: test accuracy and mean test loss, the head's parameters, and inference images/s
of the whole model at that size and of a ViT-S_16 with the same head and merging at 224 px (random weights, batch 8,
fp32). Timing is throughput.py's: every model warmed up, then timed round-robin, the median over repeats.
Writes `results/classifier_heads.{md,csv,png}`.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from common import (
    MODES,
    RESULTS_DIR,
    add_digits_model_arguments,
    append_notes,
    base_config,
    check_digits_model_arguments,
    environment_line,
    keep_freed_memory,
    load_digits_split,
    measure,
    merge_schedule,
    parse_int_list,
    predict,
    seed_everything,
    train,
    write_results,
)

from configuration_conformer import CLASSIFIERS, PRESETS, ConformerConfig
from modeling_conformer import ConformerForImageClassification

HEAD_MODULES = ("cnn_head", "pre_logits", "classifier")  # what follows the final layer norm


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def head_parameters(model: ConformerForImageClassification) -> int:
    """Parameters after the encoder's final norm: the CNN head (if any), the pre-logits layer (if any), the classifier.
    The class token belongs to the embeddings: every head has it."""
    modules = [getattr(model, name, None) for name in HEAD_MODULES]
    return sum(p.numel() for module in modules if module is not None for p in module.parameters())


def digits_config(args, classifier: str, mode: str, schedule: list[int]) -> ConformerConfig:
    """merge_accuracy.py's digits model with this head and per-layer merging."""
    config = base_config(args)
    config.classifier, config.merge_mode, config.merge_r = classifier, mode, list(schedule)
    if args.cnn_head_channels is not None:
        config.cnn_head_channels = args.cnn_head_channels
    config.validate_conformer()
    return config


def vit_model(args, classifier: str, mode: str, schedule: list[int]) -> ConformerForImageClassification:
    """A randomly initialised `--vit_preset` Conformer with this head and merging, for timing only."""
    overrides = {} if args.cnn_head_channels is None else {"cnn_head_channels": args.cnn_head_channels}
    config = ConformerConfig.from_preset(
        args.vit_preset,
        image_size=args.vit_image_size,
        num_labels=1000,
        classifier=classifier,
        merge_mode=mode,
        merge_r=list(schedule),
        **overrides,
    )
    return ConformerForImageClassification._from_config(config, attn_implementation="sdpa").eval()


def schedules(args, num_tokens: int, num_layers: int, merge_r: list[int]) -> dict[str, list[int]]:
    """Per-layer r with merging on (`--merge_mode`) and off ("none"): one r is clamped per layer as ToMe does."""
    merged = merge_schedule(num_tokens, merge_r[0], num_layers) if len(merge_r) == 1 else list(merge_r)
    return {args.merge_mode: merged, "none": [0] * num_layers}


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def summary_rows(runs: list[dict], args) -> list[dict]:
    """One row per head: the merged model's numbers beside the unmerged reference's."""
    rows = []
    for classifier in args.classifiers:
        merged, unmerged = (
            next(run for run in runs if run["head"] == classifier and run["mode"] == mode)
            for mode in (args.merge_mode, "none")
        )
        row = {"head": classifier, "head params": merged["head params"]}
        for key, column in (
            ("accuracy %", "accuracy %"),
            ("test loss", "test loss"),
            ("images/s", f"img/s {args.image_size}px"),
            ("vit images/s", f"img/s {args.vit_preset}"),
        ):
            row[f"{column} merged"] = merged.get(key, float("nan"))
            row[f"{column} unmerged"] = unmerged.get(key, float("nan"))
        rows.append(row)
    return rows


def comparison_lines(summary: list[dict], args, num_images: int) -> list[str]:
    """Each head against the class token, merged: accuracy in points and test images, loss, speed."""
    reference = next((row for row in summary if row["head"] == "token"), None)
    lines = []
    for row in summary:
        if reference is None or row is reference:
            continue
        delta = row["accuracy % merged"] - reference["accuracy % merged"]
        line = (
            f"{row['head']} vs token, merged: accuracy {delta:+.2f} points ({round(delta * num_images / 100):+d} "
            f"test images), test loss {row['test loss merged']:.3f} vs {reference['test loss merged']:.3f}, "
            f"{row['head params'] / max(1, reference['head params']):.0f}x the head parameters, images/s "
            f"x{row[f'img/s {args.image_size}px merged'] / reference[f'img/s {args.image_size}px merged']:.2f} at "
            f"{args.image_size} px"
        )
        vit_column = f"img/s {args.vit_preset} merged"
        if row[vit_column] == row[vit_column]:  # not NaN: timed
            line += (
                f", x{row[vit_column] / reference[vit_column]:.2f} for {args.vit_preset} at {args.vit_image_size} px"
            )
        lines.append(line)
    return lines


def plot(summary: list[dict], args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy %", "test accuracy %"),
        ("test loss", "mean test loss"),
        (f"img/s {args.image_size}px", f"images/s, digits model at {args.image_size} px"),
    ]
    if not args.skip_vit:
        panels.append((f"img/s {args.vit_preset}", f"images/s, {args.vit_preset} at {args.vit_image_size} px"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    positions = range(len(summary))
    for ax, (column, label) in zip(axes, panels):
        for offset, (suffix, name) in (
            (-0.2, ("merged", f"{args.merge_mode} r={args.merge_label}")),
            (0.2, ("unmerged", "no merging")),
        ):
            values = [row[f"{column} {suffix}"] for row in summary]
            ax.bar([p + offset for p in positions], values, width=0.4, label=name)
        ax.set_xticks(list(positions), [row["head"] for row in summary])
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if column == "accuracy %":
            low = min(min(row["accuracy % merged"], row["accuracy % unmerged"]) for row in summary)
            ax.set_ylim(max(0.0, low - 5), 100)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8)
    fig.suptitle(f"Classifier heads on digits ({args.epochs} epochs each) and their cost", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------


def parse_classifiers(text: str) -> list[str]:
    """`"token,cnn"` -> the heads the config offers (for argparse `type=`)."""
    heads = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [head for head in heads if head not in CLASSIFIERS]
    if unknown or not heads:
        raise argparse.ArgumentTypeError(f"unknown classifier(s) {unknown}; the config offers {', '.join(CLASSIFIERS)}")
    return heads


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_digits_model_arguments(
        parser, epochs=20, epochs_help="epochs to train each model (merge_accuracy.py's base model: 30)"
    )
    parser.add_argument(
        "--classifiers", type=parse_classifiers, default=list(CLASSIFIERS), help="heads to compare, e.g. token,cnn"
    )
    parser.add_argument(
        "--cnn_head_channels", type=int, default=None, help="width of the CNN head (default: the config's, 256)"
    )
    parser.add_argument("--merge_mode", default="submodular", choices=list(MODES), help="merging of the merged runs")
    parser.add_argument(
        "--merge_r",
        type=parse_int_list,
        default=[6],
        help="tokens merged per layer: one r for every layer (clamped where too few are left), or one per layer",
    )
    plain_presets = [name for name, shape in PRESETS.items() if not shape.get("backbone_depths")]
    parser.add_argument("--vit_preset", default="ViT-S_16", choices=plain_presets, help="the larger model timed")
    parser.add_argument("--vit_image_size", type=int, default=224, help="its input resolution in pixels")
    parser.add_argument("--vit_batch_size", type=int, default=8, help="its images per forward pass")
    parser.add_argument("--vit_merge_r", type=int, default=None, help="its r per layer (default: --merge_r's one r)")
    parser.add_argument("--vit_iters", type=int, default=1, help="its forward passes per timed measurement")
    parser.add_argument("--skip_vit", action="store_true", help="do not time the larger model")
    parser.add_argument("--timing_batch_size", type=int, default=64, help="images per pass when timing digits models")
    parser.add_argument("--timing_iters", type=int, default=10, help="digits-model passes per timed measurement")
    parser.add_argument("--repeats", type=int, default=10, help="timed measurements per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes per model before timing")
    parser.add_argument(
        "--default_allocator",
        action="store_true",
        help="leave glibc's allocator as it is (by default it keeps freed memory; see throughput.py)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and the shifts")
    parser.add_argument("--name", default="classifier_heads", help="results file stem")
    args = parser.parse_args(argv)
    check_digits_model_arguments(parser, args)
    for flag in ("vit_image_size", "vit_batch_size", "vit_iters", "timing_batch_size", "timing_iters", "repeats"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.epochs <= 0 or args.warmup < 0 or args.threads < 0 or args.max_shift < 0:
        parser.error("--epochs must be positive; --warmup, --threads and --max_shift must not be negative")
    if args.cnn_head_channels is not None and args.cnn_head_channels <= 0:
        parser.error(f"--cnn_head_channels must be positive, got {args.cnn_head_channels}")
    if not args.merge_r or any(r < 0 for r in args.merge_r) or len(args.merge_r) not in (1, args.layers):
        parser.error(f"--merge_r takes one r >= 0 or one per layer ({args.layers}), got {args.merge_r}")
    if args.vit_merge_r is None:
        if len(args.merge_r) > 1 and not args.skip_vit:
            parser.error("--merge_r is per layer: give --vit_merge_r for the larger model (or --skip_vit)")
        args.vit_merge_r = args.merge_r[0]
    if args.vit_merge_r < 0:
        parser.error(f"--vit_merge_r must not be negative, got {args.vit_merge_r}")
    if args.vit_image_size % ConformerConfig.from_preset(args.vit_preset).patch_size:
        parser.error(f"--vit_image_size {args.vit_image_size} is not a multiple of {args.vit_preset}'s patch size")
    args.merge_label = "/".join(map(str, args.merge_r))
    return args


def main(argv=None):
    args = parse_args(argv)
    allocator = "Allocator: left as it is (--default_allocator)" if args.default_allocator else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train_set, (test_images, test_labels) = load_digits_split(args.image_size)
    num_tokens = 1 + (args.image_size // args.patch_size) ** 2
    digits_schedules = schedules(args, num_tokens, args.layers, args.merge_r)

    runs = []
    for classifier in args.classifiers:
        for mode, schedule in digits_schedules.items():
            print(f"Training classifier={classifier}, merge_mode={mode}, r={'/'.join(map(str, schedule))}", flush=True)
            seed_everything(args.seed)
            model = ConformerForImageClassification(digits_config(args, classifier, mode, schedule))
            start = time.perf_counter()
            train(model, *train_set, epochs=args.epochs, lr=args.lr, args=args, seed=args.seed)
            seconds = time.perf_counter() - start
            logits, _ = predict(model, test_images)
            run = {"head": classifier, "mode": mode, "schedule": "/".join(map(str, schedule))}
            run |= {"tokens left": num_tokens - sum(schedule), "head params": head_parameters(model)}
            run |= {"params": sum(p.numel() for p in model.parameters()), "train s": seconds}
            run |= {"accuracy %": 100 * (logits.argmax(-1) == test_labels).float().mean().item()}
            run |= {"test loss": F.cross_entropy(logits.float(), test_labels).item(), "module": model}
            print(
                f"  test accuracy {run['accuracy %']:.2f}%, loss {run['test loss']:.4f} ({seconds:.0f} s)", flush=True
            )
            runs.append(run)

    timing = argparse.Namespace(
        warmup=args.warmup,
        repeats=args.repeats,
        device="cpu",
        batch_size=args.timing_batch_size,
        iters=args.timing_iters,
    )
    print(f"Timing {len(runs)} digits models: {args.repeats} repeats x {args.timing_iters} passes", flush=True)
    measure(runs, test_images[: args.timing_batch_size], timing)
    for run in runs:
        run["images/s"], run["spread %"] = run.pop("images_per_s"), run.pop("spread_pct")
        run.pop("page_faults")

    if not args.skip_vit:
        vit_config = ConformerConfig.from_preset(args.vit_preset, image_size=args.vit_image_size)
        vit_num_tokens, vit_layers = 1 + vit_config.num_patches, vit_config.num_hidden_layers
        vit_schedules = schedules(args, vit_num_tokens, vit_layers, [args.vit_merge_r])
        entries = []
        for run in runs:
            schedule = vit_schedules[run["mode"]]
            entries.append(
                {"run": run, "schedule": schedule, "module": vit_model(args, run["head"], run["mode"], schedule)}
            )
        timing.batch_size, timing.iters = args.vit_batch_size, args.vit_iters
        pixel_values = torch.randn(args.vit_batch_size, 3, args.vit_image_size, args.vit_image_size)
        print(
            f"Timing {len(entries)} {args.vit_preset} models: {args.repeats} repeats x {args.vit_iters} passes",
            flush=True,
        )
        measure(entries, pixel_values, timing)
        for entry in entries:
            entry["run"] |= {"vit images/s": entry["images_per_s"], "vit spread %": entry["spread_pct"]}
            entry["run"] |= {"vit tokens left": vit_num_tokens - sum(entry["schedule"])}
            entry["run"] |= {"vit head params": head_parameters(entry["module"])}

    summary = summary_rows(runs, args)
    summary_columns = list(summary[0])
    details_columns = ["head", "mode", "schedule", "tokens left", "params", "head params", "train s", "accuracy %"]
    details_columns += ["test loss", "images/s", "spread %"]
    if not args.skip_vit:
        details_columns += ["vit tokens left", "vit head params", "vit images/s", "vit spread %"]
    digits = {column: 1 for column in summary_columns if column.startswith("img/s")}
    digits |= {"accuracy % merged": 2, "accuracy % unmerged": 2, "test loss merged": 4, "test loss unmerged": 4}
    details_digits = {"train s": 0, "accuracy %": 2, "test loss": 4, "images/s": 1, "spread %": 0}
    details_digits |= {"vit images/s": 1, "vit spread %": 0}

    vit = (
        "not timed (--skip_vit)"
        if args.skip_vit
        else (
            f"{args.vit_preset} at {args.vit_image_size} px, random weights, batch {args.vit_batch_size}, fp32, "
            f"{args.vit_iters} pass(es) per measurement, {args.merge_mode} r={args.vit_merge_r} per layer "
            f"(schedule {'/'.join(map(str, vit_schedules[args.merge_mode]))}, {vit_num_tokens} tokens)"
        )
    )
    settings = (
        f"Settings: `{' '.join(sys.argv[1:]) or '(defaults)'}`. Digits (scikit-learn, 8x8 upsampled to "
        f"{args.image_size} px), {len(train_set[1])} train / {len(test_labels)} test images. Each model: hidden "
        f"{args.hidden_size}, {args.layers} layers, {args.heads} heads, patch {args.patch_size} ({num_tokens} tokens), "
        f"trained from scratch for {args.epochs} epochs (AdamW, lr {args.lr}, cosine, batch {args.batch_size}, shifts "
        f"up to {args.max_shift} px), seed {args.seed} for all. merged: {args.merge_mode}, r per layer "
        f"{'/'.join(map(str, digits_schedules[args.merge_mode]))}; unmerged: the same model and training without "
        f"merging. CNN head width {args.cnn_head_channels or ConformerConfig().cnn_head_channels}. "
        f"{environment_line(args.threads or None)}.\n\n"
        "head params: parameters after the final layer norm (CNN head, classifier; the class token, in every model, "
        "is not counted). test loss: mean cross-entropy on the test split. img/s: inference images/s of the whole "
        f"model, median of {args.repeats} interleaved repeats after {args.warmup} warm-up passes (spread %: "
        f"interquartile range over the median); digits models at {args.image_size} px, batch {args.timing_batch_size}, "
        f"{args.timing_iters} passes per measurement; {vit}. {allocator}."
    )
    text = write_results(
        args.name,
        "Classifier heads (digits)",
        settings,
        [("By head", summary, summary_columns, digits), ("Each model", runs, details_columns, details_digits)],
    )
    lines = comparison_lines(summary, args, len(test_labels))
    append_notes(args.name, "Against the class token", lines)
    print(text)
    print("\n".join(lines))
    plot(summary, args, RESULTS_DIR / f"{args.name}.png")
    print(f"wrote {RESULTS_DIR / args.name}.md, .csv, .png")


if __name__ == "__main__":
    main()

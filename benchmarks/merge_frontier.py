"""Merge quality against measured speed: each mode at equal images/s, not at equal r.

    python benchmarks/merge_frontier.py                                    # a few minutes on 2 CPU threads
    python benchmarks/merge_frontier.py --r_values 4 13 --repeats 2        # a quick check

For every merge mode and r of a sweep, a randomly initialised ViT-S_16 (224 px, batch 8, fp32; time does not depend
on the weights) is timed round-robin as throughput.py does. Quality is what the whole schedule throws away: the
schedule's merges are applied, layer after layer, to one fixed set of keys (each step merges the current group means,
weighted by how many keys they hold), and the cost is the scatter of the original unit keys around the means of the
groups they end in (lower is better). Two key sets: clustered synthetic keys, and the layer-0 keys of the same random
ViT-S_16 on the photographs bundled with scikit-image. A point is on the frontier when no other point, of any mode,
is both at least as fast and at least as good. Writes `results/merge_frontier.{md,csv,png}`.
"""

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    MODES,
    REFERENCE_MODE,
    RESULTS_DIR,
    environment_line,
    on_frontier,
    schedule_for,
    set_up_cpu,
    time_models,
    write_results,
)
from merge_quality import capture_keys, clustered_keys, photo_batch
from transformers import set_seed

from configuration_conformer import ConformerConfig
from modeling_conformer import ConformerForImageClassification
from token_merging import MATCHING_FUNCTIONS, merge_source, merge_wavg

KEY_SETS = ("clustered", "photos")


def schedule_scatter(metric: torch.Tensor, mode: str, schedule: list[int]) -> float:
    """Scatter of the unit keys around the means of the groups that `schedule`'s merges leave, mean over the batch."""
    unit = F.normalize(metric.float(), dim=-1)  # [batch, tokens, channels]
    tokens, size = unit, None
    source_map = torch.arange(unit.shape[1]).expand(unit.shape[0], -1)  # original token -> current token
    for merge_r in schedule:
        if merge_r:
            merge, unmerge = MATCHING_FUNCTIONS[mode](tokens, merge_r, size)
            tokens, size = merge_wavg(merge, tokens, size)
            source_map = merge_source(unmerge, source_map, tokens.shape[1])
    # Each token's group mean, gathered back to the original tokens: [batch, tokens, channels]
    group_mean = tokens.gather(1, source_map[..., None].expand(-1, -1, unit.shape[-1]))
    return (unit - group_mean).pow(2).sum(-1).sum(-1).mean().item()


def key_sets(model, seed: int) -> dict:
    """The two metric batches: clustered synthetic keys (8 images, 197 tokens, 64 channels, 30 clusters, noise 1)
    and the model's layer-0 keys on scikit-image's photographs."""
    clustered, _ = clustered_keys(seed, 8, 197, 64, clusters=30, noise=1.0)
    (photos,) = capture_keys(model, photo_batch(224), [0])
    return {"clustered": clustered, "photos": photos}


def at_equal_speed(rows: list[dict], key_set: str) -> list[float]:
    """Each row's scatter over bipartite's at the same images/s (linear between the two bipartite points around it;
    NaN outside bipartite's range, and for the unmerged model)."""
    reference = sorted((row["images/s"], row[key_set]) for row in rows if row["mode"] in (REFERENCE_MODE, "none"))
    speeds, costs = zip(*reference)
    return [
        row[key_set] / np.interp(row["images/s"], speeds, costs)
        if row["mode"] != "none" and speeds[0] <= row["images/s"] <= speeds[-1]
        else float("nan")
        for row in rows
    ]


def frontier_lines(rows: list[dict]) -> list[str]:
    lines = []
    for key_set in KEY_SETS:
        for mode in MODES:
            own = [row for row in rows if row["mode"] == mode]
            kept = [f"r={row['r']}" for row in own if row[f"frontier {key_set}"] == "yes"]
            ratios = [row[f"{key_set} vs bipartite"] for row in own if not np.isnan(row[f"{key_set} vs bipartite"])]
            ratio_range = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"
            lines.append(
                f"{key_set}: {mode} on the frontier at {', '.join(kept) or 'no r'} of {len(own)}; scatter over "
                f"bipartite's at equal images/s {ratio_range}"
            )
    return lines


def plot(rows: list[dict], args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEY_SETS), figsize=(6.5 * len(KEY_SETS), 4.8))
    for ax, key_set in zip(axes, KEY_SETS):
        for index, mode in enumerate(MODES):
            own = sorted((row for row in rows if row["mode"] == mode), key=lambda row: row["r"])
            ax.plot(
                [row["images/s"] for row in own], [row[key_set] for row in own], "o-", color=f"C{index}", label=mode
            )
            for row in own:
                ax.annotate(str(row["r"]), (row["images/s"], row[key_set]), fontsize=6, color=f"C{index}")
        frontier = sorted((row["images/s"], row[key_set]) for row in rows if row[f"frontier {key_set}"] == "yes")
        ax.step(*zip(*frontier), "k:", where="post", linewidth=1, label="frontier")
        ax.set(xlabel="images/s (ViT-S_16, measured)", ylabel="scatter left by the schedule (lower is better)")
        ax.set_title(f"{key_set} keys; labels: r", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Quality against speed, batch {args.batch_size}, fp32, {args.threads} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r_values", nargs="+", type=int, default=[2, 4, 6, 8, 10, 13, 16], help="r per layer")
    parser.add_argument("--batch_size", type=int, default=8, help="images per timed forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed measurements per model (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic keys")
    args = parser.parse_args(argv)
    if min(args.r_values) <= 0 or min(args.batch_size, args.repeats) <= 0 or args.threads < 0:
        parser.error("--r_values, --batch_size and --repeats must be positive, --threads not negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    allocator = set_up_cpu(args.threads)
    set_seed(args.seed)
    config = ConformerConfig.from_preset("ViT-S_16")
    keys = key_sets(ConformerForImageClassification(config).eval(), args.seed)
    points = [("none", 0)] + [(mode, r) for mode in MODES for r in args.r_values]
    rows, models = [], {}
    for index, (mode, r) in enumerate(points):
        schedule = schedule_for(r, 197, config.num_hidden_layers)
        merged = ConformerConfig.from_preset("ViT-S_16", merge_mode=mode, merge_r=schedule)
        models[index] = ConformerForImageClassification._from_config(merged, attn_implementation="sdpa").eval()
        row = {"mode": mode, "r": r, "tokens left": 197 - sum(schedule)}
        rows.append(row | {key_set: schedule_scatter(keys[key_set], mode, schedule) for key_set in KEY_SETS})
    print(f"Timing {len(models)} ViT-S_16 models: {args.repeats} repeats", flush=True)
    timed = time_models(models, torch.randn(args.batch_size, 3, 224, 224), args.repeats, warmup=1)
    for index, row in enumerate(rows):
        row |= {"images/s": timed[index][0], "spread %": timed[index][1], "speed-up": timed[index][0] / timed[0][0]}
    for key_set in KEY_SETS:
        for row, kept in zip(rows, on_frontier([(row["images/s"], row[key_set]) for row in rows])):
            row[f"frontier {key_set}"] = "yes" if kept else "no"
        for row, ratio in zip(rows, at_equal_speed(rows, key_set)):
            row[f"{key_set} vs bipartite"] = ratio

    settings = (
        f"`python benchmarks/merge_frontier.py {' '.join(sys.argv[1:])}`: ViT-S_16, 224 px, random weights, batch "
        f"{args.batch_size}, fp32, CPU; median of {args.repeats} interleaved repeats; {environment_line()}; "
        f"{allocator}.\n\nclustered, photos: scatter of the unit keys around the means of the groups the schedule "
        "leaves (clustered: 8 x 197 synthetic keys, 30 clusters; photos: layer-0 keys of the same ViT-S_16 on 8 "
        "scikit-image photographs), mean over the images. vs bipartite: that scatter over bipartite's at the same "
        "images/s, interpolated between bipartite's points (below 1: better than bipartite at equal speed). frontier: "
        "no other point is both as fast and as good. The machine was shared: speeds are noisy (spread %)."
    )
    columns = ["mode", "r", "tokens left", "images/s", "spread %", "speed-up"]
    for key_set in KEY_SETS:
        columns += [key_set, f"{key_set} vs bipartite", f"frontier {key_set}"]
    digits = {"images/s": 1, "spread %": 0, "speed-up": 2, "clustered": 1, "photos": 1}
    text = write_results(
        "merge_frontier", "Merge quality at equal speed", settings, [("", rows, columns, digits)], frontier_lines(rows)
    )
    print(text)
    plot(rows, args, RESULTS_DIR / "merge_frontier.png")
    print(f"wrote {RESULTS_DIR / 'merge_frontier'}.md, .csv, .png")


if __name__ == "__main__":
    main()

"""The information one merge throws away, for each merge mode at equal r, relative to ToMe's bipartite matching.

    python benchmarks/merge_quality.py                                        # about a minute on 2 CPU threads
    python benchmarks/merge_quality.py --r_values 13 --seeds 1 --skip_photos  # a quick check

Measure: the size-weighted within-group scatter of the normalised metric vectors u_j (the keys averaged over heads),
`sum_G sum_{j in G} size_j * ||u_j - mu_G||^2` with mu_G the size-weighted mean of group G, averaged over the batch.
It is read off the matching's own closures: `merge_wavg` gives each group's mean, `unmerge` hands it back to each
token. Lower is better; the tables give each mode's scatter over bipartite's.

Data: clustered synthetic keys (197 tokens, 64 channels; unit and non-uniform token sizes), a smooth random field on
the 14x14 patch grid, keys of a randomly initialised ViT-S_16 on photographs bundled with scikit-image, and keys of the
digits Conformer that `merge_accuracy.py` trains (skipped with a note when it is not there).
Writes `results/merge_quality.{md,csv,png}`.
"""

import argparse
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import MODES, REFERENCE_MODE, RESULTS_DIR, ROOT, environment_line, set_up_cpu, write_results
from transformers import set_seed

from configuration_conformer import ConformerConfig
from modeling_conformer import ConformerForImageClassification
from token_merging import MATCHING_FUNCTIONS, max_merge_r, merge_by_destination, merge_wavg

SKLEARN_WARD = "sklearn ward (reference)"
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "hubble_deep_field")
CLUSTER_SETTINGS = {
    "clustered k=30 noise=0.5": dict(clusters=30, noise=0.5),
    "clustered k=30 noise=1.0": dict(clusters=30, noise=1.0),
    "clustered k=20 noise=1.5": dict(clusters=20, noise=1.5),
    "clustered k=40 noise=1.0 sizes": dict(clusters=40, noise=1.0, sizes=True),
}


def merge_scatter(metric: torch.Tensor, size: torch.Tensor | None, merge, unmerge) -> float:
    """Size-weighted within-group scatter of the unit metric vectors under one merge, averaged over the batch."""
    unit = F.normalize(metric.float(), dim=-1)  # [batch, tokens, channels]
    weight = torch.ones_like(unit[..., :1]) if size is None else size.float()  # [batch, tokens, 1]
    group_mean, _ = merge_wavg(merge, unit, weight)  # [batch, tokens - r, channels]
    token_spread = (unit - unmerge(group_mean)).pow(2).sum(-1)  # [batch, tokens]: ||u_j - mu_G(j)||^2
    return (weight[..., 0] * token_spread).sum(-1).mean().item()


def sklearn_ward(metric: torch.Tensor, r: int, size: torch.Tensor | None = None):
    """Reference, not a model mode: scikit-learn's Ward clustering of the patch tokens' unit vectors into
    `tokens - 1 - r` groups, one image at a time (as ATC does); the class token stays alone. Ignores `size`."""
    from sklearn.cluster import AgglomerativeClustering

    unit = F.normalize(metric.float(), dim=-1).cpu().numpy()
    batch, num_tokens, _ = unit.shape
    destination = np.zeros((batch, num_tokens), dtype=np.int64)
    for image in range(batch):
        clustering = AgglomerativeClustering(n_clusters=num_tokens - 1 - r, linkage="ward")
        destination[image, 1:] = 1 + clustering.fit_predict(unit[image, 1:])
    return merge_by_destination(torch.from_numpy(destination).to(metric.device), num_tokens - r)


def matching_functions(modes: list[str], reference: bool) -> dict:
    functions = {mode: MATCHING_FUNCTIONS[mode] for mode in modes}
    if reference:
        functions[SKLEARN_WARD] = sklearn_ward
    return functions


def max_r(num_tokens: int, name: str) -> int:
    return num_tokens - 2 if name == SKLEARN_WARD else max_merge_r(num_tokens, name)


def ms_per_call(functions: dict, metric, size, r, calls: int, feature_channels: int) -> dict:
    """Median milliseconds of one layer's merge per mode: the matching, then `merge_wavg` of [batch, tokens,
    feature_channels] features, as a layer runs them. The modes take turns call by call, so the machine's noise falls
    on all of them alike; scikit-learn (ten times slower) runs one call in ten."""
    features = torch.randn(*metric.shape[:2], feature_channels)

    def one_layer(function):
        merge, _ = function(metric, r, size)
        merge_wavg(merge, features, size)

    times = {name: [] for name in functions}
    for function in functions.values():
        one_layer(function)  # warm-up
    for call in range(calls):
        for name, function in functions.items():
            if function is sklearn_ward and call % 10:
                continue
            start = time.perf_counter()
            one_layer(function)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------------------------
# Data: each set is a list of (metric [batch, tokens, channels], size [batch, tokens, 1] or None) batches
# --------------------------------------------------------------------------------------------------------------------


def clustered_keys(seed, batch, num_tokens, channels, clusters, noise, sizes=False):
    """Tokens drawn around `clusters` random centres per image (centre + noise * N(0, 1)); optional sizes 1-6."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, clusters, channels, generator=generator)
    labels = torch.randint(0, clusters, (batch, num_tokens), generator=generator)
    keys = centres.gather(1, labels[..., None].expand(-1, -1, channels))
    keys = keys + noise * torch.randn(batch, num_tokens, channels, generator=generator)
    size = torch.randint(1, 7, (batch, num_tokens, 1), generator=generator).float() if sizes else None
    return keys, size


def smooth_field_keys(seed, batch, num_tokens, channels, rank=6, noise=0.5):
    """A random low-frequency field on the patch grid (like image content) plus noise; the class token apart."""
    generator = torch.Generator().manual_seed(seed)
    side = int(round((num_tokens - 1) ** 0.5))
    rows, cols = torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    positions = torch.stack([rows, cols], -1).reshape(side * side, 2) / side  # [patches, 2]
    frequencies = 3 * torch.randn(batch, rank, 2, generator=generator)
    phases = 2 * torch.pi * torch.rand(batch, rank, 1, generator=generator)
    fields = torch.cos(frequencies @ positions.T + phases)  # [batch, rank, patches]
    directions = torch.randn(batch, rank, channels, generator=generator)
    keys = fields.transpose(1, 2) @ directions + torch.randn(batch, 1, channels, generator=generator)
    keys = keys + noise * torch.randn(batch, side * side, channels, generator=generator)
    cls = 2 * torch.randn(batch, 1, channels, generator=generator)
    return torch.cat([cls, keys], 1), None


def synthetic_sets(seeds: int, batch_size: int, num_tokens: int, channels: int) -> dict:
    shape = (batch_size, num_tokens, channels)
    sets = {
        name: [clustered_keys(seed, *shape, **kwargs) for seed in range(seeds)]
        for name, kwargs in CLUSTER_SETTINGS.items()
    }
    sets["smooth field on the grid"] = [smooth_field_keys(seed, *shape) for seed in range(seeds)]
    return sets


def capture_keys(model, pixel_values, layers: list[int]) -> list[torch.Tensor]:
    """The merge metric (keys averaged over heads: [batch, tokens, head_dim]) of the given layers of an unmerged
    Conformer, as `ConformerLayer` computes it from the attention's keys [batch, heads, tokens, head_dim]."""
    captured = {}
    hooks = [
        model.conformer.layers[layer].attention.register_forward_hook(
            lambda module, inputs, output, layer=layer: captured.__setitem__(layer, output[2].mean(dim=1))
        )
        for layer in layers
    ]
    with torch.inference_mode():
        model(pixel_values)
    for hook in hooks:
        hook.remove()
    return [captured[layer] for layer in layers]


def photo_batch(image_size: int) -> torch.Tensor:
    """scikit-image's bundled photographs, centre-cropped, resized to `image_size`, scaled to [-1, 1]."""
    import skimage.data

    images = []
    for name in PHOTOS:
        image = torch.tensor(np.asarray(getattr(skimage.data, name)()), dtype=torch.float32) / 255.0
        image = image[..., None].expand(-1, -1, 3) if image.ndim == 2 else image[..., :3]
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side].permute(2, 0, 1)[None]  # [1, 3, side, side]
        images.append(F.interpolate(image, size=(image_size, image_size), mode="bilinear", antialias=True))
    return (torch.cat(images) - 0.5) / 0.5


def photo_sets(layers: list[int], seed: int) -> dict:
    set_seed(seed)
    model = ConformerForImageClassification(ConformerConfig.from_preset("ViT-S_16", num_labels=0)).eval()
    keys = capture_keys(model, photo_batch(224), layers)
    return {f"photos, random ViT-S_16, layers {','.join(map(str, layers))}": [(metric, None) for metric in keys]}


def digits_sets(model_dir: str, num_images: int) -> dict:
    from conformer_vit.data import digits_tensors

    model_dir = ROOT / model_dir  # an absolute path stays as it is
    if not (model_dir / "config.json").exists():
        print(f"note: no trained digits model in {model_dir}: run merge_accuracy.py first; skipping that data")
        return {}
    model = ConformerForImageClassification.from_pretrained(model_dir).eval()
    _, (test_images, _) = digits_tensors(model.config.image_size)
    layers = list(range(model.config.num_hidden_layers))
    keys = capture_keys(model, test_images[:num_images], layers)
    return {f"digits, trained model, layers 0-{layers[-1]}": [(metric, None) for metric in keys]}


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def evaluate(sets: dict, functions: dict, r_values: list[int], timing_calls: int, feature_channels: int) -> list[dict]:
    """One row per data set, r and mode: mean scatter, mean ratio to bipartite's on the same batch, ms per call."""
    rows = []
    for data_name, batches in sets.items():
        num_tokens = batches[0][0].shape[1]
        for r in r_values:
            if any(r > max_r(num_tokens, name) for name in functions):
                print(f"  skip {data_name} r={r}: more than some mode can remove from {num_tokens} tokens")
                continue
            with torch.inference_mode():
                scatter = {
                    name: [merge_scatter(metric, size, *function(metric, r, size)) for metric, size in batches]
                    for name, function in functions.items()
                }
                timing = ms_per_call(functions, *batches[0], r, timing_calls, feature_channels)
                for name in functions:
                    ratios = [value / base for value, base in zip(scatter[name], scatter[REFERENCE_MODE])]
                    row = {"data": data_name, "tokens": num_tokens, "r": r, "mode": name}
                    row |= {"scatter": statistics.mean(scatter[name]), "ratio": statistics.mean(ratios)}
                    row |= {"ms/call": timing[name], "time ratio": timing[name] / timing[REFERENCE_MODE]}
                    rows.append(row)
            print(f"  {data_name} r={r} done", flush=True)
    return rows


def mean_ratios(rows: list[dict], names: list[str]) -> list[dict]:
    """Each data set's ratio to bipartite, averaged over r, per mode."""
    table = []
    for data in dict.fromkeys(row["data"] for row in rows):
        own = [row for row in rows if row["data"] == data]
        table.append({"data": data} | {n: statistics.mean(r["ratio"] for r in own if r["mode"] == n) for n in names})
    return table


def plot(rows: list[dict], names: list[str], path):
    """One panel per r: each mode's ratio per data set (bipartite is the line at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r_values = list(dict.fromkeys(row["r"] for row in rows))
    data_names = list(dict.fromkeys(row["data"] for row in rows))
    fig, axes = plt.subplots(1, len(r_values), figsize=(4.5 * len(r_values), 5.5), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], r_values):
        for index, name in enumerate(names):
            points = [
                (position + (index - (len(names) - 1) / 2) * 0.15, row["ratio"])
                for position, data in enumerate(data_names)
                for row in rows
                if row["r"] == r and row["data"] == data and row["mode"] == name
            ]
            ax.plot(*zip(*points), "o", color=f"C{index + 1}", label=name)
        ax.axhline(1.0, color="C0", linewidth=1.5, label=REFERENCE_MODE)
        ax.set_xticks(range(len(data_names)), data_names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"r = {r}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("scatter / bipartite's (lower is better)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r_values", nargs="+", type=int, default=[8, 13, 16, 48], help="tokens removed by a merge")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="merge modes")
    parser.add_argument("--seeds", type=int, default=3, help="synthetic batches per setting (ratios are averaged)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per synthetic batch")
    parser.add_argument("--num_tokens", type=int, default=197, help="tokens per synthetic image, class token included")
    parser.add_argument("--channels", type=int, default=64, help="channels of the synthetic keys (ViT-S/B head dim)")
    parser.add_argument("--photo_layers", nargs="+", type=int, default=[0, 6, 11], help="ViT-S_16 layers taken")
    parser.add_argument("--skip_photos", action="store_true", help="leave out the photographs")
    parser.add_argument("--digits_model", default="runs/digits_conformer", help="merge_accuracy.py's model ('' skips)")
    parser.add_argument("--digits_images", type=int, default=32, help="digits test images per batch of keys")
    parser.add_argument("--no_reference", action="store_true", help="leave out the scikit-learn Ward reference")
    parser.add_argument("--timing_calls", type=int, default=20, help="calls timed per row (median reported)")
    parser.add_argument("--feature_channels", type=int, default=384, help="features merge_wavg merges (ViT-S: 384)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ViT-S_16")
    args = parser.parse_args(argv)
    if REFERENCE_MODE not in args.modes:
        parser.error(f"--modes must include {REFERENCE_MODE}: ratios are taken against it")
    counts = (args.seeds, args.batch_size, args.num_tokens, args.channels, args.digits_images, args.timing_calls)
    if min(*counts, args.feature_channels) <= 0:
        parser.error(
            "--seeds, --batch_size, --num_tokens, --channels, --digits_images, --timing_calls and --feature_channels "
            "must be positive"
        )
    if min(args.r_values) <= 0 or args.num_tokens < 3:
        parser.error("--r_values must be positive and --num_tokens at least 3")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_up_cpu(args.threads)  # glibc keeps freed memory, as in the model timings
    functions = matching_functions(args.modes, reference=not args.no_reference)
    sets = synthetic_sets(args.seeds, args.batch_size, args.num_tokens, args.channels)
    sets |= {} if args.skip_photos else photo_sets(args.photo_layers, args.seed)
    sets |= digits_sets(args.digits_model, args.digits_images) if args.digits_model else {}
    rows = evaluate(sets, functions, args.r_values, args.timing_calls, args.feature_channels)
    names = [name for name in functions if name != REFERENCE_MODE]

    settings = (
        f"`python benchmarks/merge_quality.py {' '.join(sys.argv[1:])}`. Synthetic: {args.seeds} batches of "
        f"{args.batch_size} images x {args.num_tokens} tokens x {args.channels} channels per setting. Real features: "
        "keys averaged over heads of each listed layer of an unmerged model, one batch per layer (photos: 8 "
        f"scikit-image photographs at 224 px; digits: {args.digits_images} test images). {environment_line()}.\n\n"
        "scatter: size-weighted within-group scatter of the unit metric vectors after one merge of r tokens, mean over "
        "the batch (and the batches of a row). ratio: scatter over bipartite's on the same batch, averaged. ms/call: "
        f"median time of one layer's merge on the row's first batch (the matching, then `merge_wavg` of "
        f"{args.feature_channels}-channel features), the modes timed in turn; time ratio: over bipartite's. "
        f"{SKLEARN_WARD}: scikit-learn's Ward clustering "
        "per image (ATC's route), the floor agglomeration reaches; not a model mode, and it ignores token sizes."
    )
    columns = ["data", "tokens", "r", "mode", "scatter", "ratio", "ms/call", "time ratio"]
    sections = [
        ("Per data set and r", rows, columns, {"scatter": 2, "ratio": 3, "ms/call": 2, "time ratio": 2}),
        ("Mean ratio over r, per data set", mean_ratios(rows, names), ["data"] + names, {}),
    ]
    print(
        write_results("merge_quality", "Merge quality: scatter thrown away, relative to bipartite", settings, sections)
    )
    plot(rows, names, RESULTS_DIR / "merge_quality.png")
    print(f"wrote {RESULTS_DIR / 'merge_quality'}.md, .csv, .png")


if __name__ == "__main__":
    main()

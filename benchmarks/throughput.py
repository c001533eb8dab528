"""Images per second of Conformer for each merge mode over a sweep of r, beside unmerged references of the same shape
(timm's `VisionTransformer`, transformers' `ViTForImageClassification`), with the theoretical FLOP ratio as the limit.

    python benchmarks/throughput.py                                   # ViT-S_16, 224 px, batch 8, fp32, CPU, 2 threads
    python benchmarks/throughput.py --preset ViT-B_16 --device cuda --dtype fp16 --batch_size 256 --r_values 8,16

All models run interleaved (round-robin, one timed measurement of each per repeat) so that a change in the machine's
load hits them alike; the median over repeats is reported. Writes `results/throughput_*.{md,csv,png}`.
"""

import argparse
import os
import sys

import torch
from common import (
    MODES,
    RESULTS_DIR,
    append_notes,
    environment_line,
    keep_freed_memory,
    measure,
    merge_schedule,
    parse_int_list,
    parse_modes,
    seed_everything,
    synchronize,
    write_results,
)

from configuration_conformer import PRESETS, ConformerConfig
from modeling_conformer import ConformerForImageClassification

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Issue 6's bars: (preset, device, dtype, image size) -> [(mode, r, least speed-up over the unmerged Conformer)].
SPEEDUP_BARS = {
    ("ViT-S_16", "cpu", "fp32", 224): [("bipartite", 13, 1.55), ("submodular", 13, 1.45)],
    ("ViT-B_16", "cuda", "fp16", 224): [("bipartite", 16, 1.85)],
}
REFERENCE_BAR = 0.95  # Conformer without merging / timm, at least


# --------------------------------------------------------------------------------------------------------------------
# Theoretical cost
# --------------------------------------------------------------------------------------------------------------------


def layer_macs(num_tokens: int, merge_r: int, hidden_size: int, intermediate_size: int) -> int:
    """Multiply-accumulates of one transformer layer that merges `merge_r` tokens between attention and MLP.

    q, k, v and output projections: 4 N D^2; attention scores and weighted sum: 2 N^2 D; MLP: 2 (N - r) D D_mlp.
    Layer norms, softmax, GELU and the merge itself are left out (a few percent at most).
    """
    attention = 4 * num_tokens * hidden_size**2 + 2 * num_tokens**2 * hidden_size
    mlp = 2 * (num_tokens - merge_r) * hidden_size * intermediate_size
    return attention + mlp


def encoder_macs(num_tokens: int, schedule: list[int], hidden_size: int, intermediate_size: int) -> int:
    """MACs of the transformer layers for a per-layer r schedule (zeros: unmerged). Patch embedding and head are not
    counted: they do not change with merging, and this is the convention that gives ToMe's 1.72x (ViT-S_16, r=13)
    and 2.02x (ViT-B_16, r=16) at 224 px."""
    total = 0
    for merge_r in schedule:
        total += layer_macs(num_tokens, merge_r, hidden_size, intermediate_size)
        num_tokens -= merge_r
    return total


def flop_ratio(config: ConformerConfig, schedule: list[int]) -> float:
    """Unmerged over merged encoder cost: the speed-up merging could give if time followed FLOPs."""
    num_tokens = 1 + config.num_patches
    unmerged = encoder_macs(num_tokens, [0] * len(schedule), config.hidden_size, config.intermediate_size)
    return unmerged / encoder_macs(num_tokens, schedule, config.hidden_size, config.intermediate_size)


def check_flop_convention():
    """The counting convention must reproduce the issue's limits; fail loudly if someone changes it."""
    for preset, r, expected in (("ViT-S_16", 13, 1.72), ("ViT-B_16", 16, 2.02)):
        config = ConformerConfig.from_preset(preset, image_size=224)
        schedule = merge_schedule(1 + config.num_patches, r, config.num_hidden_layers)
        ratio = flop_ratio(config, schedule)
        if round(ratio, 2) != expected:
            raise AssertionError(f"FLOP ratio of {preset} at r={r} is {ratio:.3f}, expected {expected}")


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def build_timm(config: ConformerConfig):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        class_token=True,
        global_pool="token",
        num_classes=config.num_labels,
    )


def build_transformers_vit(config: ConformerConfig):
    from transformers import ViTConfig, ViTForImageClassification

    vit_config = ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        num_labels=config.num_labels,
    )
    return ViTForImageClassification._from_config(vit_config, attn_implementation="sdpa")


def build_conformer(args, mode: str, schedule: list[int]):
    config = ConformerConfig.from_preset(
        args.preset, image_size=args.image_size, num_labels=1000, merge_mode=mode, merge_r=schedule
    )
    return ConformerForImageClassification._from_config(config, attn_implementation="sdpa")


def build_models(args, config: ConformerConfig) -> list[dict]:
    """One entry per timed model: name, mode, nominal r, schedule and the module."""
    num_tokens, layers = 1 + config.num_patches, config.num_hidden_layers
    entries = []
    if not args.skip_references:
        entries.append(dict(model="timm ViT", mode="-", r=0, schedule=[0] * layers, module=build_timm(config)))
        entries.append(
            dict(model="transformers ViT", mode="-", r=0, schedule=[0] * layers, module=build_transformers_vit(config))
        )
    unmerged = build_conformer(args, "none", [0] * layers)
    entries.append(dict(model="Conformer", mode="none", r=0, schedule=[0] * layers, module=unmerged))
    for mode in args.modes:
        for r in args.r_values:
            schedule = merge_schedule(num_tokens, r, layers)
            entries.append(
                dict(model="Conformer", mode=mode, r=r, schedule=schedule, module=build_conformer(args, mode, schedule))
            )
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    for entry in entries:
        entry["module"] = entry["module"].to(device=device, dtype=dtype).eval()
    return entries


# --------------------------------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------------------------------


def profile_merges(entries: list[dict], pixel_values, args) -> str:
    """torch.profiler's table of the operators a merged forward pass spends its time in (first mode, largest r)."""
    from torch.profiler import ProfilerActivity, profile

    merged = [entry for entry in entries if entry["mode"] not in ("none", "-")]
    if not merged:
        return ""
    entry = max(merged, key=lambda e: (e["mode"] == merged[0]["mode"], e["r"]))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as profiler:
        for _ in range(args.iters):
            entry["module"](pixel_values)
        synchronize(args.device)
    sort_by = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=15)
    return f"Profile of Conformer {entry['mode']} r={entry['r']}:\n{table}"


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def make_rows(entries: list[dict], config: ConformerConfig) -> list[dict]:
    baseline = next(e for e in entries if e["model"] == "Conformer" and e["mode"] == "none")["images_per_s"]
    rows = []
    for entry in entries:
        ratio = flop_ratio(config, entry["schedule"])
        speedup = entry["images_per_s"] / baseline
        rows.append(
            {
                "model": entry["model"],
                "mode": entry["mode"],
                "r": entry["r"],
                "tokens left": 1 + config.num_patches - sum(entry["schedule"]),
                "images/s": entry["images_per_s"],
                "spread %": entry["spread_pct"],
                "speed-up": speedup,
                "FLOP ratio": ratio,
                "of limit": speedup / ratio,
                "page faults/pass": entry["page_faults"],
            }
        )
    return rows


def bar_lines(rows: list[dict], args) -> list[str]:
    """PASS/FAIL for issue 6's bars that apply to these settings."""
    lines = []
    for mode, r, least in SPEEDUP_BARS.get((args.preset, args.device, args.dtype, args.image_size), []):
        row = next((row for row in rows if row["mode"] == mode and row["r"] == r), None)
        if row is None:
            lines.append(f"bar {mode} r={r} >= {least:.2f}x: not measured (add r={r} and mode {mode})")
        else:
            verdict = "PASS" if row["speed-up"] >= least else "FAIL"
            lines.append(f"bar {mode} r={r} >= {least:.2f}x: {row['speed-up']:.3f}x {verdict}")
    timm_row = next((row for row in rows if row["model"] == "timm ViT"), None)
    if timm_row is not None:
        ratio = 1 / timm_row["speed-up"]  # Conformer(none) / timm
        verdict = "PASS" if ratio >= REFERENCE_BAR else "FAIL"
        lines.append(f"bar Conformer(none) / timm >= {REFERENCE_BAR:.2f}: {ratio:.3f} {verdict}")
    return lines


def plot(rows: list[dict], args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    merged = [row for row in rows if row["mode"] not in ("none", "-")]
    r_values = sorted({row["r"] for row in merged})
    flop_by_r = {row["r"]: row["FLOP ratio"] for row in merged}
    ax.plot(r_values, [flop_by_r[r] for r in r_values], "k--", label="FLOP ratio (limit)")
    for mode in args.modes:
        points = sorted((row["r"], row["speed-up"]) for row in merged if row["mode"] == mode)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"Conformer {mode}")
    for row in rows:
        if row["model"] in ("timm ViT", "transformers ViT"):
            color = "gray" if row["model"] == "timm ViT" else "tab:olive"
            ax.axhline(row["speed-up"], linestyle=":", color=color, label=f"{row['model']} (unmerged)")
    bars = SPEEDUP_BARS.get((args.preset, args.device, args.dtype, args.image_size), [])
    for index, (_mode, r, least) in enumerate(bars):
        ax.plot([r], [least], marker="_", markersize=20, color="red", label="issue 6 bar" if index == 0 else None)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("r (tokens merged per layer)")
    ax.set_ylabel("speed-up over unmerged Conformer")
    threads = f", {args.threads} threads" if args.device == "cpu" else ""
    ax.set_title(f"{args.preset}, {args.image_size} px, batch {args.batch_size}, {args.dtype}, {args.device}{threads}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plain_presets = [name for name, shape in PRESETS.items() if not shape.get("backbone_depths")]
    parser.add_argument("--preset", default="ViT-S_16", choices=plain_presets, help="model shape (plain ViT presets)")
    parser.add_argument("--image_size", type=int, default=224, help="input resolution in pixels (square)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and inputs dtype")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument(
        "--r_values", type=parse_int_list, default=[4, 8, 13, 16], help="nominal r per layer to sweep, e.g. 4,8,13,16"
    )
    parser.add_argument(
        "--modes", type=parse_modes, default=list(MODES), help=f"merge modes to time (default: {','.join(MODES)})"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed measurements per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes per model before timing")
    parser.add_argument("--iters", type=int, default=1, help="forward passes per timed measurement")
    parser.add_argument("--skip_references", action="store_true", help="do not time the timm and transformers ViTs")
    parser.add_argument(
        "--default_allocator",
        action="store_true",
        help="leave glibc's allocator as it is (by default it is told to keep freed memory; see the README)",
    )
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of a merge")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument("--name", default=None, help="results file stem (default: throughput_<settings>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    for flag in ("image_size", "batch_size", "repeats", "iters"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.warmup < 0 or args.threads < 0 or any(r < 0 for r in args.r_values):
        parser.error("--warmup, --threads and --r_values must not be negative")
    if args.image_size % ConformerConfig.from_preset(args.preset).patch_size:
        parser.error(f"--image_size {args.image_size} is not a multiple of {args.preset}'s patch size")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_flop_convention()
    allocator = "Allocator: left as it is (--default_allocator)" if args.default_allocator else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if args.device == "cpu" and args.dtype == "fp16":
        print("note: fp16 on CPU runs slow fallback kernels; its timings say little", file=sys.stderr)

    config = ConformerConfig.from_preset(args.preset, image_size=args.image_size, num_labels=1000)
    entries = build_models(args, config)
    pixel_values = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size, device=args.device, dtype=DTYPES[args.dtype]
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"Timing {len(entries)} models on {device_name}: {args.repeats} repeats x {args.iters} passes", flush=True)
    measure(entries, pixel_values, args)

    rows = make_rows(entries, config)
    name = args.name or f"throughput_{args.preset}_{args.image_size}px_b{args.batch_size}_{args.dtype}_{args.device}"
    settings = (
        f"Settings: `{' '.join(sys.argv[1:]) or '(defaults)'}`; {args.preset}, {args.image_size} px, batch "
        f"{args.batch_size}, {args.dtype}, {device_name}; median of {args.repeats} interleaved repeats of {args.iters} "
        f"pass(es) after {args.warmup} warm-up passes. {environment_line(args.threads or None)}.\n\n"
        "speed-up: images/s over the unmerged Conformer's. FLOP ratio: unmerged over merged MACs of the transformer "
        "layers (qkv + output projections 4ND^2, attention 2N^2D, MLP 2ND*D_mlp on N - r tokens, merging after "
        "attention; patch embedding and head not counted). of limit: speed-up / FLOP ratio. spread %: interquartile "
        "range of the repeats over the median (the noise of this run). page faults/pass: minor page faults of the "
        "process per timed pass (memory the allocator took fresh from the system; see the README). r is clamped "
        "where a layer has too few tokens (ToMe's rule), identically for every mode. "
        f"{allocator}; environment: "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
        f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', 'unset')}."
    )
    columns = ["model", "mode", "r", "tokens left", "images/s", "spread %", "speed-up", "FLOP ratio", "of limit"]
    columns += ["page faults/pass"]
    digits = {"images/s": 1, "spread %": 0, "speed-up": 2, "FLOP ratio": 2, "of limit": 2, "page faults/pass": 0}
    text = write_results(name, "Throughput", settings, [("", rows, columns, digits)])
    lines = bar_lines(rows, args)
    append_notes(name, "Bars (issue 6)", lines)
    print(text)
    print("\n".join(lines))
    plot(rows, args, RESULTS_DIR / f"{name}.png")
    print(f"wrote {RESULTS_DIR / name}.md, .csv, .png")
    if args.profile:
        print(profile_merges(entries, pixel_values, args))


if __name__ == "__main__":
    main()

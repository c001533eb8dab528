"""Images per second of Conformer for each merge mode over a sweep of r, beside unmerged references of the same shape
(timm's `VisionTransformer`, transformers' `ViTForImageClassification`), eager and (`--compile`) torch.compile'd, with
the FLOP ratio as the limit.

    python benchmarks/throughput.py                          # ViT-S_16, 224 px, batch 8, fp32, CPU, 2 threads
    python benchmarks/throughput.py --r_values 13 --compile  # compiled columns beside eager
    python benchmarks/throughput.py --r_values 8 --profile   # + where the unmerged model and timm spend their time
    bash benchmarks/gpu_check.sh                             # ViT-B_16 on one GPU, fp16 and bf16, r = 0, 8, 16

All models are built and warmed up first, then timed round-robin; the median over repeats is reported.
Writes `results/<name>.{md,csv,png}`.
"""

import argparse
import copy
import sys
import time

import torch
import transformers
from common import (
    MODES,
    RESULTS_DIR,
    environment_line,
    flop_ratio,
    set_up_cpu,
    time_models,
    write_results,
)
from transformers import ViTConfig, ViTForImageClassification, set_seed

from configuration_conformer import PRESETS, ConformerConfig
from conformer_vit.sweep import synchronize
from conformer_vit.timm_reference import timm_vit
from modeling_conformer import ConformerForImageClassification
from token_merging import merge_schedule

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCES = ("timm ViT", "transformers ViT")
# `--source`: a transformers class of the ViT family to time beside the Conformer converted from it, and its prefix
# tokens (class, distillation).
FAMILY_SOURCES = {
    "deit": ("DeiTConfig", "DeiTForImageClassification", 2),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", 1),
}


def family_source(source: str, config: ConformerConfig):
    """The transformers model of `source` in `config`'s shape, random weights."""
    config_class, model_class, _ = FAMILY_SOURCES[source]
    shape = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers)
    shape |= dict(num_attention_heads=config.num_attention_heads, image_size=config.image_size)
    shape |= dict(patch_size=config.patch_size, num_labels=config.num_labels, layer_norm_eps=config.layer_norm_eps)
    if source == "dinov2":
        shape["mlp_ratio"] = config.intermediate_size // config.hidden_size  # an int in Dinov2Config
    else:
        shape["intermediate_size"] = config.intermediate_size
    source_config = getattr(transformers, config_class)(**shape)
    return getattr(transformers, model_class)._from_config(source_config, attn_implementation="sdpa")


def build_model(name: str, config: ConformerConfig, mode: str, schedule: list[int], source: str = "vit"):
    """A model of `config`'s shape with random weights: a reference, or a Conformer merging `schedule` with `mode`
    (with `source`, the reference is that transformers class and the Conformer is converted from it)."""
    if source != "vit":
        model = family_source(source, config)
        if name.startswith("transformers"):
            return model
        merging = dict(merge_mode=mode, merge_r=list(schedule))
        return ConformerForImageClassification.from_transformers(model, attn_implementation="sdpa", **merging)
    if name == "timm ViT":
        return timm_vit(config)
    if name == "transformers ViT":
        shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size")
        vit_config = ViTConfig(**{key: getattr(config, key) for key in shape}, patch_size=config.patch_size)
        vit_config.num_labels, vit_config.layer_norm_eps = config.num_labels, config.layer_norm_eps
        return ViTForImageClassification._from_config(vit_config, attn_implementation="sdpa")
    merged = copy.deepcopy(config)
    merged.merge_mode, merged.merge_r = mode, list(schedule)
    return ConformerForImageClassification._from_config(merged, attn_implementation="sdpa")


def compile_model(module, pixel_values, backend: str):
    """torch.compile with `fullgraph=True`, or without it when the forward does not trace as one graph. Returns the
    compiled model, whether it is one graph, and the seconds the first (compiling) call took."""
    # Every model recompiles the same forward code; dynamo's default of 8 recompiles per code object is too few.
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit
    start = time.perf_counter()
    for fullgraph in (True, False):
        compiled = torch.compile(module, fullgraph=fullgraph, backend=backend)
        try:
            with torch.inference_mode():
                compiled(pixel_values)
            synchronize(pixel_values.device)
            return compiled, fullgraph, time.perf_counter() - start
        except Exception as error:  # dynamo's errors have no common base class short of Exception
            if not fullgraph:
                raise
            print(f"  not one graph ({type(error).__name__}): compiling with graph breaks", file=sys.stderr)
    raise AssertionError("unreachable")


def peak_memory_mib(module, pixel_values) -> float:
    """Memory one forward pass allocates above what was allocated before it (CUDA only; NaN elsewhere)."""
    if pixel_values.device.type != "cuda":
        return float("nan")
    synchronize(pixel_values.device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        module(pixel_values)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def host_sync_check(module, pixel_values) -> str:
    """Whether a forward pass makes the host wait for the device (`torch.cuda.set_sync_debug_mode("error")`)."""
    if pixel_values.device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            module(pixel_values)
        return "none"
    except RuntimeError as error:
        return "SYNC: " + str(error).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def build_entries(args, config: ConformerConfig) -> list[dict]:
    """Every timed model as a dict: its description and its module, in every dtype, eager and (`--compile`) compiled."""
    layers = config.num_hidden_layers
    prefix = FAMILY_SOURCES[args.source][2] if args.source != "vit" else 1
    references = [f"transformers {FAMILY_SOURCES[args.source][1]}"] if args.source != "vit" else REFERENCES
    kinds = [] if args.skip_references else [(name, "-", 0) for name in references]
    kinds += [("Conformer", "none", 0)] + [("Conformer", mode, r) for mode in args.modes for r in args.r_values]
    entries = []
    for dtype in args.dtypes:
        pixel_values = args.inputs[dtype]
        for name, mode, r in kinds:
            tokens = prefix + config.num_patches
            schedule = merge_schedule(r, tokens, layers, modes=MODES, num_prefix_tokens=prefix)
            set_seed(args.seed)
            module = build_model(name, config, mode, schedule, args.source).to(args.device, DTYPES[dtype]).eval()
            entry = dict(model=name, mode=mode, r=r, schedule=schedule, dtype=dtype, run="eager", compiled=False)
            entry["tokens"] = tokens
            entry["module"] = module
            entry |= {"peak MiB": peak_memory_mib(module, pixel_values), "compile s": float("nan")}
            entries.append(entry)
            if args.compile:
                print(f"compiling {name} {mode} r={r} {dtype}", file=sys.stderr, flush=True)
                compiled, fullgraph, seconds = compile_model(module, pixel_values, args.compile_backend)
                run = "compiled" if fullgraph else "compiled, graph breaks"
                entries.append(entry | {"run": run, "compiled": True, "module": compiled, "compile s": seconds})
    return entries


def measure(entries: list[dict], args):
    """Time the entries of each dtype round-robin among themselves; store images/s and the spread."""
    for dtype in args.dtypes:
        group = {index: entry["module"] for index, entry in enumerate(entries) if entry["dtype"] == dtype}
        timed = time_models(group, args.inputs[dtype], args.repeats, args.warmup, args.iters)
        for index, (images_per_s, spread) in timed.items():
            entries[index] |= {"images/s": images_per_s, "spread %": spread}


def make_rows(entries: list[dict], config: ConformerConfig) -> list[dict]:
    """Speed-up: over the unmerged Conformer of the same dtype and run (eager or compiled)."""
    baseline = {(e["dtype"], e["compiled"]): e["images/s"] for e in entries if e["mode"] == "none"}
    rows = []
    for entry in entries:
        row = {key: value for key, value in entry.items() if key not in ("module", "schedule", "compiled", "tokens")}
        row["tokens left"] = entry["tokens"] - sum(entry["schedule"])
        row["speed-up"] = entry["images/s"] / baseline[entry["dtype"], entry["compiled"]]
        row["FLOP ratio"] = flop_ratio(config, entry["schedule"])
        row["of limit"] = row["speed-up"] / row["FLOP ratio"]
        rows.append(row)
    return rows


def sync_lines(entries: list[dict], args) -> list[str]:
    """The host-sync check of every mode, eager, at the largest r."""
    lines = []
    for mode in args.modes:
        entry = max(
            (e for e in entries if e["mode"] == mode and e["run"] == "eager"), key=lambda e: (e["dtype"], e["r"])
        )
        verdict = host_sync_check(entry["module"], args.inputs[entry["dtype"]])
        lines.append(f"host sync in a {mode} r={entry['r']} {entry['dtype']} forward: {verdict}")
    return lines


def profile_lines(entries: list[dict], args) -> list[str]:
    """torch.profiler's top operators (self time) of the unmerged Conformer and of timm, eager, first dtype."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_by = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    tables = []
    for entry in entries:
        if entry["run"] != "eager" or entry["dtype"] != args.dtypes[0] or entry["mode"] not in ("none", "-"):
            continue
        with torch.inference_mode(), profile(activities=activities) as profiler:
            for _ in range(max(3, args.iters)):
                entry["module"](args.inputs[entry["dtype"]])
            synchronize(args.device)
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=12)
        tables.append(f"{entry['model']} ({entry['mode']}):\n{table}")
    return tables


def plot(rows: list[dict], args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.dtypes), figsize=(6.5 * len(args.dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], args.dtypes):
        own = [row for row in rows if row["dtype"] == dtype]
        merged = sorted((row for row in own if row["mode"] in MODES), key=lambda row: row["r"])
        flop_by_r = {row["r"]: row["FLOP ratio"] for row in merged}
        ax.plot(list(flop_by_r), list(flop_by_r.values()), "k--", label="FLOP ratio (limit)")
        runs = dict.fromkeys(row["run"] for row in own)
        for mode, run in ((mode, run) for mode in args.modes for run in runs):
            points = [(row["r"], row["speed-up"]) for row in merged if row["mode"] == mode and row["run"] == run]
            style = "o-" if run == "eager" else "s:"
            ax.plot(*zip(*points), style, color=f"C{args.modes.index(mode)}", label=f"{mode} ({run})")
        for row in own:
            if row["model"] in REFERENCES and row["run"] == "eager":
                ax.axhline(row["speed-up"], linestyle=":", color="gray", linewidth=0.8)
                ax.annotate(row["model"], (min(flop_by_r, default=0), row["speed-up"]), fontsize=7, color="gray")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set(xlabel="r (tokens merged per layer)", ylabel="speed-up over the unmerged Conformer")
        ax.set_title(f"{args.preset}, {args.image_size} px, batch {args.batch_size}, {dtype}, {args.device}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plain_presets = [name for name, shape in PRESETS.items() if not shape.get("backbone_depths")]
    parser.add_argument("--preset", default="ViT-S_16", choices=plain_presets, help="model shape (plain ViT presets)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's depth (for quick checks)")
    parser.add_argument(
        "--source",
        default="vit",
        choices=["vit", *FAMILY_SOURCES],
        help="time that transformers class in the preset's shape beside the Conformer converted from it",
    )
    parser.add_argument("--image_size", type=int, default=224, help="input resolution in pixels (square)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES), help="weights/inputs dtypes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--r_values", nargs="+", type=int, default=[4, 8, 13, 16], help="r per layer to sweep")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="merge modes to time")
    parser.add_argument("--repeats", type=int, default=10, help="timed measurements per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes per model before timing")
    parser.add_argument("--iters", type=int, default=1, help="forward passes per timed measurement")
    parser.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (eager: a quick check)")
    parser.add_argument("--skip_references", action="store_true", help="do not time the timm and transformers ViTs")
    parser.add_argument("--profile", action="store_true", help="print where the unmerged model and timm spend time")
    parser.add_argument("--sync_check", action="store_true", help="check merged forwards for host syncs (CUDA)")
    parser.add_argument("--default_allocator", action="store_true", help="leave glibc's allocator as it is")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument("--name", default=None, help="results file stem (default: throughput_<settings>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if min(args.image_size, args.batch_size, args.repeats, args.iters) <= 0:
        parser.error("--image_size, --batch_size, --repeats and --iters must be positive")
    if min(args.warmup, args.threads, *args.r_values) < 0 or args.layers is not None and args.layers <= 0:
        parser.error("--warmup, --threads and --r_values must not be negative, --layers must be positive")
    if args.image_size % PRESETS[args.preset]["patch_size"]:
        parser.error(f"--image_size {args.image_size} is not a multiple of {args.preset}'s patch size")
    dtypes = "_".join(args.dtypes)
    family = f"_{args.source}" if args.source != "vit" else ""
    stem = f"throughput_{args.preset}{family}_{args.image_size}px_b{args.batch_size}_{dtypes}_{args.device}"
    args.name = args.name or stem
    return args


def main(argv=None):
    args = parse_args(argv)
    allocator = set_up_cpu(args.threads, keep_memory=not args.default_allocator)
    set_seed(args.seed)
    depth = {"num_hidden_layers": args.layers} if args.layers else {}
    config = ConformerConfig.from_preset(args.preset, image_size=args.image_size, num_labels=1000, **depth)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    args.inputs = {dtype: torch.randn(shape).to(args.device, DTYPES[dtype]) for dtype in args.dtypes}
    start = time.perf_counter()
    entries = build_entries(args, config)
    print(f"Timing {len(entries)} models: {args.repeats} repeats x {args.iters} passes", flush=True)
    measure(entries, args)
    notes = sync_lines(entries, args) if args.sync_check and args.modes and args.r_values else []
    rows = make_rows(entries, config)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    settings = (
        f"`python benchmarks/throughput.py {' '.join(sys.argv[1:])}`: {args.preset}, {args.image_size} px, batch "
        f"{args.batch_size}, {device_name}; median of {args.repeats} interleaved repeats of {args.iters} pass(es) "
        f"after {args.warmup} warm-up passes; {environment_line(args.threads or None)}; {allocator}; "
        f"{time.perf_counter() - start:.0f} s in all.\n\n"
        "speed-up: over the unmerged Conformer of the same dtype, eager or compiled. FLOP ratio: unmerged over merged "
        "MACs of the transformer layers (qkv and output projections 4ND^2, attention 2N^2D, MLP 2ND*D_mlp on N - r "
        "tokens). of limit: speed-up / FLOP ratio. spread %: interquartile range over the median. peak MiB: what one "
        "forward allocates above the weights (CUDA). compiled, graph breaks: the forward does not trace as one graph "
        f"(`fullgraph=True` failed), compiled without it. Compile backend: {args.compile_backend}."
    )
    columns = ["model", "mode", "r", "dtype", "run", "tokens left", "images/s", "spread %", "speed-up", "FLOP ratio"]
    columns += ["of limit", "peak MiB", "compile s"]
    digits = {"images/s": 1, "spread %": 0, "speed-up": 2, "FLOP ratio": 2, "of limit": 2, "peak MiB": 0}
    text = write_results(args.name, "Throughput", settings, [("", rows, columns, digits | {"compile s": 0})], notes)
    print(text)
    plot(rows, args, RESULTS_DIR / f"{args.name}.png")
    print(f"wrote {RESULTS_DIR / args.name}.md, .csv, .png")
    if args.profile:
        print("\n\n".join(profile_lines(entries, args)))


if __name__ == "__main__":
    main()

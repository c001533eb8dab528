"""What the benchmark scripts share: the merge modes they compare, the per-layer r schedule, seeds, result tables,
the small digits model and its training loop, and the round-robin timing.

The scripts run from anywhere (`python benchmarks/throughput.py`); this module puts the repository root on
`sys.path` so that they import the model files of this checkout.
"""

import argparse
import csv
import math
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configuration_conformer import ConformerConfig  # noqa: E402
from modeling_conformer import MATCHING_FUNCTIONS, max_merge_r  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"

# The merge modes every benchmark compares: each matching function the model file offers, in its order. A mode added
# there (with its `max_merge_r` limit) shows up in every table and plot without a change here.
MODES = tuple(MATCHING_FUNCTIONS)
# Ratios are taken against ToMe's bipartite soft matching at equal r.
REFERENCE_MODE = "bipartite"


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_int_list(text: str) -> list[int]:
    """`"4,8,13"` -> `[4, 8, 13]` (for argparse `type=`)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 4,8,13, got {text!r}") from error


def parse_modes(text: str) -> list[str]:
    """`"bipartite,submodular"` -> a list of modes the model file offers (for argparse `type=`)."""
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown merge mode(s) {unknown}; the model file offers {', '.join(MODES)}")
    return modes


def merge_schedule(num_tokens: int, r: int, num_layers: int, modes=MODES) -> list[int]:
    """Tokens removed per layer for a nominal r, clamped where a layer has too few tokens left (ToMe's rule).

    The clamp is the tightest limit over `modes`, so that every mode runs the same token counts (and FLOPs) and
    comparisons at equal r are fair. With bipartite among the modes, a layer with N tokens removes at most N // 2
    (class token kept): ViT-S_16 at r=16 removes 16 in layers 0-10 and 10 in layer 11.
    """
    schedule = []
    for _ in range(num_layers):
        limit = min(max_merge_r(num_tokens, mode) for mode in modes) if modes else 0
        schedule.append(max(0, min(r, limit)))
        num_tokens -= schedule[-1]
    return schedule


def load_digits_split(image_size: int):
    """The digits set as `run_image_classification.py` builds it (scikit-learn's 1,797 8x8 digits as RGB, its seeded
    stratified 80/20 split) through its evaluation transform (bilinear resize to `image_size`, mean and std 0.5).
    Returns `((train pixel_values, train labels), (test pixel_values, test labels))` as tensors."""
    from run_image_classification import build_transforms, load_digits_dataset

    dataset = load_digits_dataset()
    _, transform = build_transforms(image_size, augment=False)

    def tensors(split):
        pixel_values = torch.stack([transform(image.convert("RGB")) for image in split["image"]])
        return pixel_values, torch.tensor(split["label"], dtype=torch.long)

    return tensors(dataset["train"]), tensors(dataset["validation"])


def environment_line(threads: int | None = None) -> str:
    threads = torch.get_num_threads() if threads is None else threads
    return (
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{threads} CPU thread(s), modes from modeling_conformer: {', '.join(MODES)}"
    )


def format_value(value, digits: int | str = 3) -> str:
    """Floats with `digits` decimals, or with `digits` as a format spec (`".1e"`); NaN as "-"."""
    if isinstance(value, float):
        if value != value:  # NaN: not applicable
            return "-"
        return format(value, digits if isinstance(digits, str) else f".{digits}f")
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], digits: dict | None = None) -> str:
    """Rows of dicts as a GitHub markdown table; `digits` maps a column to its decimals or format spec (default 3)."""
    digits = digits or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [format_value(row.get(column, ""), digits.get(column, 3)) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, title: str, settings: str, sections: list[tuple[str, list[dict], list[str], dict]]):
    """Write `results/{name}.md` (title, settings, one markdown table per `(heading, rows, columns, digits)` section)
    and `results/{name}.csv` (every section's rows, a `table` column naming the section); return the markdown."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", settings, ""]
    fieldnames = ["table"]
    for heading, rows, columns, digits in sections:
        if heading:
            parts += [f"## {heading}", ""]
        parts += [markdown_table(rows, columns, digits), ""]
        fieldnames += [column for column in columns if column not in fieldnames]
    text = "\n".join(parts)
    (RESULTS_DIR / f"{name}.md").write_text(text)
    with open(RESULTS_DIR / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        for heading, rows, _, _ in sections:
            writer.writerows({"table": heading, **row} for row in rows)
    return text


def append_notes(name: str, heading: str, lines: list[str]):
    """Append a `## heading` section of bullet lines to `results/{name}.md` (nothing when there are no lines)."""
    if lines:
        with open(RESULTS_DIR / f"{name}.md", "a") as handle:
            handle.write("\n".join(["", f"## {heading}", ""] + [f"- {line}" for line in lines]) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# The digits model (merge_accuracy.py, classifier_heads.py)
# --------------------------------------------------------------------------------------------------------------------


def add_digits_model_arguments(parser: argparse.ArgumentParser, epochs: int, epochs_help: str):
    """The flags of the digits model's shape and training (what `base_config` and `train` read)."""
    parser.add_argument("--image_size", type=int, default=32, help="digits are upsampled from 8x8 to this size")
    parser.add_argument("--patch_size", type=int, default=4, help="patch size (32/4: 64 patches + class token)")
    parser.add_argument("--hidden_size", type=int, default=64, help="model width (MLP: 4x)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    parser.add_argument("--batch_size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--max_shift", type=int, default=2, help="random translation in pixels during training")


def check_digits_model_arguments(parser: argparse.ArgumentParser, args):
    """`parser.error` on a model shape that cannot be built."""
    for flag in ("image_size", "patch_size", "hidden_size", "layers", "heads", "batch_size"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.image_size % args.patch_size or args.hidden_size % args.heads:
        parser.error("--image_size must be a multiple of --patch_size, and --hidden_size of --heads")


def base_config(args) -> ConformerConfig:
    """The digits model: `--hidden_size` wide (MLP 4x), ten labels, no merging, the class-token classifier."""
    return ConformerConfig(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
        merge_mode="none",
    )


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels, filling with the background value (-1)."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])


def train(model, images, labels, epochs: int, lr: float, args, seed: int):
    """AdamW with linear warm-up (first 5% of steps) and cosine decay; random shifts as the only augmentation."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(labels) / args.batch_size)
    total_steps, warmup_steps = epochs * steps_per_epoch, max(1, epochs * steps_per_epoch // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
        ),
    )
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total_loss = 0.0
        for start in range(0, len(labels), args.batch_size):
            batch = order[start : start + args.batch_size]
            pixel_values = random_shift(images[batch], args.max_shift, generator)
            loss = model(pixel_values, labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        if epochs <= 10 or (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
            print(f"    epoch {epoch + 1}/{epochs}: loss {total_loss / len(labels):.4f}", flush=True)
    return model.eval()


@torch.inference_mode()
def predict(model, images, batch_size: int = 256):
    """Logits and the pooled feature the classifier reads (the final class token for `classifier="token"`)."""
    model.eval()
    all_logits, all_features = [], []
    for start in range(0, len(images), batch_size):
        pixel_values = images[start : start + batch_size]
        outputs = model.conformer(pixel_values)
        features = model.pool(outputs, pixel_values)
        if model.pre_logits is not None:
            features = model.pre_logits(features)
        all_logits.append(model.classifier(features))
        all_features.append(features)
    return torch.cat(all_logits), torch.cat(all_features)


# --------------------------------------------------------------------------------------------------------------------
# Timing (throughput.py, classifier_heads.py)
# --------------------------------------------------------------------------------------------------------------------


def keep_freed_memory() -> str:
    """Ask glibc's allocator to keep freed memory in the process (`mallopt`, as the MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ variables would at start-up). By default it hands large freed blocks back to the system
    and page-faults them in again on the next allocation, and how often depends on the sequence of tensor sizes: in
    our measurements it cost the unmerged models about 9% and the merged ones nothing, which inflates speed-ups.
    Returns what was done, for the results file."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not ctypes.util.find_library("c"):
        return "Allocator: left as it is (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if not hasattr(libc, "mallopt"):
        return "Allocator: left as it is (no mallopt)"
    done = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) and libc.mallopt(m_trim_threshold, 2**31 - 1)
    if not done:
        return "Allocator: mallopt refused, left as it is"
    return "Allocator: glibc keeps freed memory (mmap threshold 32 MiB, trim threshold 2 GiB)"


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def minor_page_faults() -> int:
    """Pages this process has faulted in so far (memory the allocator got fresh from the system)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_forward(module, pixel_values, iters: int, device: str) -> tuple[float, int]:
    """Seconds for `iters` forward passes, and the minor page faults they caused."""
    synchronize(device)
    faults = minor_page_faults()
    start = time.perf_counter()
    for _ in range(iters):
        module(pixel_values)
    synchronize(device)
    return time.perf_counter() - start, minor_page_faults() - faults


def measure(entries: list[dict], pixel_values, args):
    """Warm every model up, then time them round-robin; store images/s (median) and the spread over repeats."""
    with torch.inference_mode():
        for entry in entries:
            for _ in range(args.warmup):
                entry["module"](pixel_values)
        synchronize(args.device)
        samples = {id(entry): [] for entry in entries}
        faults = {id(entry): 0 for entry in entries}
        for repeat in range(args.repeats):
            # Rotate the start so that no model always runs right after the same neighbour.
            order = entries[repeat % len(entries) :] + entries[: repeat % len(entries)]
            for entry in order:
                seconds, page_faults = time_forward(entry["module"], pixel_values, args.iters, args.device)
                samples[id(entry)].append(args.batch_size * args.iters / seconds)
                faults[id(entry)] += page_faults
            print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    for entry in entries:
        values = sorted(samples[id(entry)])
        entry["images_per_s"] = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        entry["spread_pct"] = 100 * (quartiles[2] - quartiles[0]) / entry["images_per_s"]
        entry["page_faults"] = faults[id(entry)] / (args.repeats * args.iters)

"""What the benchmark scripts share: the merge modes they compare, result tables, and the small digits model with its
training loop. The FLOP count and the interleaved timing are `conformer_vit.sweep`'s, as `evaluate_merging.py`
uses them.

The scripts run from anywhere (`python benchmarks/throughput.py`); this module puts the repository root on `sys.path`
so that they import the model files of this checkout.
"""

import csv
import ctypes
import ctypes.util
import math
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from configuration_conformer import ConformerConfig  # noqa: E402
from conformer_vit.sources import reconfigured  # noqa: E402
from conformer_vit.sweep import flop_ratio as merged_flop_fraction  # noqa: E402
from conformer_vit.sweep import time_interleaved  # noqa: E402
from modeling_conformer import ConformerForImageClassification  # noqa: E402
from token_merging import MATCHING_FUNCTIONS, merge_schedule  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
# Every matching function the model file offers, in its order: a mode added there shows up in every table.
MODES = tuple(MATCHING_FUNCTIONS)
REFERENCE_MODE = "bipartite"  # ratios are against ToMe's matching


def schedule_for(r: int, num_tokens: int, num_layers: int) -> list[int]:
    """r per layer, clamped for every mode at once (ToMe's rule), so that equal r means equal token counts."""
    return merge_schedule(r, num_tokens, num_layers, modes=MODES)


def on_frontier(points: list[tuple[float, float]]) -> list[bool]:
    """For each (speed, cost) point: no other point is at least as fast and as cheap, and better in one of them."""
    return [not any(s >= speed and c <= cost and (s, c) != (speed, cost) for s, c in points) for speed, cost in points]


def environment_line(threads: int | None = None) -> str:
    threads = torch.get_num_threads() if threads is None else threads
    return f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, {threads} thread(s)"


# --------------------------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------------------------


def format_value(value, digits) -> str:
    """Floats with `digits` decimals (or `digits` as a format spec such as ".1e"); NaN as "-"."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else format(value, digits if isinstance(digits, str) else f".{digits}f")
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], digits: dict | None = None) -> str:
    digits = digits or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c, ""), digits.get(c, 3)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(
    name: str, title: str, settings: str, sections: list[tuple], notes: list[str] = (), results_dir=RESULTS_DIR
) -> str:
    """Write `{results_dir}/{name}.md` (title, settings, a table per `(heading, rows, columns, digits)` section, the
    notes as bullets) and `{name}.csv` beside it (every section's rows, a `table` column naming the section)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    parts, fieldnames = [f"# {title}", "", settings, ""], ["table"]
    for heading, rows, columns, digits in sections:
        parts += ([f"## {heading}", ""] if heading else []) + [markdown_table(rows, columns, digits), ""]
        fieldnames += [column for column in columns if column not in fieldnames]
    if notes:
        parts += ["## Notes", ""] + [f"- {line}" for line in notes] + [""]
    text = "\n".join(parts)
    (results_dir / f"{name}.md").write_text(text)
    with open(results_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        for heading, rows, _, _ in sections:
            writer.writerows({"table": heading, **row} for row in rows)
    return text


# --------------------------------------------------------------------------------------------------------------------
# Cost and timing
# --------------------------------------------------------------------------------------------------------------------


def flop_ratio(config: ConformerConfig, schedule: list[int]) -> float:
    """Unmerged over merged encoder MACs (`conformer_vit.sweep.encoder_macs`): the speed-up merging could give if
    time followed FLOPs."""
    return 1 / merged_flop_fraction(config, schedule)


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory in the process (`mallopt`). By default it returns large blocks to the system
    and page-faults them in again, which cost the unmerged models about 9% here and the merged ones nothing."""
    libc_name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return "allocator left as it is (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**31 - 1):
        return "glibc keeps freed memory (mmap threshold 32 MiB, trim threshold 2 GiB)"
    return "allocator left as it is (mallopt refused)"


def set_up_cpu(threads: int, keep_memory: bool = True) -> str:
    """Use `threads` torch threads (0: torch's default) and, with `keep_memory`, glibc's allocator keeping freed
    memory; returns what was done to the allocator, for the results file."""
    if threads:
        torch.set_num_threads(threads)
    return keep_freed_memory() if keep_memory else "allocator left as it is"


def time_models(models: dict, pixel_values, repeats: int, warmup: int = 2, iters: int = 1) -> dict:
    """`conformer_vit.sweep.time_interleaved` with `iters` calls per sample: `{name: (median images/s, interquartile
    spread in % of the median)}`, as the tables print them."""
    timed = time_interleaved(models, pixel_values, repeats, warmup=warmup, calls=iters)
    return {name: (timing.images_per_s, timing.spread) for name, timing in timed.items()}


# --------------------------------------------------------------------------------------------------------------------
# The digits model (merge_accuracy.py, classifier_heads.py): hidden 64, 4 layers, 4 heads, 32 px in 4-px patches
# --------------------------------------------------------------------------------------------------------------------

DIGITS_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
DIGITS_IMAGE_SIZE, DIGITS_PATCH_SIZE = 32, 4


def digits_config(**overrides) -> ConformerConfig:
    """The digits model's config (10 classes, no merging); `overrides` change any field, the shape included."""
    labels = {i: str(i) for i in range(10)}
    fields = DIGITS_SHAPE | dict(image_size=DIGITS_IMAGE_SIZE, patch_size=DIGITS_PATCH_SIZE, merge_mode="none")
    fields |= dict(num_labels=10, id2label=labels, label2id={name: i for i, name in labels.items()})
    return ConformerConfig(**fields | overrides)


def with_merging(model: ConformerForImageClassification, mode: str, schedule: list[int]):
    """The same weights merging `schedule[layer]` tokens per layer with `mode` (`sources.reconfigured`)."""
    return reconfigured(model, merge_mode=mode, merge_r=list(schedule)).eval()


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels, filling with the background value (-1)."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def train(model, images, labels, epochs: int, lr: float, seed: int, batch_size: int = 32, max_shift: int = 2):
    """AdamW (weight decay 0.05), 5% linear warm-up then cosine decay; random shifts as the only augmentation."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * math.ceil(len(labels) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)
    for epoch in range(epochs):
        order, total_loss = torch.randperm(len(labels), generator=generator), 0.0
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            loss = model(random_shift(images[batch], max_shift, generator), labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        print(f"    epoch {epoch + 1}/{epochs}: loss {total_loss / len(labels):.4f}", flush=True)
    return model.eval()


@torch.inference_mode()
def predict(model, images, batch_size: int = 256):
    """Logits, and the final class token (after the last norm), over `images` in batches."""
    model.eval()
    logits, class_tokens = [], []
    for start in range(0, len(images), batch_size):
        pixel_values = images[start : start + batch_size]
        outputs = model.forward_features(pixel_values)
        logits.append(model.forward_head(outputs, pixel_values))
        class_tokens.append(outputs.last_hidden_state[:, 0])
    return torch.cat(logits), torch.cat(class_tokens)

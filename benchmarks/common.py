"""What the benchmark scripts share: the merge modes they compare, the per-layer r schedule, seeds, result tables.

The scripts run from anywhere (`python benchmarks/throughput.py`); this module puts the repository root on
`sys.path` so that they import the model files of this checkout.
"""

import argparse
import csv
import platform
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

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

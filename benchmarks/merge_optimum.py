"""How far each merge mode is from the best merge there is: the least scatter any grouping of the tokens reaches.

    python benchmarks/merge_optimum.py                              # about a minute on 2 CPU threads
    python benchmarks/merge_optimum.py --seeds 1 --batch_size 2     # a quick check

One merge of r tokens leaves N - r groups; its cost is the within-group scatter of the unit metric vectors (the
measure of `merge_quality.py`). Exact Ward is greedy, so it need not find the least; this script finds it and proves
it, per image, with an exact integer program (scipy's `milp`, HiGHS) over candidate groups:

- Exact Ward's grouping (`ward_matching(..., max_rounds=20)`) gives an upper bound U on the least scatter.
- A group G of m tokens scatters `sum_{i in G} s_i / (2m)`, `s_i = sum_{j in G} d_ij^2` (d: distances of the unit
  vectors), so at least `sum_{i in G} near_i(m - 1) / (2m)`, with near_i(k) the sum of token i's k smallest squared
  distances. Any k merges put at least k + 1 tokens in groups, so the least over every split of the smallest nearest
  distances into groups bounds their cost from below: LB(k), a small dynamic program.
- A group of m tokens can belong to a grouping no worse than U only if it scatters at most T(m) = U - LB(r - m + 1):
  the other merges cost at least that. Candidates grow token by token in increasing order; a partial group is dropped
  as soon as the bound above, with its known distances in place of the nearest ones, exceeds T(m).
- The integer program picks candidate groups, each token in at most one, r merges in all, at the least total scatter.
  No grouping it cannot see can be cheaper, so its answer is the least scatter there is (token sizes all one; the
  class token stays alone, as in every mode).

Data: the clustered synthetic keys of `merge_quality.py` with unit sizes (the same seeds, so its rows compare).
Writes `results/merge_optimum.{md,csv}`.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import MODES, REFERENCE_MODE, RESULTS_DIR, environment_line, set_up_cpu, write_results
from merge_quality import CLUSTER_SETTINGS, SKLEARN_WARD, clustered_keys, matching_functions, merge_scatter

from token_merging import destination_from_owner, merge_by_destination, ward_matching

OPTIMUM = "optimum (reference)"


def group_scatter(unit: np.ndarray, members) -> float:
    """Scatter of the unit vectors `unit[members]` around their mean."""
    points = unit[list(members)]
    return float(((points - points.mean(0)) ** 2).sum())


def merge_lower_bounds(nearest_squared: np.ndarray, r: int) -> np.ndarray:
    """`bounds[k]`: no k merges cost less. A group of m tokens costs at least (m - 1) / (2m) times the sum of its
    tokens' nearest squared distances (`nearest_squared` [tokens]); any k merges put at least k + 1 tokens in groups,
    so the least over every split of the smallest distances into groups (of any sizes, in any order) bounds them."""
    smallest = np.sort(nearest_squared)[: 2 * r]
    prefix = np.concatenate([[0.0], np.cumsum(smallest)])
    tokens = len(smallest)
    least = np.full((r + 1, tokens + 1), math.inf)  # least[k, p]: k merges on the p smallest distances
    least[0, 0] = 0.0
    for k in range(r):
        for p in range(tokens):
            if math.isinf(least[k, p]):
                continue
            for m in range(2, min(r - k + 1, tokens - p) + 1):
                cost = least[k, p] + (m - 1) / (2 * m) * (prefix[p + m] - prefix[p])
                least[k + m - 1, p + m] = min(least[k + m - 1, p + m], cost)
    return least.min(axis=1)


def candidate_groups(unit: np.ndarray, r: int, upper: float, max_candidates: int) -> list[tuple[tuple, float]]:
    """Every group of 2 to r + 1 tokens that a grouping scattering at most `upper` can contain, with its scatter.

    A group G of m tokens scatters `sum_{i in G} s_i / (2m)` with `s_i = sum_{j in G} d_ij^2`. Groups grow token by
    token in increasing order, so a partial group S (s tokens) is completed by later tokens only. Then
    `s_i >= max(near_i(m - 1), sum_{j in S} d_ij^2 + near_i(m - s))` for i in S, and for each token k still to come
    `s_k >= max(near_k(m - 1), sum_{j in S} d_kj^2 + near_k(m - s - 1))`; the m - s smallest of those over the later
    tokens complete a bound that a partial group must stay under."""
    num_tokens = unit.shape[0]
    squared = ((unit[:, None] - unit[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, 0.0)
    near = np.zeros((num_tokens, r + 1))  # near[i, k]: the sum of token i's k smallest squared distances
    near[:, 1:] = np.cumsum(np.sort(squared + np.diag(np.full(num_tokens, math.inf)), axis=1)[:, :r], axis=1)
    bounds = merge_lower_bounds(near[:, 1], r)
    candidates, positions = [], np.arange(num_tokens)

    def group_bound(members: tuple, to_members: np.ndarray, m: int) -> float:
        size, members_list = len(members), list(members)
        inside = np.maximum(near[members_list, m - 1], to_members[members_list] + near[members_list, m - size]).sum()
        if size == m:
            return inside / (2 * m)
        later = positions > members[-1]
        if later.sum() < m - size:
            return math.inf
        still_to_come = np.maximum(near[later, m - 1], to_members[later] + near[later, m - size - 1])
        return (inside + np.partition(still_to_come, m - size - 1)[: m - size].sum()) / (2 * m)

    for m in range(2, r + 2):
        limit = upper - bounds[r - m + 1] + 1e-9 * max(upper, 1.0)  # float slack: U's own groups stay in
        level = [((i,), squared[i]) for i in range(num_tokens) if group_bound((i,), squared[i], m) <= limit]
        for _ in range(m - 1):  # one token more each time
            grown = []
            for members, to_members in level:
                for k in range(members[-1] + 1, num_tokens):
                    to_grown = to_members + squared[k]  # sum_{j in S + k} d_ij^2 for every token i
                    if group_bound(members + (k,), to_grown, m) <= limit:
                        grown.append((members + (k,), to_grown))
                if len(candidates) + len(grown) > max_candidates:
                    raise RuntimeError(
                        f"more than {max_candidates} candidate groups at r={r}: the bounds are too loose for these "
                        "keys; lower r or raise --max_candidates"
                    )
            level = grown
        candidates += [(members, to_members[list(members)].sum() / (2 * m)) for members, to_members in level]
    return candidates


def least_scatter(unit: np.ndarray, r: int, upper: float, max_candidates: int = 20_000):
    """The least scatter of any grouping of the rows of `unit` [tokens, channels] (unit vectors, sizes one) into
    tokens - r groups, and the groups (tuples of 2+ tokens) that reach it. `upper`: the scatter of some such
    grouping (or more)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    candidates = candidate_groups(unit, r, upper, max_candidates)
    if not candidates:
        raise ValueError(f"no grouping scatters at most upper={upper}: it is not the scatter of a grouping")
    rows = [token for group, _ in candidates for token in group]
    columns = [index for index, (group, _) in enumerate(candidates) for _ in group]
    membership = csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(unit.shape[0], len(candidates)))
    merges = np.array([[len(group) - 1 for group, _ in candidates]], dtype=float)
    cost = np.array([scatter for _, scatter in candidates])
    result = milp(
        cost,
        integrality=np.ones_like(cost),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(membership, 0, 1), LinearConstraint(merges, r, r)],
    )
    if not result.success:
        raise RuntimeError(f"the integer program did not solve: {result.message}")
    chosen = [candidates[index][0] for index in np.flatnonzero(result.x > 0.5)]
    return result.fun, chosen


def optimum_matching(metric: torch.Tensor, r: int, size: torch.Tensor | None = None, max_candidates: int = 20_000):
    """`(merge, unmerge)` of the least-scatter grouping of each image (class token alone), as a mode's matching
    returns them. Reference only: sizes must be all one."""
    if size is not None and not bool((size == 1).all()):
        raise ValueError("the optimum is computed for tokens of size one only: pass size=None")
    batch, num_tokens, _ = metric.shape
    unit = torch.nn.functional.normalize(metric.double(), dim=-1)
    upper = [merge_scatter(metric[i : i + 1], None, *ward_matching(metric[i : i + 1], r, max_rounds=20))
             for i in range(batch)]  # fmt: skip
    owner = torch.arange(num_tokens).repeat(batch, 1)  # the token each one joins (itself if kept)
    for image in range(batch):
        patches = unit[image, 1:].numpy()
        # Ward's scatter came out of float32: a little slack keeps its own groups among the float64 candidates
        _, groups = least_scatter(patches, r, upper[image] * (1 + 1e-5) + 1e-9, max_candidates)
        for group in groups:  # tokens in increasing order: the first stays, the others join it
            owner[image, 1 + torch.tensor(group)] = 1 + group[0]
    return merge_by_destination(destination_from_owner(owner, owner == torch.arange(num_tokens)), num_tokens - r)


def evaluate(r_values: list[int], seeds: int, batch_size: int, num_tokens: int, channels: int, max_candidates: int):
    functions = matching_functions(list(MODES), reference=True)
    functions[OPTIMUM] = lambda metric, r, size: optimum_matching(metric, r, size, max_candidates)
    rows = []
    for data, kwargs in CLUSTER_SETTINGS.items():
        if kwargs.get("sizes"):
            continue
        batches = [clustered_keys(seed, batch_size, num_tokens, channels, **kwargs)[0] for seed in range(seeds)]
        for r in r_values:
            start = time.perf_counter()
            scatter = {name: [merge_scatter(keys, None, *f(keys, r, None)) for keys in batches] for name, f in
                       functions.items()}  # fmt: skip
            for name in functions:
                ratio = [value / base for value, base in zip(scatter[name], scatter[REFERENCE_MODE])]
                over_optimum = [value / best for value, best in zip(scatter[name], scatter[OPTIMUM])]
                rows.append({
                    "data": data, "tokens": num_tokens, "r": r, "mode": name, "scatter": statistics.mean(scatter[name]),
                    "ratio": statistics.mean(ratio), "over optimum": statistics.mean(over_optimum),
                })  # fmt: skip
            print(f"  {data} r={r} done in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def notes(rows: list[dict]) -> list[str]:
    lines = []
    for data in dict.fromkeys(row["data"] for row in rows):
        for r in dict.fromkeys(row["r"] for row in rows if row["data"] == data):
            own = {row["mode"]: row for row in rows if row["data"] == data and row["r"] == r}
            lines.append(
                f"{data}, r={r}: no grouping leaves less than {own[OPTIMUM]['ratio']:.4f}x bipartite's scatter; "
                f"ward leaves {own['ward']['ratio']:.4f}x ({own['ward']['over optimum']:.4f}x the least), exact Ward "
                f"(scikit-learn's) {own[SKLEARN_WARD]['ratio']:.4f}x"
            )
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r_values", nargs="+", type=int, default=[13], help="tokens removed by the merge")
    parser.add_argument("--seeds", type=int, default=3, help="batches per setting (merge_quality.py's seeds)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch")
    parser.add_argument("--num_tokens", type=int, default=197, help="tokens per image, class token included")
    parser.add_argument("--channels", type=int, default=64, help="channels of the keys")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--max_candidates", type=int, default=20_000, help="groups kept while growing, at most")
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR, help="folder of merge_optimum.{md,csv}")
    args = parser.parse_args(argv)
    if min(args.seeds, args.batch_size, args.channels, args.max_candidates) <= 0 or args.num_tokens < 3:
        parser.error("--seeds, --batch_size, --channels and --max_candidates must be positive, --num_tokens at least 3")
    if not all(1 <= r <= min(24, (args.num_tokens - 1) // 2) for r in args.r_values):
        parser.error(
            f"--r_values must be between 1 and {min(24, (args.num_tokens - 1) // 2)}: the candidate groups grow "
            "quickly with r"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    set_up_cpu(args.threads)
    start = time.perf_counter()
    try:
        rows = evaluate(args.r_values, args.seeds, args.batch_size, args.num_tokens, args.channels, args.max_candidates)
    except RuntimeError as error:  # the bounds left too many candidates, or the solver failed: one readable line
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    settings = (
        f"`python benchmarks/merge_optimum.py {' '.join(sys.argv[1:])}`: clustered keys of merge_quality.py, sizes "
        f"one, {args.seeds} batches of {args.batch_size} images x {args.num_tokens} tokens x {args.channels} "
        f"channels per setting; {environment_line()}; {time.perf_counter() - start:.0f} s in all.\n\n"
        "scatter: within-group scatter of the unit keys after one merge of r tokens, mean over the images. ratio: over "
        f"bipartite's on the same batch, averaged over the batches. over optimum: over {OPTIMUM}'s, the least scatter "
        "of any grouping into N - r groups (class token alone), found and proved per image by an integer program."
    )
    columns = ["data", "tokens", "r", "mode", "scatter", "ratio", "over optimum"]
    text = write_results(
        "merge_optimum",
        "Merge quality against the best merge there is",
        settings,
        [("", rows, columns, {"scatter": 3, "ratio": 4, "over optimum": 4})],
        notes(rows),
        results_dir=args.results_dir,
    )
    print(text)


if __name__ == "__main__":
    main()

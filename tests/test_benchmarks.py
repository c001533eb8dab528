"""The benchmark scripts' own logic, against numbers worked out by hand: the FLOP convention, the scatter a merge
schedule leaves, the frontier; and the GPU check's CPU path, run end to end."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import merge_frontier  # noqa: E402
import merge_optimum  # noqa: E402
import merge_quality  # noqa: E402

from configuration_conformer import ConformerConfig  # noqa: E402
from modeling_conformer import ConformerForImageClassification  # noqa: E402


def test_encoder_macs_by_hand():
    from conformer_vit.sweep import encoder_macs

    # 5 tokens (class + 2x2 patches), width 2, MLP 4, one layer merging 2: 4*5*2^2 + 2*5^2*2 + 2*(5-2)*2*4 = 80+100+48
    shape = dict(hidden_size=2, intermediate_size=4, num_attention_heads=1, image_size=2, patch_size=1)
    assert encoder_macs(ConformerConfig(**shape, num_hidden_layers=1), [2]) == 228
    # the next layer runs on the 3 tokens left: 4*3*4 + 2*9*2 + 2*3*2*4 = 48 + 36 + 48
    assert encoder_macs(ConformerConfig(**shape, num_hidden_layers=2), [2, 0]) == 228 + 132


@pytest.mark.parametrize(("preset", "merge_r", "limit"), [("ViT-S_16", 13, 1.72), ("ViT-B_16", 16, 2.02)])
def test_flop_ratio_gives_tomes_limits(preset, merge_r, limit):
    config = ConformerConfig.from_preset(preset)
    schedule = common.schedule_for(merge_r, 1 + config.num_patches, config.num_hidden_layers)
    assert round(common.flop_ratio(config, schedule), 2) == limit


def unit_keys(*angles_and_axes):
    """Unit vectors in 3-d: (angle, plane) with plane 0 rotating e1 towards e2 and plane 1 rotating e2 towards e3."""
    keys = []
    for angle, plane in angles_and_axes:
        vector = torch.zeros(3)
        vector[plane], vector[plane + 1] = math.cos(angle), math.sin(angle)
        keys.append(vector)
    return torch.stack(keys)[None]  # [1, tokens, 3]


# Class token, then two pairs of near-duplicates far from each other: t1 ~ t2 (angle 0.1), t3 ~ t4 (angle 0.2).
PAIRS = unit_keys((math.pi / 2, 1), (0.0, 0), (0.1, 0), (math.pi / 2, 0), (math.pi / 2 + 0.2, 0))
# Two unit vectors at angle a leave |u - v|^2 / 2 = 1 - cos(a) around their mean.
BOTH_PAIRS = (1 - math.cos(0.1)) + (1 - math.cos(0.2))
# Bipartite's first merge (t2 into t1) leaves the order [cls, t4 | t1+t2, t3]: t3 and t4 are now both in set B and
# cannot merge, so t1+t2 joins t3. Three unit vectors leave 3 - |t1 + t2 + t3|^2 / 3.
BIPARTITE_TRIPLE = 3 - ((1 + math.cos(0.1)) ** 2 + (1 + math.sin(0.1)) ** 2) / 3


@pytest.mark.parametrize(
    ("mode", "expected"), [("bipartite", BIPARTITE_TRIPLE), ("submodular", BOTH_PAIRS), ("ward", BOTH_PAIRS)]
)
def test_schedule_scatter_of_two_merges_by_hand(mode, expected):
    assert merge_frontier.schedule_scatter(PAIRS, mode, [1, 1]) == pytest.approx(expected, rel=1e-4)
    assert merge_frontier.schedule_scatter(PAIRS, mode, [1, 0]) == pytest.approx(1 - math.cos(0.1), rel=1e-4)
    assert merge_frontier.schedule_scatter(PAIRS, mode, [0, 0]) == pytest.approx(0.0, abs=1e-7)


def test_frontier_keeps_only_undominated_points():
    points = [(1.0, 0.0), (2.0, 1.0), (2.0, 2.0), (3.0, 1.0), (0.5, 0.0)]
    assert common.on_frontier(points) == [True, False, False, True, False]


def test_equal_speed_ratio_interpolates_between_bipartite_points():
    rows = [
        {"mode": "bipartite", "images/s": 10.0, "clustered": 4.0},
        {"mode": "bipartite", "images/s": 20.0, "clustered": 2.0},
        {"mode": "ward", "images/s": 15.0, "clustered": 2.7},  # bipartite at 15 images/s: 3.0
        {"mode": "ward", "images/s": 25.0, "clustered": 1.0},  # faster than any bipartite point: no comparison
    ]
    ratios = merge_frontier.at_equal_speed(rows, "clustered")
    assert ratios[:3] == pytest.approx([1.0, 1.0, 0.9])
    assert math.isnan(ratios[3])


def run_gpu_check(*args, **env):
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **env},
        timeout=300,
    )


@pytest.mark.slow
def test_gpu_check_cpu_path_writes_every_model_eager_and_compiled():
    name = f"pytest_gpu_check_{os.getpid()}"
    written = [common.RESULTS_DIR / f"{name}.{suffix}" for suffix in ("md", "csv", "png")]
    try:
        result = run_gpu_check("--cpu", NAME=name)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(written[1]) as handle:
            rows = list(csv.DictReader(handle))
        timed = {(row["model"], row["mode"], row["run"].split(",")[0]) for row in rows}
        models = [("timm ViT", "-"), ("transformers ViT", "-"), ("Conformer", "none")]
        models += [("Conformer", mode) for mode in common.MODES]
        assert timed == {(model, mode, run) for model, mode in models for run in ("eager", "compiled")}
        assert all(float(row["images/s"]) > 0 and float(row["FLOP ratio"]) >= 1 for row in rows)
        text = written[0].read_text()
        assert all(f"host sync in a {mode} r=2" in text for mode in common.MODES)
        assert written[2].stat().st_size > 0
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="without --cpu it would start the GPU check")
def test_gpu_check_without_cuda_says_so_in_one_line():
    result = run_gpu_check()
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no CUDA device")


def test_gpu_check_refuses_an_unknown_argument():
    result = run_gpu_check("--fast")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown argument --fast (the only option is --cpu)"


def test_captured_keys_are_the_layers_keys_averaged_over_heads_by_hand():
    torch.manual_seed(0)
    config = ConformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    model = ConformerForImageClassification(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    (captured,) = merge_quality.capture_keys(model, pixel_values, [0])
    layer = model.conformer.layers[0]
    with torch.no_grad():
        hidden = model.conformer.embeddings(pixel_values)
        keys = layer.attention.k_proj(layer.layernorm_before(hidden)).view(2, 17, 4, 8)  # [batch, tokens, heads, dim]
    assert captured.shape == (2, 17, 8)
    torch.testing.assert_close(captured, keys.mean(dim=2))


def set_partitions(items):
    """Every partition of `items` into blocks (Bell(8) = 4140 of 8 items)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first]] + partition
        for index in range(len(partition)):
            yield partition[:index] + [[first] + partition[index]] + partition[index + 1 :]


def least_scatter_by_enumeration(unit: np.ndarray, r: int) -> float:
    num_tokens = unit.shape[0]
    return min(
        sum(merge_optimum.group_scatter(unit, block) for block in partition if len(block) > 1)
        for partition in set_partitions(list(range(num_tokens)))
        if len(partition) == num_tokens - r
    )


def clustered_unit_vectors(seed: int, num_tokens: int = 8, channels: int = 5) -> np.ndarray:
    generator = np.random.default_rng(seed)
    centres = 2 * generator.normal(size=(3, channels))
    points = centres[generator.integers(0, 3, num_tokens)] + generator.normal(size=(num_tokens, channels))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(6))
def test_least_scatter_is_the_least_over_every_partition(seed):
    unit = clustered_unit_vectors(seed)
    for r in (1, 2, 4, 6):
        best = least_scatter_by_enumeration(unit, r)
        # any upper bound at or above the least will do: here up to 2x it
        value, groups = merge_optimum.least_scatter(unit, r, best * (1 + (seed + 1) / 6) + 1e-12)
        assert value == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert sum(len(group) - 1 for group in groups) == r
        assert len({token for group in groups for token in group}) == sum(map(len, groups))  # disjoint groups
        assert sum(merge_optimum.group_scatter(unit, group) for group in groups) == pytest.approx(value, rel=1e-9)
        # every k merges cost at least the bound, and the bound is not vacuous
        squared = ((unit[:, None] - unit[None]) ** 2).sum(-1) + np.diag(np.full(8, np.inf))
        bounds = merge_optimum.merge_lower_bounds(squared.min(axis=1), r)
        assert bounds[r] <= best + 1e-12 and bounds[r] > 0
        assert all(bounds[k] <= least_scatter_by_enumeration(unit, k) + 1e-12 for k in range(1, r))


def test_least_scatter_refuses_an_upper_bound_below_every_grouping():
    unit = clustered_unit_vectors(0)
    with pytest.raises(ValueError, match="not the scatter of a grouping"):
        merge_optimum.least_scatter(unit, 2, 0.5 * least_scatter_by_enumeration(unit, 2))


def test_lower_bound_of_two_far_apart_pairs_by_hand():
    # Tokens 0~1 at squared distance 0.1, tokens 2~3 at 0.3. One merge: a pair, (0.1 + 0.1) / 4. Two merges: two
    # pairs, (0.1 + 0.1 + 0.3 + 0.3) / 4 = 0.2, or one group of three, (3 - 1) / 6 * (0.1 + 0.1 + 0.3) = 1/6, less.
    bounds = merge_optimum.merge_lower_bounds(np.array([0.1, 0.1, 0.3, 0.3]), 2)
    assert bounds == pytest.approx([0.0, 0.05, 1 / 6])


def test_optimum_matching_on_two_pairs_by_hand():
    for r, expected in ((1, 1 - math.cos(0.1)), (2, BOTH_PAIRS)):
        merge, unmerge = merge_optimum.optimum_matching(PAIRS, r)
        assert merge_quality.merge_scatter(PAIRS, None, merge, unmerge) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="size one"):
        merge_optimum.optimum_matching(PAIRS, 1, torch.tensor([1.0, 2, 1, 1, 1]).view(1, 5, 1))


def test_merge_optimum_end_to_end_no_mode_below_the_optimum(tmp_path):
    merge_optimum.main(["--seeds", "1", "--batch_size", "2", "--num_tokens", "41", "--r_values", "3", "--threads", "1",
                        "--results_dir", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "merge_optimum.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["data"] for row in rows} == {name for name in merge_quality.CLUSTER_SETTINGS if "sizes" not in name}
    for row in rows:
        assert float(row["over optimum"]) >= 1 - 1e-5, row
        if row["mode"] == merge_optimum.OPTIMUM:
            assert float(row["over optimum"]) == pytest.approx(1.0)
    assert "no grouping leaves less than" in (tmp_path / "merge_optimum.md").read_text()


def test_merge_optimum_refuses_an_r_it_cannot_bound():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "merge_optimum.py"), "--r_values", "40"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("merge_optimum.py: error: --r_values must be between 1")

"""Sweeping token-merging settings over one model: the settings, their evaluation on a dataset, interleaved timing
with warm-up, and the numbers that compare them (accuracy, top-5, KL to the unmerged model, tokens left, FLOPs,
images/s, the speed/accuracy frontier, a pick under a budget). `evaluate_merging.py` is a thin command line over it;
benchmarks time any models with `time_interleaved`.

    settings = build_settings(["bipartite", "ward"], [4, 8])        # the unmerged model first
    results = sweep(model, settings, batches, timing_repeats=10)     # one `SettingResult` per setting
    chosen = pick_setting(results, max_drop=0.5)                     # the fastest within half a point
"""

import gc
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm

from conformer_vit.sources import reconfigured
from token_merging import check_merge_schedule, merge_schedule

# One line for every table and card that shows the FLOP ratio.
FLOP_FORMULA = (
    "per layer, with N tokens in and r merged after attention: 4·N·D² (q, k, v, o projections) + 2·N²·D (attention) "
    "+ 2·(N−r)·D·D_mlp (MLP; 3·(N−r)·D·W for SwiGLU of width W), in multiply-accumulates; the patch embedding, "
    "the head, norms, softmax and the matching itself are left out (ToMe's convention)"
)


# --------------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeSetting:
    """One way to run the model: a merge mode and its schedule: r (one int for every layer, or a tuple with one per
    layer; `merge_schedule="decreasing"`: ToMe's decreasing r), or ATC's staged reduction (`merge_layers`, each keeping
    `merge_keep_rate` of the patch tokens)."""

    merge_mode: str = "none"
    merge_r: int | tuple[int, ...] = 0
    merge_schedule: str = "constant"
    merge_layers: tuple[int, ...] | None = None
    merge_keep_rate: float | None = None

    @property
    def name(self) -> str:
        """`unmerged`, `bipartite r=4`, `ward r=8,8,4,4`, `ward r=8 decreasing`, `ward layers 3,6,9 keep 0.63`."""
        if self.merge_mode == "none":
            return "unmerged"
        if self.merge_layers is not None:
            return f"{self.merge_mode} layers {format_merge_r(self.merge_layers)} keep {self.merge_keep_rate:g}"
        decreasing = " decreasing" if self.merge_schedule == "decreasing" else ""
        return f"{self.merge_mode} r={format_merge_r(self.merge_r)}{decreasing}"

    @property
    def config_changes(self) -> dict:
        """The config fields of this setting, as `reconfigured` and `from_pretrained` take them (every schedule field,
        so that a model saved with another schedule takes this one)."""
        merge_r = list(self.merge_r) if isinstance(self.merge_r, tuple) else self.merge_r
        layers = list(self.merge_layers) if self.merge_layers is not None else None
        return {
            "merge_mode": self.merge_mode,
            "merge_r": merge_r if self.merge_mode != "none" else 0,
            "merge_schedule": self.merge_schedule,
            "merge_layers": layers,
            "merge_keep_rate": self.merge_keep_rate,
        }

    def schedule(self, config) -> list[int]:
        """Tokens merged in each layer of `config`'s model under this setting."""
        return type(config)(**{**config.to_dict(), **self.config_changes}).merge_r_per_layer


UNMERGED = MergeSetting()


def format_merge_r(merge_r) -> str:
    """`merge_r` as the command lines write it: `4`, or `8,8,4,4` (what `parse_merge_r` reads back)."""
    return ",".join(map(str, merge_r)) if isinstance(merge_r, (list, tuple)) else str(merge_r)


def build_settings(
    modes: Iterable[str],
    r_values: Iterable,
    decreasing: bool = False,
    merge_layers: Iterable[int] | None = None,
    keep_rates: Iterable[float] = (),
) -> list[MergeSetting]:
    """The unmerged model, then for every mode: every r (an int, or a list with one per layer), with `decreasing` also
    ToMe's decreasing schedule of each int r, and ATC's staged reduction at `merge_layers` for each of `keep_rates`;
    without repeats."""
    settings = [UNMERGED]
    layers = tuple(merge_layers) if merge_layers else None
    for mode in modes:
        candidates = []
        for merge_r in r_values:
            candidates.append(MergeSetting(mode, tuple(merge_r) if isinstance(merge_r, (list, tuple)) else merge_r))
            if decreasing and isinstance(merge_r, int):
                candidates.append(MergeSetting(mode, merge_r, merge_schedule="decreasing"))
        candidates += [MergeSetting(mode, merge_layers=layers, merge_keep_rate=rate) for rate in keep_rates if layers]
        settings += [setting for setting in candidates if setting not in settings]
    return settings


def num_tokens(config) -> int:
    """Tokens entering the first layer: the prefix tokens (class, distillation, registers) and the patches."""
    return config.num_prefix_tokens + config.num_patches


def check_settings(config, settings: Iterable[MergeSetting]):
    """Raise `ValueError` naming the first setting that `config`'s model cannot run at its image size: a list of r
    of another length than the model's depth, a negative r, or an r larger than a layer's matching can remove
    (`check_merge_schedule`'s message: the layer, the r and the limit)."""
    layers = config.num_hidden_layers
    for setting in settings:
        if setting.merge_mode == "none":
            continue
        if isinstance(setting.merge_r, tuple) and len(setting.merge_r) != layers:
            raise ValueError(
                f"merge_r {format_merge_r(setting.merge_r)} lists {len(setting.merge_r)} values but the model has "
                f"{layers} layers: give one int, or one per layer."
            )
        try:
            schedule = setting.schedule(config)  # the config checks the staged fields
            if min(schedule) < 0:
                raise ValueError(f"merge_r {format_merge_r(setting.merge_r)}: r must be 0 or more.")
            check_merge_schedule(
                schedule, layers, num_tokens(config), setting.merge_mode, config.num_prefix_tokens,
                where=f" at image_size={config.image_size}",
            )  # fmt: skip
        except (ValueError, StrictDataclassError) as error:
            raise ValueError(f"{setting.name}: {str(error).strip().splitlines()[-1]}") from None


def largest_constant_r(config, modes: Iterable[str]) -> int:
    """The largest r that every mode in `modes` can merge in every layer of `config`'s model (0: none)."""
    tokens, layers, modes = num_tokens(config), config.num_hidden_layers, tuple(modes)
    for merge_r in range(tokens, 0, -1):
        if merge_schedule(merge_r, tokens, layers, modes, config.num_prefix_tokens) == [merge_r] * layers:
            return merge_r
    return 0


def default_r_values(config, modes: Iterable[str]) -> list[int]:
    """A quarter, a half and all of `largest_constant_r`: light, medium and the heaviest merging every mode runs."""
    largest = largest_constant_r(config, modes)
    return sorted({max(1, largest // 4), max(1, largest // 2), largest}) if largest else []


# --------------------------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------------------------


def mlp_macs_per_token(config) -> int:
    """Multiply-accumulates of one token through the MLP: two matrices, or SwiGLU's three at its own width (two
    thirds of `intermediate_size` rounded up to 8, as `ConformerSwiGLU`)."""
    if config.mlp_type == "swiglu":
        return 3 * config.hidden_size * ((int(config.intermediate_size * 2 / 3) + 7) // 8 * 8)
    return 2 * config.hidden_size * config.intermediate_size


def encoder_macs(config, schedule: list[int]) -> int:
    """The encoder's multiply-accumulates per image when layer i merges `schedule[i]` tokens (see FLOP_FORMULA)."""
    tokens, hidden = num_tokens(config), config.hidden_size
    total = 0
    for merge_r in schedule:
        total += 4 * tokens * hidden**2 + 2 * tokens**2 * hidden + (tokens - merge_r) * mlp_macs_per_token(config)
        tokens -= merge_r
    return total


def flop_ratio(config, schedule: list[int]) -> float:
    """FLOPs of the merged encoder as a fraction of the unmerged one's (1 / this is the speed-up FLOPs allow)."""
    return encoder_macs(config, schedule) / encoder_macs(config, [0] * len(schedule))


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Throughput of one model over the rounds of `time_interleaved`."""

    images_per_s: float  # median over the rounds
    spread: float  # interquartile range of the rounds, in % of the median
    samples: list[float] = field(repr=False)  # images/s of each round
    calls_per_sample: int = 1


def quartiles(values: list[float]) -> list[float]:
    """The lower quartile, median and upper quartile of `values` (statistics' exclusive method); one value is all
    three."""
    return statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3


def synchronize(device: torch.device | str):
    """Wait for the device's queued work (on CUDA a forward returns before the GPU is done)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed_calls(model, inputs: torch.Tensor, calls: int) -> float:
    synchronize(inputs.device)
    start = time.perf_counter()
    for _ in range(calls):
        model(inputs)
    synchronize(inputs.device)
    return time.perf_counter() - start


def _calls_lasting(model, inputs: torch.Tensor, min_sample_s: float, max_calls: int = 1024) -> int:
    """The fewest calls, doubling from 1, that together last `min_sample_s` (timeit's autorange): robust to one
    slow or fast call, and more warm-up besides."""
    calls = 1
    while calls < max_calls and _timed_calls(model, inputs, calls) < min_sample_s:
        calls *= 2
    return calls


@torch.inference_mode()
def time_interleaved(
    models: Mapping,
    inputs: torch.Tensor,
    repeats: int,
    warmup: int = 2,
    calls: int | None = None,
    min_sample_s: float = 0.05,
    progress: bool = False,
) -> dict:
    """Images/s of each model (any callable taking `inputs`) on the same batch, measured interleaved: all models
    warmed up first (`warmup` calls each), then `repeats` rounds, each timing every model once in turn, the order
    rotated by one each round, so that a change of machine load or clock falls on all models alike. A sample is
    `calls` forward passes, by default the fewest (doubling) that last `min_sample_s`, so that the timer and Python's
    overhead do not dominate a small model. On CUDA the device is synchronised around every sample; the garbage
    collector waits until the end. Returns `{key: Timing}`."""
    keys, batch = list(models), len(inputs)
    calls_of = {}
    for key in keys:
        for _ in range(warmup):
            models[key](inputs)
        calls_of[key] = calls or _calls_lasting(models[key], inputs, min_sample_s)
    samples = {key: [] for key in keys}
    bar = tqdm(total=repeats * len(keys), desc="timing", unit="run", disable=not progress, leave=False)
    gc.collect()
    gc.disable()
    try:
        for round_index in range(repeats):
            shift = round_index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                elapsed = _timed_calls(models[key], inputs, calls_of[key])
                samples[key].append(batch * calls_of[key] / elapsed)
                bar.update()
    finally:
        gc.enable()
        bar.close()
    timings = {}
    for key, values in samples.items():
        lower, median, upper = quartiles(values)
        timings[key] = Timing(median, 100 * (upper - lower) / median, values, calls_of[key])
    return timings


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """`evaluate`'s accuracy (scikit-learn's `accuracy_score`): the fraction of images whose top class is the label."""
    return (logits.argmax(-1) == labels).double().mean().item()


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float | None:
    """The fraction of images whose label is among the `k` top classes; None unless there are more than `k` classes."""
    if logits.shape[-1] <= k:
        return None
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).double().mean().item()


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over images of KL(reference || model) between the softmax predictions, in float64."""
    reference_log_probs = F.log_softmax(reference_logits.double(), dim=-1)
    log_probs = F.log_softmax(logits.double(), dim=-1)
    return F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="none").sum(-1).mean().item()


# --------------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SettingResult:
    """What one setting measured; the fields are the columns of the result files."""

    setting: str
    merge_mode: str
    merge_r: int | list[int]
    merge_schedule: str  # "constant" or "decreasing" (for an int merge_r)
    merge_layers: list[int] | None  # ATC's staged reduction: the layers that merge
    merge_keep_rate: float | None  # and the share of patch tokens each keeps
    schedule: list[int]  # tokens merged per layer
    tokens_left: float  # after the last layer, prefix tokens included; mean over images
    flop_ratio: float  # encoder FLOPs / the unmerged encoder's
    accuracy: float  # fraction, as `evaluate`'s accuracy
    top5_accuracy: float | None  # None with 5 classes or fewer
    kl_divergence: float  # mean KL(unmerged || setting)
    images_per_s: float  # median of the interleaved rounds
    images_per_s_spread: float  # interquartile range, % of the median
    speedup: float  # images/s over the unmerged model's
    on_frontier: bool = False  # no other setting is both faster and at least as accurate


def setting_models(model, settings: Iterable[MergeSetting]) -> dict:
    """`{setting: model}`: `model` under each setting's config, in eval mode on `model`'s device. A merge setting
    changes no weight, so all of them share `model`'s weight tensors: memory for one copy, not one per setting."""
    shared = model.state_dict()
    models = {}
    for setting in settings:
        built = reconfigured(model, **setting.config_changes)
        if built is not model:
            built.load_state_dict(shared, assign=True)
        models[setting] = built.to(model.device).eval()  # non-persistent buffers follow the weights
    return models


@torch.inference_mode()
def predict_settings(models: Mapping, batches: Iterable[dict], num_batches: int | None = None, progress: bool = True):
    """Run every model on every batch (`{"pixel_values", "labels"}`; each batch is read once for all models).
    Returns `({key: logits [images, classes] float32 on the CPU}, {key: mean tokens left}, labels, first pixel
    values)`; the tokens left come from `output_merge_info=True`'s `token_sizes`."""
    reference = next(iter(models.values()))
    device, dtype = reference.device, reference.dtype
    logits = {key: [] for key in models}
    tokens = dict.fromkeys(models, 0)
    labels, first_batch = [], None
    total = None if num_batches is None else num_batches * len(models)
    bar = tqdm(total=total, desc="evaluating", unit="batch", disable=not progress)
    try:
        for batch in batches:
            pixel_values = batch["pixel_values"].to(device, dtype)
            first_batch = pixel_values if first_batch is None else first_batch
            labels.append(batch["labels"].cpu())
            for key, model in models.items():
                outputs = model(pixel_values, output_merge_info=True)
                logits[key].append(outputs.logits.float().cpu())
                tokens[key] += outputs.token_sizes.shape[1] * len(pixel_values)  # [batch, tokens left]
                bar.update()
    finally:
        bar.close()
    if not labels:
        raise ValueError("there are no images to evaluate")
    labels = torch.cat(labels)
    mean_tokens = {key: count / len(labels) for key, count in tokens.items()}
    return {key: torch.cat(values) for key, values in logits.items()}, mean_tokens, labels, first_batch


def mark_frontier(results: list[SettingResult]) -> list[SettingResult]:
    """Set `on_frontier`: no other setting is both faster and at least as accurate."""
    for row in results:
        row.on_frontier = not any(
            other.images_per_s > row.images_per_s and other.accuracy >= row.accuracy
            for other in results
            if other is not row
        )
    return results


def sweep(
    model,
    settings: Iterable[MergeSetting],
    batches: Iterable[dict],
    timing_repeats: int = 10,
    warmup: int = 2,
    num_batches: int | None = None,
    progress: bool = True,
) -> list[SettingResult]:
    """Evaluate and time `model` (on its device, in its dtype) under each setting; the unmerged model comes first
    and is the reference of KL, speed-up and FLOPs. `batches` yields `{"pixel_values", "labels"}` with the labels as
    the model's class ids; the first batch is also the timing batch. Raises `ValueError` for a setting the model
    cannot run and for no images."""
    settings = [UNMERGED] + [setting for setting in settings if setting != UNMERGED]
    config = model.config
    check_settings(config, settings)
    models = setting_models(model, settings)
    logits, tokens_left, labels, timing_inputs = predict_settings(models, batches, num_batches, progress)
    timings = time_interleaved(models, timing_inputs, timing_repeats, warmup, progress=progress)
    reference_logits, reference_speed = logits[UNMERGED], timings[UNMERGED].images_per_s
    results = []
    for setting in settings:
        schedule = setting.schedule(config)
        results.append(
            SettingResult(
                setting=setting.name,
                merge_mode=setting.merge_mode,
                merge_r=setting.config_changes["merge_r"],
                merge_schedule=setting.merge_schedule,
                merge_layers=setting.config_changes["merge_layers"],
                merge_keep_rate=setting.merge_keep_rate,
                schedule=schedule,
                tokens_left=tokens_left[setting],
                flop_ratio=flop_ratio(config, schedule),
                accuracy=accuracy(logits[setting], labels),
                top5_accuracy=top_k_accuracy(logits[setting], labels, 5),
                kl_divergence=mean_kl(reference_logits, logits[setting]),
                images_per_s=timings[setting].images_per_s,
                images_per_s_spread=timings[setting].spread,
                speedup=timings[setting].images_per_s / reference_speed,
            )
        )
    return mark_frontier(results)


def pick_setting(
    results: list[SettingResult], max_drop: float | None = None, min_speedup: float | None = None
) -> SettingResult | None:
    """The setting to run. With `max_drop`: the fastest whose accuracy is at most `max_drop` points (of 100) below
    the unmerged model's. With `min_speedup`: the most accurate (then the fastest) at least `min_speedup` times as
    fast as the unmerged model. None when no setting qualifies. `results[0]` is the unmerged model."""
    if (max_drop is None) == (min_speedup is None):
        raise ValueError("give exactly one of max_drop and min_speedup")
    if max_drop is not None:
        reference = results[0].accuracy
        # 1e-9: an accuracy exactly at the budget stays inside it despite the float subtraction
        candidates = [row for row in results if 100 * (reference - row.accuracy) <= max_drop + 1e-9]
        return max(candidates, key=lambda row: row.images_per_s, default=None)
    candidates = [row for row in results if row.speedup >= min_speedup]
    return max(candidates, key=lambda row: (row.accuracy, row.images_per_s), default=None)

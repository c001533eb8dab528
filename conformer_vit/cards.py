"""The model cards (README.md): of a converted Conformer folder, one Jinja template and the facts of a conversion;
of a trained model, a short text and the evaluation result.

    python convert_npz_to_hf.py --write_model_cards model_cards   # the cards of Google's released checkpoints

huggingface_hub renders the template (`ModelCard.from_template`) with the card's YAML metadata (`ModelCardData`).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from configuration_conformer import PRESETS, ConformerConfig
from token_merging import merge_schedule

IMAGENET_1K_CLASSES = 1000
IMAGENET_21K_CLASSES = 21843  # Google's ImageNet-21k label set (the released checkpoints' head)

SEED_CHECKPOINTS = ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50-ViT-B_16")
# Google's names use "R50+ViT-B_16"; our preset (and card file) names avoid the "+".
UPSTREAM_FILE_NAMES = {"R50-ViT-B_16": "R50+ViT-B_16"}
README_URL = "https://github.com/google-research/vision_transformer"
ISSUE_39 = f"{README_URL}/issues/39"
IMAGENET_1K_HUB_ID, IMAGENET_21K_HUB_ID = "ILSVRC/imagenet-1k", "ILSVRC/imagenet-21k"  # the Hub's dataset ids
# transformers' ports of the same Google checkpoints on the Hub: a converted card's `base_model`, keyed by
# (model type, classes, resolution).
HUB_PORTS = {
    **{(name, IMAGENET_21K_CLASSES, 224): f"google/vit-{size}-patch{patch}-224-in21k" for name, size, patch in (
        ("ViT-B_16", "base", 16), ("ViT-B_32", "base", 32), ("ViT-L_16", "large", 16), ("ViT-L_32", "large", 32),
        ("ViT-H_14", "huge", 14))},
    ("ViT-B_16", IMAGENET_1K_CLASSES, 224): "google/vit-base-patch16-224",
    ("ViT-B_16", IMAGENET_1K_CLASSES, 384): "google/vit-base-patch16-384",
    ("ViT-B_32", IMAGENET_1K_CLASSES, 384): "google/vit-base-patch32-384",
    ("ViT-L_16", IMAGENET_1K_CLASSES, 224): "google/vit-large-patch16-224",
    ("ViT-L_16", IMAGENET_1K_CLASSES, 384): "google/vit-large-patch16-384",
    ("ViT-L_32", IMAGENET_1K_CLASSES, 384): "google/vit-large-patch32-384",
}  # fmt: skip
# ImageNet-1k top-1 (%) of Google's released ImageNet-21k -> ImageNet-2012 fine-tuned checkpoints, keyed by
# (model type, fine-tuning resolution): only numbers Google states for those very files, with their source.
UPSTREAM_ACCURACY = {
    ("ViT-B_16", 224): (81.2, "google-research/vision_transformer README (the '-224' checkpoints)", README_URL),
    ("ViT-L_16", 224): (82.7, "google-research/vision_transformer README (the '-224' checkpoints)", README_URL),
    ("R50-ViT-B_16", 384): (85.082, "google-research/vision_transformer issue #39 (maintainer's answer)", ISSUE_39),
}

# The model card of a converted folder (Jinja, rendered by huggingface_hub's `ModelCard.from_template`). It lives here,
# not in a file beside the module, so that an installed package carries it. A backslash ends a line without a break.
CARD_TEMPLATE = """\
---
{{ card_data }}
---

# Conformer {{ name }}

{% if facts.source_class %}`{{ facts.source_file }}`, a 🤗 Transformers `{{ facts.source_class }}`\
{%- if facts.pretrained_classes %} with a {{ "{:,}".format(facts.pretrained_classes) }}-class head{% endif %} at \
{{ facts.source_image_size }}x{{ facts.source_image_size }}, converted into a `ConformerForImageClassification`:
a ViT whose tokens can be merged between the attention and the MLP of each layer.
{% if card_data.base_model %}
The weights are those of [{{ card_data.base_model }}](https://huggingface.co/{{ card_data.base_model }}), under its \
own license{% if card_data.license %} ({{ card_data.license }}){% endif %}.
{% endif %}
{%- else %}{% if facts.model_type %}Google's {{ name }} Vision Transformer{% else %}A Vision Transformer in Google's \
format{% endif %},
{%- if facts.pretrained_classes == imagenet_21k_classes %} pre-trained on ImageNet-21k (14M images, 21,843 classes) \
at 224x224
{%- elif facts.pretrained_classes == 1000 and facts.model_type %} pre-trained on ImageNet-21k and fine-tuned on \
ImageNet-1k (ILSVRC-2012) at {{ facts.source_image_size }}x{{ facts.source_image_size }}
{%- else %} with a {{ "{:,}-class".format(facts.pretrained_classes) if facts.pretrained_classes else "headless" }} \
head at {{ facts.source_image_size }}x{{ facts.source_image_size }}
{%- endif %}, converted from `{{ facts.source_file }}` into a 🤗 Transformers `ConformerForImageClassification`:
a ViT whose tokens can be merged between the attention and the MLP of each layer.

The weights come from [google-research/vision_transformer](https://github.com/google-research/vision_transformer),
released with [An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale]\
(https://arxiv.org/abs/2010.11929)
(Dosovitskiy et al., ICLR 2021), under the Apache 2.0 license.
{% endif %}
## Model

| | |
|---|---|
| Transformer | {{ config.num_hidden_layers }} layers, width {{ config.hidden_size }}, \
{{ config.num_attention_heads }} heads, MLP {{ config.intermediate_size }}\
{%- if config.mlp_type == "swiglu" %} (SwiGLU){% endif %} |
{%- if config.backbone_depths %}
| Patch embedding | ResNet (BiT, GroupNorm, weight-standardised convolutions, stages \
{{ config.backbone_depths }}), then a {{ config.patch_size // config.backbone_stride }}x\
{{- config.patch_size // config.backbone_stride }} projection: one token per \
{{ config.patch_size }}x{{ config.patch_size }} pixels |
{%- else %}
| Patch embedding | {{ config.patch_size }}x{{ config.patch_size }} patches |
{%- endif %}
| Resolution | {{ config.image_size }}x{{ config.image_size }} ({{ merging.tokens_in }} tokens\
{%- if prefix_tokens %} with the {{ prefix_tokens | join(" and ") }}{% endif %})\
{%- if config.image_size != facts.source_image_size %}; position embeddings resampled bilinearly from \
{{ facts.source_image_size }}x{{ facts.source_image_size }}{% endif %} |
| Head | {% if not config.num_labels %}none: `logits` are the pooled features ({{ config.classifier }})\
{%- elif facts.keep_head %}converted exactly{% if config.representation_size %}, with the tanh pre-logits layer \
({{ config.representation_size }} units){% endif %}{% else %}new, zero-initialised ({{ config.num_labels }} \
classes), as the ViT paper does for transfer{% endif %} |
| Classes | {{ config.num_labels }} |
| Preprocessing | {{ facts.preprocessing or "resize to %dx%d, scale to [-1, 1] (mean 0.5, std 0.5), as Google's models \
expect" % (config.image_size, config.image_size) }} |

## Token merging

{% if merging.merge_mode == "none" -%}
Merging is off in this folder: the model computes what the original model computes. Switch it on when loading, for
example `from_pretrained(..., trust_remote_code=True, merge_mode="bipartite", merge_r={{ example_merge_r }})`.
{%- else -%}
Configured as `merge_mode="{{ merging.merge_mode }}"`, `merge_r={{ merging.merge_r }}`, proportional attention \
{{ "on" if merging.proportional_attention else "off" }}, classifier `{{ merging.classifier }}`:
the {{ merging.tokens_in }} tokens are reduced to {{ merging.tokens_out }} by the last layer{% if prefix_tokens %} \
(merging leaves the {{ prefix_tokens | join(" and ") }} alone){% endif %}. The weights are the original model's, \
trained without merging; expect some loss of accuracy until the model is fine-tuned with merging on. Load with \
`merge_mode="none"` to get the original model's outputs.
{%- endif %}

## Usage

{% set auto = "AutoModelForImageClassification" if config.num_labels else "AutoModel" -%}
```python
from PIL import Image
from transformers import AutoImageProcessor, {{ auto }}

processor = AutoImageProcessor.from_pretrained("{{ facts.repo_id }}")
model = {{ auto }}.from_pretrained("{{ facts.repo_id }}", trust_remote_code=True)
image = Image.open("photo.jpg").convert("RGB")
{% if config.num_labels -%}
logits = model(**processor(images=image, return_tensors="pt")).logits
print(model.config.id2label[logits.argmax(-1).item()])
{%- else -%}
features = model(**processor(images=image, return_tensors="pt")).last_hidden_state  # [1, tokens left, width]
print(tuple(features.shape))
{%- endif %}
```
{% if not facts.source_class %}
## Upstream results

{% if accuracy -%}
Google reports {{ accuracy[0] }}% ImageNet-1k top-1 for this checkpoint ([{{ accuracy[1] }}]({{ accuracy[2] }})),
without token merging.
{%- elif upstream -%}
{% if facts.pretrained_classes == imagenet_21k_classes %}This is a pre-training checkpoint. {% endif %}Google \
reports, for its ImageNet-1k fine-tuned release of the same model:
{% for size, top1, source, url in upstream %}
- {{ size }}x{{ size }}: {{ top1 }}% top-1 ([{{ source }}]({{ url }}))
{%- endfor %}
{%- else -%}
No ImageNet-1k accuracy for this checkpoint could be confirmed from Google's own sources, so none is quoted here.
{%- endif %}
{% endif %}
## Conversion

Converted with `convert_npz_to_hf.py` of the Conformer repository:

```bash
{{ facts.command }}
```
{% if facts.source_class %}
The converter loads the source with transformers and renames its weights onto Conformer's modules \
(`ConformerForImageClassification.from_transformers`), checking every shape. With merging off, the outputs equal \
the source's (`last_hidden_state`, `pooler_output`, `logits`) to 1e-4.
{%- else %}
The converter reads the architecture from the checkpoint's array shapes and maps every array through one table.
With merging off, the logits equal those of timm's `_load_weights` of the same `.npz` (to 1e-4\
{%- if config.representation_size %};
the tanh pre-logits layer, which timm drops, is checked against `head(tanh(W·cls + b))` computed by hand{% endif %}).
{%- endif %}
{%- if facts.verification %}
Verified on a random batch when this folder was written: largest difference to {{ facts.reference }}
{%- for key, value in facts.verification.items() if key != "scale" %} {{ key }} {{ "%.2g" | format(value) }}\
{{ "," if not loop.last }}{% endfor %}.
{%- endif %}
{%- if not facts.source_class %}
The GELU is the exact (erf) one, as in timm and transformers; Google's Flax code used the tanh approximation.

## Citation

```bibtex
@inproceedings{dosovitskiy2021an,
  title={An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale},
  author={Alexey Dosovitskiy and Lucas Beyer and Alexander Kolesnikov and Dirk Weissenborn and Xiaohua Zhai and
          Thomas Unterthiner and Mostafa Dehghani and Matthias Minderer and Georg Heigold and Sylvain Gelly and
          Jakob Uszkoreit and Neil Houlsby},
  booktitle={International Conference on Learning Representations},
  year={2021}
}
```
{%- endif %}
"""


@dataclass
class CardFacts:
    """What a model card says about one conversion."""

    model_type: str | None  # `ViT-B_16`, ... or None for other shapes
    source_file: str  # the npz's file name, or the transformers source as given
    pretrained_classes: int | None  # the checkpoint's head
    source_image_size: int
    keep_head: bool
    repo_id: str  # the Hub id once pushed, the folder's path before
    command: str = ""
    verification: dict | None = None
    source_class: str | None = None  # a transformers source's class (`Dinov2Model`, ...); None for Google's npz
    preprocessing: str | None = None  # None: Google's [-1, 1] scaling
    reference: str = "timm"  # what `verification` compares with

    @property
    def upstream_accuracy(self):
        """(top-1, source, url) of this very checkpoint, where Google states it; else None."""
        if self.pretrained_classes == IMAGENET_1K_CLASSES and self.keep_head and not self.source_class:
            return UPSTREAM_ACCURACY.get((self.model_type, self.source_image_size))
        return None


def merge_summary(config: ConformerConfig) -> dict:
    """The merging settings and the token counts they give (the card's `token_merging` metadata)."""
    tokens_in = config.num_prefix_tokens + config.num_patches
    schedule = merge_schedule(
        config.merge_r_per_layer, tokens_in, config.num_hidden_layers, (config.merge_mode,), config.num_prefix_tokens
    )
    summary = {
        "merge_mode": config.merge_mode,
        "merge_r": config.merge_r if config.merge_mode != "none" else 0,
        "proportional_attention": config.proportional_attention,
        "classifier": config.classifier,
        "tokens_in": tokens_in,
        "tokens_out": tokens_in - sum(schedule),
    }
    if config.merge_mode != "none" and (config.merge_layers is not None or config.merge_schedule != "constant"):
        staged = {"merge_layers": config.merge_layers, "merge_keep_rate": config.merge_keep_rate}
        summary |= {key: value for key, value in staged.items() if value is not None}
        summary |= {"merge_schedule": config.merge_schedule, "merge_r_per_layer": schedule}
    return summary


def describe_merging(config: ConformerConfig) -> str:
    """`no merging`, `bipartite merging, r = 8`, `ward merging at layers 3, 6, 9 keeping 0.63 (r = 73/46/28)`."""
    if config.merge_mode == "none":
        return "no merging"
    schedule = "/".join(str(r) for r in config.merge_r_per_layer if r)
    if config.merge_layers is not None:
        sites = ", ".join(map(str, config.merge_layers))
        return f"{config.merge_mode} merging at layers {sites} keeping {config.merge_keep_rate} (r = {schedule})"
    if config.merge_schedule == "decreasing":
        return f"{config.merge_mode} merging, decreasing r = {schedule}"
    return f"{config.merge_mode} merging, r = {config.merge_r}"


def prefix_token_names(config: ConformerConfig) -> list[str]:
    """The tokens before the patches, which never merge: `["class token", "4 register tokens"]`, ..."""
    names = ["class token"] * config.class_token + ["distillation token"] * config.distillation_token
    registers = config.num_register_tokens
    return names + [f"{registers} register token{'s' * (registers > 1)}"] * bool(registers)


def hub_id(name: str | None) -> str | None:
    """`name` when it has the form of a Hub repository id (`org/model`): a card's `base_model`; else None."""
    if not name:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _card_data(config: ConformerConfig, facts: CardFacts, merging: dict, name: str, source_license: str | None):
    tags = ["vision", "image-classification", "vit", "token-merging", "conformer"]
    tags += ["hybrid"] * bool(config.backbone_depths)
    task = "image-classification" if config.num_labels else "image-feature-extraction"  # a backbone: features
    common = dict(library_name="transformers", pipeline_tag=task, tags=tags, token_merging=merging)
    if facts.source_class:
        return ModelCardData(license=source_license, base_model=hub_id(facts.source_file), **common)
    # Google released these shapes pre-trained on ImageNet-21k; for other shapes only the class count speaks.
    datasets = [IMAGENET_21K_HUB_ID] * bool(facts.model_type or facts.pretrained_classes == IMAGENET_21K_CLASSES)
    datasets += [IMAGENET_1K_HUB_ID] * (facts.pretrained_classes == IMAGENET_1K_CLASSES)
    accuracy, results = facts.upstream_accuracy, {}
    if accuracy:
        result = EvalResult(
            task_type="image-classification",
            dataset_type=IMAGENET_1K_HUB_ID,
            dataset_name="ImageNet-1k",
            dataset_split="validation",
            metric_type="accuracy",
            metric_name="Top-1 accuracy (%), without token merging",
            metric_value=accuracy[0],
            source_name=accuracy[1],
            source_url=accuracy[2],
        )
        results = dict(metrics=["accuracy"], model_name=f"conformer-{name}", eval_results=[result])
    base_model = HUB_PORTS.get((facts.model_type, facts.pretrained_classes, facts.source_image_size))
    return ModelCardData(license="apache-2.0", base_model=base_model, datasets=datasets or None, **results, **common)


def render_model_card(config: ConformerConfig, facts: CardFacts, source_license: str | None = None) -> str:
    """README.md for a converted folder: `CARD_TEMPLATE` filled in with the facts by huggingface_hub.

    `source_license`: a transformers source's own (its card's); Google's checkpoints are Apache 2.0."""
    if facts.source_class:
        name = facts.source_file.rstrip("/").rpartition("/")[2]
    else:
        name = UPSTREAM_FILE_NAMES.get(facts.model_type, facts.model_type) if facts.model_type else "ViT"
    merging = merge_summary(config)
    layers, tokens = config.num_hidden_layers, merging["tokens_in"]
    fits = lambda r: merge_schedule(r, tokens, layers, num_prefix_tokens=config.num_prefix_tokens) == [r] * layers
    card = ModelCard.from_template(
        _card_data(config, facts, merging, name, source_license),
        template_str=CARD_TEMPLATE,
        name=name,
        config=config,
        facts=facts,
        merging=merging,
        prefix_tokens=prefix_token_names(config),
        # The largest constant r up to ToMe's usual 16 that bipartite merging supports in every layer.
        example_merge_r=next((r for r in range(16, 0, -1) if fits(r)), 0),
        accuracy=facts.upstream_accuracy,
        upstream=[(size, *result) for (kind, size), result in UPSTREAM_ACCURACY.items() if kind == facts.model_type],
        imagenet_21k_classes=IMAGENET_21K_CLASSES,
    )
    return str(card).rstrip("\n") + "\n"


def seed_model_card(model_type: str) -> str:
    """The card of Google's ImageNet-21k checkpoint `model_type` (224 px, tanh pre-logits, 21,843 classes) as the
    converter writes it with default options; no weights are needed."""
    width = PRESETS[model_type]["hidden_size"]
    config = ConformerConfig.from_preset(
        model_type, image_size=224, num_labels=IMAGENET_21K_CLASSES, representation_size=width
    )
    file_name = UPSTREAM_FILE_NAMES.get(model_type, model_type) + ".npz"
    command = f"python convert_npz_to_hf.py --npz_path {file_name} --output_dir {model_type}-conformer --verify"
    facts = CardFacts(model_type, file_name, IMAGENET_21K_CLASSES, 224, True, f"{model_type}-conformer", command)
    return render_model_card(config, facts)


def write_model_cards(directory="model_cards") -> list[Path]:
    """The cards of Google's released checkpoints, one `{model_type}.md` each, written to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{model_type}.md" for model_type in SEED_CHECKPOINTS]
    for model_type, path in zip(SEED_CHECKPOINTS, paths):
        path.write_text(seed_model_card(model_type), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# The card of a trained model (run_image_classification.py)
# --------------------------------------------------------------------------------------------------------------------

TRAINING_CARD_TEXT = """# {name}

A Conformer ({config.num_hidden_layers} layers, width {config.hidden_size}, {config.image_size} px, {merging}, \
`{config.classifier}` classifier) {origin} on `{dataset}` with `run_image_classification.py`: {score} on its \
validation split.

Training: {args.max_steps} steps of {batch} images, `{optimizer}` at learning rate {args.learning_rate} \
({scheduler} schedule, {warmup} warmup steps), weight decay {args.weight_decay}, seed {args.seed}.

```python
from PIL import Image
from transformers import pipeline

classify = pipeline("image-classification", model={location!r}, trust_remote_code=True)
print(classify(Image.open("photo.jpg")))
```
"""


def write_training_card(
    args, eval_results: list[dict], base_model: str | None, dataset: str, config, base_license: str | None = None
):
    """README.md of a model trained by `run_image_classification.py` (`args`: its `TrainingArguments`), with the Hub's
    metadata (`base_model`, `datasets`, a `model-index` with the evaluation accuracy, the license: the base model's
    `base_license` where it is known, Apache-2.0 from scratch or from Google's checkpoints) and a short text saying
    what was trained from what, on what, and how to load it: by its Hub id once pushed, by its folder before."""
    name = os.path.basename(os.path.normpath(args.output_dir))
    evaluation = next((entry for entry in reversed(eval_results) if "eval_accuracy" in entry), None)
    results = [
        EvalResult(
            task_type="image-classification", task_name="Image classification", dataset_type=dataset,
            dataset_name=dataset, dataset_split="validation", metric_type="accuracy", metric_name="Accuracy",
            metric_value=round(evaluation["eval_accuracy"], 4),
        )
    ] if evaluation else None  # fmt: skip

    def hub_id_of(source):  # a local folder is not on the Hub even when its path looks like `org/name`
        return None if source is None or os.path.exists(source) else hub_id(source)

    data = ModelCardData(
        model_name=name, base_model=hub_id_of(base_model),
        datasets=[dataset] if dataset != "digits" and hub_id_of(dataset) else None,  # digits: scikit-learn's own
        license=base_license if base_model and not str(base_model).endswith(".npz") else "apache-2.0",
        library_name="transformers", pipeline_tag="image-classification",
        tags=["image-classification", "vision", "conformer", "token-merging"], eval_results=results,
    )  # fmt: skip
    merging = describe_merging(config)
    text = TRAINING_CARD_TEXT.format(
        name=name, config=config, merging=merging, dataset=dataset, args=args,
        origin=f"fine-tuned from `{base_model}`" if base_model else "trained from scratch",
        score=f"{evaluation['eval_accuracy']:.4f} accuracy" if evaluation else "no evaluation",
        batch=args.train_batch_size * args.world_size * args.gradient_accumulation_steps,
        optimizer=getattr(args.optim, "value", args.optim),  # the plain name, not `OptimizerNames.SGD`
        scheduler=getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        warmup=args.get_warmup_steps(args.max_steps) if args.max_steps > 0 else args.warmup_steps,
        location=(args.push_to_hub and args.hub_model_id) or args.output_dir,
    )  # fmt: skip
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").save(os.path.join(args.output_dir, "README.md"))


# --------------------------------------------------------------------------------------------------------------------
# The card of a folder evaluate_merging.py saved with its picked merge setting
# --------------------------------------------------------------------------------------------------------------------

MERGING_CARD_TEXT = """# {name}

`{source}` with token merging set to **{setting}** ({fields}): {reason}. \
The weights are the source's, unchanged; load with `merge_mode="none"` to get its original outputs.

## Measured by `evaluate_merging.py`

{description}

{table}

```bash
{command}
```

## Usage

```python
from transformers import pipeline

classify = pipeline("image-classification", model="{name}", trust_remote_code=True)
```
"""


def render_merging_card(
    folder_name: str, summary: dict, results, picked, fields: dict, reason: str, description: str, table: str,
    source_license=None,
):  # fmt: skip
    """README.md of a folder `evaluate_merging.py --save_folder` wrote: the Hub's metadata (a `model-index` with one
    accuracy per setting measured) and a short text: the `picked` setting (its config `fields`), the `reason` it was
    picked, the `table`."""

    def remote_id(name):  # a local folder is not on the Hub even when its path looks like `org/name`
        return None if name is None or os.path.exists(name) else hub_id(name)

    dataset, split = summary["dataset"], summary["split"]
    evaluations = [
        EvalResult(
            task_type="image-classification", task_name="Image classification", dataset_type=dataset,
            dataset_name=dataset, dataset_split=split, metric_type="accuracy",
            metric_name=f"Accuracy, {row.setting} ({row.speedup:.2f}x the unmerged images/s)",
            metric_value=row.accuracy,
        )
        for row in results
    ]  # fmt: skip
    data = ModelCardData(
        model_name=folder_name, base_model=remote_id(summary["model"]), license=source_license,
        datasets=[dataset] if remote_id(dataset) and dataset != "digits" else None, library_name="transformers",
        pipeline_tag="image-classification", tags=["image-classification", "vision", "conformer", "token-merging"],
        eval_results=evaluations,
    )  # fmt: skip
    text = MERGING_CARD_TEXT.format(
        name=folder_name, source=summary["model"], setting=picked.setting, merge_mode=picked.merge_mode,
        fields=", ".join(f"`{key}={value!r}`" for key, value in fields.items() if value is not None),
        reason=reason, description=description, table=table,
        command=summary["command"],
    )  # fmt: skip
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))

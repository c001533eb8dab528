"""Convert Google's ViT checkpoints (`.npz`) or models of transformers' ViT family into Hub-ready Conformer folders.

    python convert_npz_to_hf.py --npz_path ViT-B_16.npz --output_dir vit-b16-conformer --verify
    python convert_npz_to_hf.py --npz_path R50+ViT-B_16.npz --output_dir r50-vit-b16 --image_size 384 --num_labels 10
    python convert_npz_to_hf.py --from_transformers facebook/dinov2-small --output_dir dinov2-s-conformer
    python convert_npz_to_hf.py --write_model_cards model_cards   # regenerate the cards of the released checkpoints

The reading is `conformer_vit.google_npz` (never unpickling) and `conformer_vit.sources` (the ViT family); the folder
is written by `conformer_vit.hub_folder`, staged beside `--output_dir` and moved into place only once it is complete
(and, with `--verify`, checked against timm's own loader).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig

from configuration_conformer import CLASSIFIERS, MERGE_MODES, ConformerConfig
from conformer_vit.cards import CardFacts, render_model_card, write_model_cards
from conformer_vit.google_npz import (
    CheckpointReader,
    ConversionError,
    convert_in_memory,
    keeps_checkpoint_head,
    label_maps,
    load_npz,
    seeded_new_weights,
)
from conformer_vit.hub_folder import check_output_dir, publish, write_folder
from conformer_vit.sources import load_image_processor, load_model, source_license
from conformer_vit.timm_reference import timm_reference
from token_merging import parse_merge_r, parse_staged


@torch.no_grad()
def verify_folder(folder, npz_path, architecture, tolerance: float = 1e-4) -> dict[str, float]:
    """Load `folder` as a user would (remote code) and compare it with timm on a random batch in [-1, 1].

    Returns the largest differences: `features` (the final normed tokens) and, where timm gives the same head,
    `logits` (timm's head, or with `pre_logits` `head(tanh(W·cls + b))` computed by hand from the npz arrays); `scale`
    is the reference's largest value. Raises if an output is not finite or differs by more than `tolerance` times the
    scale (at least 1)."""
    from transformers import AutoModelForImageClassification

    # The weights are what is verified: merging changes the token count, so it is switched off for the comparison.
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, merge_mode="none").eval()
    config = model.config
    reference = timm_reference(npz_path, config, architecture)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, config.num_channels, config.image_size, config.image_size, generator=generator) * 2 - 1
    tokens = reference.forward_features(pixels)  # [batch, tokens, hidden], after the final norm
    ours = model.conformer(pixels).last_hidden_state
    result = {"features": (ours - tokens).abs().max().item(), "scale": tokens.abs().max().item()}
    if keeps_checkpoint_head(config, architecture) and config.classifier == "token":  # "gap" pools differently
        pooled = reference.forward_head(tokens, pre_logits=True)  # the class token
        if config.representation_size is None:
            expected = reference.head(pooled)  # as timm's loader filled it
        else:  # head(tanh(W·cls + b)), straight from the file's arrays
            with load_npz(npz_path) as params:
                reader = CheckpointReader(params)
                keys = ("pre_logits/kernel", "pre_logits/bias", "head/kernel", "head/bias")
                pre_weight, pre_bias, weight, bias = (torch.from_numpy(reader.get(key)) for key in keys)
            expected = torch.tanh(pooled @ pre_weight + pre_bias) @ weight + bias
        result["logits"] = (model(pixels).logits - expected).abs().max().item()
        result["scale"] = expected.abs().max().item()
    if not all(math.isfinite(value) for value in result.values()):
        raise ConversionError("verification failed: the outputs on a random batch are not finite (NaN or inf)")
    limit = tolerance * max(1.0, result["scale"])
    worst = max(result.get("logits", 0.0), result["features"])
    if worst > limit:
        raise ConversionError(
            f"verification failed: the converted model differs from timm's by {worst:.3g} (> {limit:.3g})"
        )
    return result


def _merging_flags(config: ConformerConfig) -> str:
    if config.merge_mode == "none":
        return ""
    merge_r = ",".join(map(str, config.merge_r)) if isinstance(config.merge_r, list) else config.merge_r
    return f" --merge_mode {config.merge_mode} --merge_r {merge_r}"


def convert(
    npz_path,
    output_dir,
    model_type: str | None = None,
    image_size: int | None = None,
    num_labels: int | None = None,
    id2label: dict | None = None,
    overwrite: bool = False,
    verify: bool = False,
    push_to_hub: str | None = None,
    onnx_path: str | None = None,
    **config_overrides,
) -> Path:
    """Convert `npz_path` into the Hub-ready folder `output_dir`; returns its path.

    Nothing is written to `output_dir` unless the whole conversion (and, with `verify`, the comparison with timm)
    succeeds: the folder is staged beside it and moved into place at the end. `overwrite` replaces only a folder that
    a previous conversion wrote. `onnx_path`: also export the model, merging as configured, to this ONNX file.
    """
    npz_path, output_dir = Path(npz_path), Path(output_dir)
    check_output_dir(output_dir, npz_path, overwrite, onnx_path)
    options = dict(model_type=model_type, image_size=image_size, num_labels=num_labels, id2label=id2label)
    with load_npz(npz_path) as params:
        model, architecture = convert_in_memory(params, **options, **config_overrides)
    config = model.config
    # The command that reproduces this conversion (file names only).
    command = f"python convert_npz_to_hf.py --npz_path {npz_path.name} --output_dir {output_dir.name}"
    command += f" --model_type {model_type}" * bool(model_type)
    command += f" --image_size {config.image_size}" * (config.image_size != architecture.image_size)
    if id2label is not None:
        command += " --id2label labels.json"
    elif config.num_labels != architecture.num_classes:
        command += f" --num_labels {config.num_labels}"
    command += _merging_flags(config) + f" --classifier {config.classifier}" * (config.classifier != "token")
    facts = CardFacts(
        model_type=architecture.model_type,
        source_file=npz_path.name,
        pretrained_classes=architecture.num_classes,
        source_image_size=architecture.image_size,
        keep_head=keeps_checkpoint_head(config, architecture),
        repo_id=push_to_hub or str(output_dir),
        command=command + " --verify",
    )

    def card(staged: Path) -> str:
        if verify:
            facts.verification = verify_folder(staged, npz_path, architecture)
        return render_model_card(model.config, facts)

    write_folder(model, output_dir, card, npz_path, overwrite)
    if facts.verification:
        differences = ", ".join(f"{key} {value:.3g}" for key, value in facts.verification.items() if key != "scale")
        print(f"verify: largest |ours - timm| on a random batch: {differences}")
    publish(model, output_dir, push_to_hub, onnx_path)
    return output_dir


def convert_transformers(
    source,
    output_dir,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    onnx_path: str | None = None,
    trust_remote_code: bool = False,
    **config_overrides,
) -> Path:
    """Convert a model of transformers' ViT family, or a saved, trained or converted Conformer (a folder, a Hub id such
    as `facebook/dinov2-small`, or a model object) into the Hub-ready folder `output_dir`, as `convert` does for
    Google's npz; returns its path.

    `config_overrides` go to the project's loader (`merge_mode`, `merge_r`, `image_size`, `num_labels`,
    `classifier`, ...); the card names the source as its base model. A Conformer folder is loaded with this package's
    code; `trust_remote_code` runs the folder's own code instead."""
    is_path = isinstance(source, (str, os.PathLike))
    output_dir, folder = Path(output_dir), Path(source) if is_path and Path(source).is_dir() else None
    check_output_dir(output_dir, folder, overwrite, onnx_path)
    try:
        with seeded_new_weights():
            model = load_model(source, trust_remote_code=trust_remote_code, **config_overrides).eval()
    except (TypeError, ValueError, StrictDataclassError) as error:  # an unsupported class, a bad override
        raise ConversionError(str(error)) from None
    if is_path:  # the config's own fields, read without running any code the folder carries
        source_config, _ = PretrainedConfig.get_config_dict(source)
        name, source_class = str(source), (source_config.get("architectures") or ["?"])[0]
    else:
        source_config, name = source.config.to_dict(), type(source).__name__
        source_class = name
    source_size = source_config.get("vision_config", source_config)["image_size"]  # CLIPModel: its vision tower
    has_head = "ForImageClassification" in source_class
    source_classes = len(source_config.get("id2label") or {}) or source_config.get("num_labels")
    processor = load_image_processor(source, model.config)
    command = f"python convert_npz_to_hf.py --from_transformers {name} --output_dir {output_dir.name}"
    command += f" --image_size {model.config.image_size}" * (model.config.image_size != source_size)
    facts = CardFacts(
        model_type=None,
        source_file=name,
        pretrained_classes=source_classes if has_head else None,
        source_image_size=source_size,
        # from_transformers keeps the source's head unless the classes or the classifier change
        keep_head=has_head and model.config.num_labels == source_classes and "classifier" not in config_overrides,
        repo_id=push_to_hub or str(output_dir),
        command=command + _merging_flags(model.config),
        source_class=source_class,
        preprocessing=f"`{type(processor).__name__}` (mean {processor.image_mean}, std {processor.image_std})",
        reference=f"`{source_class}`",
    )
    license_name = source_license(source)
    write_folder(model, output_dir, lambda staged: render_model_card(model.config, facts, license_name), folder,
                 overwrite, processor)  # fmt: skip
    publish(model, output_dir, push_to_hub, onnx_path)
    return output_dir


def _read_id2label(path) -> dict[int, str]:
    try:
        labels = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"--id2label {path}: cannot read a JSON label map ({error})") from None
    if isinstance(labels, list):
        labels = dict(enumerate(labels))
    if not isinstance(labels, dict):
        raise ConversionError(f'--id2label {path}: expected a JSON object {{"0": "name", ...}} or a list of names')
    try:
        return {int(index): str(name) for index, name in labels.items()}
    except ValueError:
        raise ConversionError(f"--id2label {path}: class ids must be integers") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `ValueError`s, so that `main` reports them as it reports every other bad input."""

    def error(self, message):
        raise ConversionError(message)


ARGUMENTS = [  # (flag, argparse keywords, help)
    ("--npz_path", {}, "Google's checkpoint, e.g. ViT-B_16.npz or R50+ViT-B_16.npz."),
    (
        "--from_transformers",
        dict(metavar="MODEL"),
        "Instead of --npz_path: a transformers ViT-family folder or Hub id (ViT, DeiT, DINOv2, CLIP, SigLIP, ...).",
    ),
    ("--output_dir", {}, "Folder to write: absent, empty, or (with --overwrite) a previous conversion."),
    ("--model_type", {}, "Expected model (ViT-B_16, ..., R50+ViT-B_16): a cross-check of the shapes read."),
    ("--image_size", dict(type=int), "Resolution; position embeddings are resampled bilinearly (as timm)."),
    ("--num_labels", dict(type=int), "Classes (default: the checkpoint's); another count gives a zero head."),
    ("--id2label", {}, 'JSON file naming the classes ({"0": "cat", ...} or a list); sets num_labels.'),
    ("--merge_mode", dict(choices=MERGE_MODES), "Token merging between attention and MLP (default: the source's)."),
    ("--merge_r", {}, "Tokens merged per layer: one int, or one per layer (comma-separated); default: the source's."),
    ("--merge_layers", {}, "ATC's staged merging instead of --merge_r: the layers that merge (0-based, e.g. 3,6,9)."),
    ("--merge_keep_rate", {}, "With --merge_layers: the share of patch tokens each site keeps (one, or one per site)."),
    ("--classifier", dict(choices=CLASSIFIERS), "Pooling for the head (default: the source's); 'cnn' gets a new head."),
    ("--push_to_hub", dict(metavar="REPO_ID"), "Upload the folder to this Hub repository afterwards."),
    ("--verify", dict(action="store_true"), "Load the folder back and compare its outputs with timm's loader."),
    ("--export_onnx", dict(metavar="PATH"), "Also export the model (merging on) to this ONNX file (+ PATH.data)."),
    ("--overwrite", dict(action="store_true"), "Replace an --output_dir that a previous conversion wrote."),
    (
        "--trust_remote_code",
        dict(action="store_true"),
        "With --from_transformers on a Conformer folder: run the folder's own code (default: this package's).",
    ),
    (
        "--write_model_cards",
        dict(nargs="?", const="model_cards", metavar="DIR"),
        "Regenerate the cards of the released checkpoints (default: model_cards/) and exit.",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Convert a Google ViT checkpoint (.npz) or a transformers ViT-family model into a Hub-ready "
        "Conformer folder."
    )
    for flag, keywords, help_text in ARGUMENTS:
        parser.add_argument(flag, help=help_text, **keywords)
    return parser


def main(argv=None) -> int:
    """The command line: 0 on success; on bad input one `error: ...` line on stderr and status 2."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        args = build_parser().parse_args(argv)
        if args.write_model_cards:
            print("\n".join(map(str, write_model_cards(args.write_model_cards))))
            return 0
        if bool(args.npz_path) == bool(args.from_transformers) or not args.output_dir:
            raise ConversionError("--output_dir and one of --npz_path, --from_transformers are required")
        merge_r = parse_merge_r(args.merge_r) if args.merge_r is not None else None
        if merge_r not in (0, None) and (args.merge_mode == "none" or args.merge_mode is None and args.npz_path):
            raise ConversionError(f"--merge_r needs --merge_mode ({', '.join(MERGE_MODES[1:])})")
        id2label = _read_id2label(args.id2label) if args.id2label else None
        common = dict(overwrite=args.overwrite, push_to_hub=args.push_to_hub, onnx_path=args.export_onnx)
        merging = dict(merge_mode=args.merge_mode, merge_r=merge_r)  # only what is given: a Conformer keeps its own
        if (args.merge_layers is None) != (args.merge_keep_rate is None):
            raise ConversionError("--merge_layers and --merge_keep_rate go together")
        if args.merge_layers is not None:
            merging.update(parse_staged(args.merge_layers, args.merge_keep_rate))
        common.update({key: value for key, value in merging.items() if value is not None})
        if args.npz_path:
            options = dict(model_type=args.model_type, image_size=args.image_size, num_labels=args.num_labels)
            options.update(id2label=id2label, verify=args.verify, classifier=args.classifier or "token")
            output_dir = convert(args.npz_path, args.output_dir, **options, **common)
        elif args.model_type or args.verify:
            raise ConversionError("--model_type and --verify check an .npz against timm; not for a transformers model")
        else:
            overrides = dict(image_size=args.image_size, num_labels=args.num_labels, classifier=args.classifier)
            overrides = {key: value for key, value in overrides.items() if value is not None}
            if id2label is not None:
                overrides.update(label_maps(id2label), num_labels=len(id2label))
            trust = dict(trust_remote_code=args.trust_remote_code)
            output_dir = convert_transformers(args.from_transformers, args.output_dir, **common, **trust, **overrides)
    except (ValueError, OSError) as error:  # OSError: disk full, permissions; still one line
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    print(f"wrote {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

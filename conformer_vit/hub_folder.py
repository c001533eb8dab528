"""A Hub folder, written all or nothing: config and weights, the remote code (`configuration_conformer.py`,
`token_merging.py`, `modeling_conformer.py`: the files `save_pretrained` copies), the image processor, the model card;
and the model's ONNX export.

Folders are staged beside their target and moved into place only once complete, so a failure leaves nothing half
written, and `overwrite` replaces only a folder of the files a Hub folder holds.
"""

import os
from collections.abc import Callable
from pathlib import Path

import torch

import modeling_conformer
from configuration_conformer import ConformerConfig
from conformer_vit.output_paths import check_output

STAGING_MARK = ".converting-"  # staging folders: `.{output name}.converting-{pid}` beside the output
ONNX_MARK = "conformer_vit.export_onnx"  # a metadata key in every ONNX file written here: only those are replaced


class FolderError(ValueError):
    """A folder that cannot be written where it was asked: tools print the message as one `error:` line."""


def remote_code_files() -> tuple[str, ...]:
    """The remote-code files of every Hub folder: the modeling file and what it imports relatively, as transformers'
    own `get_relative_import_files` finds them (`save_pretrained` copies exactly these)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    modeling = Path(modeling_conformer.__file__)
    return tuple(sorted({modeling.name, *(Path(path).name for path in get_relative_import_files(str(modeling)))}))


def hub_folder_files() -> tuple[str, ...]:
    """Exactly what a written folder holds: `overwrite` replaces a folder holding these and nothing else."""
    written = ("README.md", "config.json", "model.safetensors", "preprocessor_config.json")
    return tuple(sorted((*written, *remote_code_files())))


def default_image_processor(config: ConformerConfig, image_mean=None, image_std=None):
    """transformers' `ViTImageProcessor` at the model's size; by default Google's statistics (mean 0.5, std 0.5:
    pixels scaled to [-1, 1]), repeated for the model's channels."""
    from transformers import ViTImageProcessor

    google = [0.5] * config.num_channels
    size = {"height": config.image_size, "width": config.image_size}
    return ViTImageProcessor(size=size, image_mean=list(image_mean or google), image_std=list(image_std or google))


def _foreign_entries(folder: Path) -> list[str]:
    """What in `folder` no Hub folder holds (anything but plain files of `hub_folder_files()`)."""
    return sorted(
        p.name for p in folder.iterdir() if p.name not in hub_folder_files() or p.is_symlink() or not p.is_file()
    )


def _remove_conversion(folder: Path):
    """Delete a Hub folder written here: only its files by name, so `rmdir` fails on anything else."""
    for name in hub_folder_files():
        (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def is_hub_folder(folder: Path) -> bool:
    """Whether `folder` holds nothing but what a Hub folder written here holds (so that it may be replaced)."""
    return folder.is_dir() and not _foreign_entries(folder)


def is_our_onnx(path: Path) -> bool:
    """Whether `path` is an ONNX file `export_onnx` wrote (it marks its files), or the weights file beside one."""
    if path.name.endswith(".onnx.data") or path.suffix == ".data":
        path = path.with_suffix("")
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # not installed, not a file, not ONNX: not ours
        return False
    return any(prop.key == ONNX_MARK for prop in graph.metadata_props)


def check_output_dir(output_dir: Path, sources, overwrite: bool, onnx_path=None):
    """Refuse, before any work, an `--output_dir` that is, holds or lies inside a source, holds the working directory,
    is a file, or holds anything but a Hub folder written here (without `overwrite`: anything at all); and an
    `onnx_path` (or its `.data` weights) that lies inside `output_dir` or a source, or is a file `export_onnx` did not
    write (without `overwrite`: any file)."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources or [])
    target, cwd = Path(output_dir).resolve(), Path.cwd().resolve()
    if target in (cwd, *cwd.parents):
        raise FolderError(f"--output_dir {output_dir} holds the current directory; name a new folder for the result")
    check_output(output_dir, sources, flag="--output_dir", is_ours=is_hub_folder, overwrite=overwrite, folder=True)
    if onnx_path:
        onnx_target = Path(onnx_path).resolve()
        if target == onnx_target or target in onnx_target.parents:
            raise FolderError(f"--export_onnx {onnx_path} lies inside --output_dir {output_dir}; export beside it")
        for path in (Path(onnx_path), Path(f"{onnx_path}.data")):
            check_output(path, sources, flag="--export_onnx", is_ours=is_our_onnx, overwrite=overwrite)


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def write_folder(
    model,
    output_dir: Path,
    card: Callable[[Path], str],
    source: Path | None,
    overwrite: bool,
    processor=None,
):
    """Write the Hub folder of `model` to `output_dir`, all or nothing: config.json (with `auto_map`),
    model.safetensors, the remote-code files (`save_pretrained` copies them, as the classes are registered),
    preprocessor_config.json (`processor`, default `default_image_processor`) and README.md, the text of
    `card(staged folder)` (written last, so it may load and check the staged folder). It is staged beside `output_dir`
    and moved into place only once complete."""
    target = output_dir.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{STAGING_MARK}*"):  # left by killed conversions to `target`
        pid = stale.name.rpartition(STAGING_MARK)[2]
        if pid.isdigit() and not _process_is_running(int(pid)) and stale.is_dir() and not _foreign_entries(stale):
            _remove_conversion(stale)
    staging = target.parent / f".{target.name}{STAGING_MARK}{os.getpid()}"
    try:
        staging.mkdir()
        model.save_pretrained(staging)
        (processor or default_image_processor(model.config)).save_pretrained(staging)
        (staging / "README.md").write_text(card(staging), encoding="utf-8")
        check_output_dir(output_dir, source, overwrite)  # again: another process may have written there meanwhile
        if target.exists():
            _remove_conversion(target)
        staging.replace(target)
    finally:
        if staging.is_dir():
            _remove_conversion(staging)


def publish(model, output_dir: Path, push_to_hub: str | None = None, onnx_path=None):
    """What follows a written folder: the ONNX export and the upload (the folder is complete if either fails)."""
    from huggingface_hub import create_repo, upload_folder

    if onnx_path:
        difference = export_onnx(model, onnx_path)
        print(f"wrote {onnx_path}: largest |onnxruntime - eager| on a random batch {difference:.3g}")
    if push_to_hub:
        try:  # the folder is already the repository: it is uploaded as it is
            create_repo(push_to_hub, exist_ok=True)
            upload_folder(repo_id=push_to_hub, folder_path=str(output_dir), commit_message="Convert a ViT checkpoint")
        except Exception as error:  # network, credentials, offline mode: the folder itself is complete
            raise FolderError(
                f"wrote {output_dir}, but uploading it to {push_to_hub} failed ({type(error).__name__}: {error})"
            ) from None


class _OneOutput(torch.nn.Module):
    """The model's one output that an ONNX graph returns (the exporter flattens a whole output dataclass)."""

    def __init__(self, model, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, pixel_values):
        return getattr(self.model(pixel_values), self.name)


@torch.no_grad()
def export_onnx(model, path, tolerance: float = 1e-4) -> float:
    """Export `model` (eval mode, merging as configured) with torch's dynamo exporter to `path` (the weights to
    `path.data` beside it): input `pixel_values` with a dynamic batch dimension, output `logits` (a `ConformerModel`
    backbone: `last_hidden_state`). Every merge mode is
    one graph, so the merging runs inside ONNX. Checked with onnxruntime against eager on a random batch of another
    size than the traced one; returns the largest difference (raises above `tolerance` times the logits' scale)."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (what torch's exporter needs)
    except ImportError as error:
        raise FolderError(
            f"ONNX export needs the export extra: pip install 'conformer-vit[export]' ({error})"
        ) from None
    config, path = model.eval().config, Path(path)
    output_name = "logits" if hasattr(model, "classifier") else "last_hidden_state"
    model = _OneOutput(model, output_name)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, config.num_channels, config.image_size, config.image_size, generator=generator) * 2 - 1
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            model,
            (pixels[:2],),
            str(path),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=[output_name],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    except Exception as error:  # the exporter raises many kinds, wrapping the cause; one line names the cause
        cause = error.__cause__ or error
        raise FolderError(
            f"ONNX export failed ({type(cause).__name__}: {(str(cause) or '?').splitlines()[0]})"
        ) from None
    import onnx

    graph = onnx.load(str(path), load_external_data=False)  # the weights stay in `path.data`, untouched
    onnx.helper.set_model_props(graph, {ONNX_MARK: "1"})
    onnx.save(graph, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run([output_name], {"pixel_values": pixels.numpy()})
    expected = model(pixels)
    difference = (torch.from_numpy(exported) - expected).abs().max().item()
    if not difference <= tolerance * max(1.0, expected.abs().max().item()):  # NaN fails too
        raise FolderError(f"ONNX export of {path} differs from eager by {difference:.3g} on a random batch")
    return difference

"""The one check every tool makes before it writes anything: is this output path safe?

A tool never writes over a file it did not write itself, and never over, into or around any of its inputs. Each tool
calls `check_output` once per output, with every input it reads, before any work starts.
"""

import os
from collections.abc import Callable, Iterable
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that would destroy something: tools print the message as one `error:` line."""


def _local_paths(inputs: Iterable) -> list[Path]:
    """The inputs that are local files or folders (a Hub id or a model object is no path on this machine)."""
    paths = []
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and Path(item).exists():
            paths.append(Path(item).resolve())
    return paths


def check_output(
    path,
    inputs: Iterable = (),
    *,
    flag: str,
    is_ours: Callable[[Path], bool],
    overwrite: bool = True,
    folder: bool = False,
) -> Path:
    """Refuse `path` (named `flag` in messages) when writing it could destroy something; return it resolved.

    Refused: a path that is an input, lies inside an input folder, or is a folder holding an input; a path under a
    file; for a file output, an existing folder, or an existing file that `is_ours(path)` does not recognise as one
    this tool wrote (or, without `overwrite`, any existing file); for a `folder` output, an existing file, or an
    existing folder that `is_ours` does not recognise (without `overwrite`: any non-empty folder). `inputs` may hold
    Hub ids and model objects too: only local paths are compared."""
    target = Path(path).resolve()
    for source in _local_paths(inputs):
        if target == source:
            raise OutputPathError(f"{flag} {path} is one of the inputs; choose another path")
        if source.is_dir() and source in target.parents:
            raise OutputPathError(f"{flag} {path} lies inside the input folder {source}; choose a path outside it")
        if target in source.parents:
            raise OutputPathError(f"{flag} {path} holds the input {source}; choose a path that holds no input")
    existing = next(parent for parent in (target, *target.parents) if parent.exists())
    if existing != target and not existing.is_dir():
        raise OutputPathError(f"{flag} {path} lies under {existing}, which is a file")
    if not target.exists():
        return target
    if folder:
        if not target.is_dir():
            raise OutputPathError(f"{flag} {path} exists and is not a folder")
        if not any(target.iterdir()):
            return target
    elif target.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file name")
    if not is_ours(target):
        kind = "a folder holding what this tool did not write" if folder else "a file this tool did not write"
        raise OutputPathError(f"{flag} {path} is {kind}; choose a new path (nothing is replaced but the tool's own)")
    if not overwrite:
        raise OutputPathError(f"{flag} {path} exists; pass --overwrite to replace it (it was written by this tool)")
    return target

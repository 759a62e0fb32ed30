"""Output folders that never destroy what we did not write.

Every folder an export writes holds a marker file (:data:`MARKER`). Before anything is written,
:func:`check_output_folder` refuses an output that is, contains or lies inside one of the inputs, the
current directory, the home directory, a filesystem root or a repository root; an existing non-empty
folder without our marker is refused too, unless the caller passes ``force``. :func:`atomic_folder`
then writes into a temporary sibling and swaps it in with renames, so a crash leaves either the old
folder or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".ndino-export.json"
"""Written inside every folder an export creates; an existing folder with it may be replaced."""


class UnsafeOutputError(ValueError):
    """An output folder would overwrite or delete something that is not an earlier export of ours."""


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _protected(out: Path) -> str | None:
    """Why ``out`` (resolved) may never be an output folder, or None."""
    if out == Path(out.anchor):
        return "a filesystem root"
    if out == Path.cwd().resolve():
        return "the current directory"
    if out == Path.home().resolve():
        return "the home directory"
    if (out / ".git").exists():
        return "a repository root"
    return None


def check_output_folder(out: Path, sources: list[Path] = (), force: bool = False) -> None:
    """Raise :class:`UnsafeOutputError` unless ``out`` may be (re)written; ``sources`` are the inputs."""
    resolved = Path(out).expanduser().resolve()
    why = _protected(resolved)
    if why:
        raise UnsafeOutputError(f"--out {out} is {why}: pick a new folder for the output")
    for source in sources:
        source = Path(source).expanduser().resolve()
        if _is_within(resolved, source) or _is_within(source, resolved):
            relation = (
                "is" if resolved == source else "lies inside" if _is_within(resolved, source) else "contains"
            )
            raise UnsafeOutputError(
                f"--out {out} {relation} the input {source}: writing there would delete it; pick a folder "
                "outside the input"
            )
    if resolved.is_file():
        raise UnsafeOutputError(f"--out {out} is a file: pick a folder path")
    if resolved.is_dir() and any(resolved.iterdir()) and not (resolved / MARKER).is_file() and not force:
        raise UnsafeOutputError(
            f"--out {out} is a non-empty folder that no ndino export wrote (no {MARKER}): pick a new folder, "
            "or pass --force to replace it"
        )


@contextmanager
def atomic_folder(out: Path, sources: list[Path] = (), force: bool = False) -> Iterator[Path]:
    """Check ``out`` (see :func:`check_output_folder`), yield a temporary sibling to write into, then
    swap it in: the old folder is renamed aside and removed only after the new one is in place."""
    out = Path(out).expanduser()
    check_output_folder(out, sources, force)
    tmp = fresh_sibling(out)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "llava-ndino"}) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_folder(tmp, out)


def fresh_sibling(out: Path) -> Path:
    """An empty temporary folder beside ``out`` (``.NAME.tmp-PID``) to write the new content into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only a leftover of this very name and process id
    tmp.mkdir()
    return tmp


def swap_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``out`` with renames; the old ``out`` is removed
    only once the new one is there, so a crash leaves one of the two whole."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

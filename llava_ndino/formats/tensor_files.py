"""Writing safetensors files with the same permissions as every other file we write.

``safetensors.torch.save_file`` creates its files with mode 0600, whatever the umask: on a shared
cluster the group could read a run's config and logs but not its weights. :func:`save_safetensors`
gives the file the mode the umask grants a new file (0644 under the usual 022).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def umask_mode() -> int:
    """The permission bits a newly created regular file gets under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``save_file`` followed by a chmod to :func:`umask_mode`."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, umask_mode())

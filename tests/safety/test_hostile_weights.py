"""Weights files are read as tensors only: a TorchScript archive's code and a pickle's payload never run."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from llava_ndino.model.openclip_tower import load_openclip_model
from llava_ndino.model.torchscript_tensors import UnsafeArchiveError, is_torchscript, read_torchscript_tensors


class _Payload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def _hostile_archive(path: Path, marker: Path) -> Path:
    """A zip laid out like a TorchScript archive whose data.pkl runs a shell command when unpickled."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps(_Payload(f"touch {marker}"), protocol=2))
        archive.writestr("model/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("model/code/__torch__.py", "def forward(self):\n  pass\n")
    return path


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = _Block()
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x) * self.logit_scale


def test_torchscript_tensors_equal_what_torch_jit_reads(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.trace(_Net(), torch.zeros(1, 3)), str(path))
    assert is_torchscript(path)
    reference = torch.jit.load(str(path), map_location="cpu").state_dict()  # trusted file, made here
    ours = read_torchscript_tensors(path)
    assert ours.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=0)


def test_a_pickle_payload_in_a_torchscript_archive_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    archive = _hostile_archive(tmp_path / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(UnsafeArchiveError, match="refused posix.system|refused os.system"):
        read_torchscript_tensors(archive)
    assert not marker.exists()


def test_assembling_from_a_hostile_openclip_file_refuses_it(tmp_path: Path) -> None:
    """`ndino assemble --vision openclip:NAME:FILE` with a crafted file: an error, and no file written."""
    marker = tmp_path / "pwned"
    archive = _hostile_archive(tmp_path / "weights.bin", marker)
    with pytest.raises(ValueError, match="a weights archive may hold tensors only"):
        load_openclip_model("ViT-B-32", archive)
    assert not marker.exists()


def test_a_plain_pickle_payload_is_refused_by_the_weights_only_loader(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    torch.save({"visual.proj.weight": torch.zeros(1), "x": _Payload(f"touch {marker}")}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_openclip_model("ViT-B-32", path)
    assert not marker.exists()

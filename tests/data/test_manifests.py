"""Data manifests and mixtures (``data.manifests``, ``data.mixture``): the shipped manifests and
mixture weights, `ndino data list`, mixtures resolved against a data root, and a map-style mixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_ndino.cli import main
from llava_ndino.data.manifests import load_manifests, load_mixtures, resolve_mixture
from llava_ndino.data.mixture import map_style_mixture, mixture_parts


def test_manifests_mixtures_and_data_list(long_it_data_root: Path, capsys) -> None:
    manifests = load_manifests()
    assert len(manifests) == 11 and {m.modality for m in manifests.values()} == {"image-text", "text"}
    assert all(m.translation_model for m in manifests.values() if m.name.endswith("_ita"))
    mixtures = load_mixtures()
    assert {"align", "adapt", "short_it", "long_it"} <= set(mixtures)
    assert all(abs(sum(w.values()) - 1) < 1e-9 for w in mixtures.values())

    root = long_it_data_root
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "llava_instruct_conv_58k_ita" in out and "present" in out and "missing" in out
    assert [m.name for m, _ in resolve_mixture("long_it", root)] == ["llava_instruct_conv_58k_ita"]
    with pytest.raises(FileNotFoundError, match="wit_it"):
        resolve_mixture("adapt", root)
    records = map_style_mixture(mixture_parts("long_it", None), None, seed=0)
    record, _ = records.get(0)
    assert len(records) == 24 and Path(record["image"]).is_file()

"""Training data from a stage mixture (``data.mixture``) or a shard folder (``data.path``).

Map-style mixtures (LLaVA JSON data sets) become one :class:`MixtureRecords` whose epoch holds each
data set in proportion to its weight; shard (webdataset) data sets stream through
:class:`~llava_ndino.data.streaming.ShardStream`, which samples them by weight.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from llava_ndino.data.dataset import JsonRecords, RecordSource
from llava_ndino.data.images import image_path
from llava_ndino.data.manifests import Manifest, data_root, resolve_mixture
from llava_ndino.data.shards import is_shard_dir


def _absolute_images(record: dict, image_root: Path, index: int, allow_outside: bool = False) -> dict:
    """A copy of ``record`` whose image references are absolute paths under ``image_root``; a reference
    leading outside it raises :class:`SampleError` (reason ``outside_image_root``) unless allowed."""
    if not isinstance(record, dict):
        return record
    sample_id = str(record.get("id", f"#{index}"))

    def absolute(ref: str) -> str:
        return str(image_path(image_root, ref, sample_id, allow_outside).resolve())

    for key in ("image", "images"):
        refs = record.get(key)
        if isinstance(refs, str):
            return {**record, key: absolute(refs)}
        if isinstance(refs, list):
            return {**record, key: [absolute(r) if isinstance(r, str) else r for r in refs]}
    return record


class MixtureRecords(RecordSource):
    """Several record sources in one epoch, each repeated or subsampled to its share of the total.

    With total size ``N`` and weight ``w``, a source contributes ``round(w * N)`` samples per epoch
    (a seeded permutation, cycled when it is smaller than its share).
    """

    def __init__(
        self, sources: list[tuple[RecordSource, float, Path | None]], seed: int, allow_outside: bool = False
    ):
        self.sources, self.allow_outside = sources, allow_outside
        total = sum(len(source) for source, _, _ in sources)
        self.index: list[tuple[int, int]] = []
        for k, (source, weight, _) in enumerate(sources):
            count = max(1, round(weight * total))
            generator = torch.Generator().manual_seed(seed * 7919 + k)
            passes = math.ceil(count / len(source))
            order = torch.cat([torch.randperm(len(source), generator=generator) for _ in range(passes)])
            self.index += [(k, i) for i in order[:count].tolist()]

    def __len__(self) -> int:
        return len(self.index)

    def get(self, index: int) -> tuple[dict, list[Image.Image] | None]:
        k, i = self.index[index]
        source, _, image_root = self.sources[k]
        record, images = source.get(i)
        if image_root is None:
            return record, images
        return _absolute_images(record, image_root, index, self.allow_outside), images


def mixture_parts(stage: str, root: str | None) -> list[tuple[Manifest, float, Path]]:
    """(manifest, weight, local path) of every data set of ``stage`` under the data root."""
    base = data_root(root)
    return [(m, w, m.local_path(base)) for m, w in resolve_mixture(stage, base)]


def map_style_mixture(
    parts: list[tuple[Manifest, float, Path]], root: str | None, seed: int, allow_outside: bool = False
) -> MixtureRecords:
    """A :class:`MixtureRecords` over LLaVA JSON data sets; errors name shard sets that must stream."""
    base = data_root(root)
    sources = []
    for manifest, weight, path in parts:
        if manifest.format != "llava_json" or is_shard_dir(path):
            raise ValueError(
                f"{manifest.name} is stored as {manifest.format}: a mixture mixes map-style and shard data; "
                f"shard the JSON sets too (`ndino data shard`) so the whole mixture streams"
            )
        image_root = base / manifest.image_root if manifest.image_root else path.parent
        sources.append((JsonRecords(path), weight, image_root))
    return MixtureRecords(sources, seed, allow_outside)

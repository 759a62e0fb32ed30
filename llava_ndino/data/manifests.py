"""Data manifests (one YAML per data set) and per-stage mixtures, resolved under a local data root.

Manifests ship in ``llava_ndino/data_manifests/`` (the repository's ``data_manifests/`` links
there). Data are never downloaded: a manifest's ``local.path`` is looked up under the data root,
``data.root`` or the ``NDINO_DATA_ROOT`` environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT_ENV = "NDINO_DATA_ROOT"
MIXTURES_FILE = "mixtures.yaml"
FORMATS = ("llava_json", "webdataset", "jsonl_text")
MODALITIES = ("image-text", "text")
REQUIRED = ("name", "source", "license", "language", "modality", "format", "samples", "fields", "stages")


@dataclass
class Manifest:
    """One data set: where it comes from, what it holds, which stage uses it and where it lives locally."""

    name: str
    source: str
    license: str
    language: str
    modality: str
    format: str
    samples: int | None
    fields: list[str]
    stages: list[str]
    provenance: str
    translation_model: str | None = None
    path: str = ""
    """Location relative to the data root (a file, or a shard folder for webdataset)."""
    image_root: str | None = None
    """Folder of the images, relative to the data root (llava_json)."""
    file: Path = field(default_factory=Path)

    def local_path(self, root: Path) -> Path:
        """Where the data set lives under ``root``."""
        return root / self.path

    def present(self, root: Path | None) -> bool:
        """True when the data set is found under ``root``."""
        return root is not None and self.local_path(root).exists()


def manifests_dir() -> Path:
    """The folder of shipped manifests."""
    return Path(__file__).resolve().parent.parent / "data_manifests"


def data_root(override: str | None = None) -> Path | None:
    """The local data root: ``override`` (data.root), else ``$NDINO_DATA_ROOT``, else None."""
    value = override or os.environ.get(ROOT_ENV)
    return Path(value).expanduser() if value else None


def read_manifest(path: Path) -> Manifest:
    """Parse and check one manifest YAML; errors name the file and the missing or bad key."""
    values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a manifest must be a mapping")
    missing = [key for key in REQUIRED if key not in values]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    if values["format"] not in FORMATS:
        raise ValueError(f"{path}: format {values['format']!r} is not one of {', '.join(FORMATS)}")
    if values["modality"] not in MODALITIES:
        raise ValueError(f"{path}: modality {values['modality']!r} is not one of {', '.join(MODALITIES)}")
    provenance = values.get("provenance", "native")
    if provenance == "translated" and "translation_model" not in values:
        raise ValueError(f"{path}: a translated data set must name its translation_model (null if unknown)")
    local = values.get("local") or {}
    if "path" not in local:
        raise ValueError(f"{path}: set local.path (the data set's location under the data root)")
    return Manifest(
        name=str(values["name"]),
        source=str(values["source"]),
        license=str(values["license"]),
        language=str(values["language"]),
        modality=values["modality"],
        format=values["format"],
        samples=values["samples"],
        fields=list(values["fields"]),
        stages=list(values["stages"]),
        provenance=provenance,
        translation_model=values.get("translation_model"),
        path=str(local["path"]),
        image_root=local.get("image_root"),
        file=Path(path),
    )


def load_manifests(folder: Path | None = None) -> dict[str, Manifest]:
    """Every manifest of ``folder`` (default: the shipped ones) by name."""
    folder = folder or manifests_dir()
    manifests = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == MIXTURES_FILE:
            continue
        manifest = read_manifest(path)
        if manifest.name != path.stem:
            raise ValueError(f"{path}: name {manifest.name!r} must equal the file name {path.stem!r}")
        manifests[manifest.name] = manifest
    return manifests


def load_mixtures(folder: Path | None = None) -> dict[str, dict[str, float]]:
    """Stage -> {data set: normalised weight}; checks that every data set has a manifest."""
    folder = folder or manifests_dir()
    path = folder / MIXTURES_FILE
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    known = load_manifests(folder)
    mixtures = {}
    for stage, weights in raw.items():
        unknown = sorted(set(weights) - set(known))
        if unknown:
            raise ValueError(
                f"{path}: stage {stage!r} names data sets without a manifest: {', '.join(unknown)}"
            )
        if any(w <= 0 for w in weights.values()):
            raise ValueError(f"{path}: stage {stage!r} has a weight <= 0")
        total = sum(weights.values())
        mixtures[stage] = {name: weight / total for name, weight in weights.items()}
    return mixtures


def resolve_mixture(stage: str, root: Path | None) -> list[tuple[Manifest, float]]:
    """The present data sets of ``stage`` with their weights; errors say what is missing and where."""
    mixtures = load_mixtures()
    if stage not in mixtures:
        raise ValueError(
            f"unknown mixture {stage!r}; known: {', '.join(sorted(mixtures))} (see `ndino data list`)"
        )
    if root is None:
        raise ValueError(
            f"data.mixture={stage} needs the local data root: set {ROOT_ENV}=DIR or data.root=DIR"
        )
    manifests = load_manifests()
    chosen = [(manifests[name], weight) for name, weight in mixtures[stage].items()]
    absent = [m for m, _ in chosen if not m.present(root)]
    if absent:
        where = ", ".join(str(m.local_path(root)) for m in absent)
        raise FileNotFoundError(
            f"mixture {stage!r}: data not found at {where}; copy the data there or fix local.path in the manifest"
        )
    return chosen


def format_table(root: Path | None) -> str:
    """The ``ndino data list`` table: every manifest and whether it is present under ``root``."""
    mixtures = load_mixtures()
    rows = [("name", "modality", "lang", "samples", "stages", "provenance", "local")]
    for manifest in load_manifests().values():
        rows.append(
            (
                manifest.name,
                manifest.modality,
                manifest.language,
                f"{manifest.samples:,}" if manifest.samples else "?",
                ",".join(manifest.stages),
                manifest.provenance
                + (f" ({manifest.translation_model})" if manifest.translation_model else ""),
                ("present" if manifest.present(root) else "missing") if root else "no root",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("")
    lines.append(f"data root: {root if root else f'not set (set {ROOT_ENV}=DIR or --root DIR)'}")
    lines.append("mixtures (data.mixture=STAGE):")
    for stage, weights in mixtures.items():
        lines.append(
            f"  {stage:<18} " + ", ".join(f"{name} {weight:.2f}" for name, weight in weights.items())
        )
    return "\n".join(lines)

"""Pre-training data validation: counts, token lengths against max_length, rejections and image sizes.

``ndino data validate`` measures every sample with :class:`~llava_ndino.data.lengths.LengthEstimator`
(image headers only unless ``decode``), so 100k samples take minutes, not hours. It writes
``summary.json``, ``lengths.png`` (the token-length histogram with max_length marked) and
``rejected.jsonl`` (every sample training would skip, with its reason).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from llava_ndino.config import load_config
from llava_ndino.data.conversation import SampleError
from llava_ndino.data.dataset import JsonRecords, RecordSource
from llava_ndino.data.lengths import LengthEstimator, Measure
from llava_ndino.data.manifests import data_root, load_manifests, read_manifest
from llava_ndino.data.shards import ShardRecords, is_shard_dir

BINS = 40


def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))]

    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


def histogram(lengths: Sequence[int], max_length: int, bins: int = BINS) -> dict[str, list[int]]:
    """Equal-width bins from 0 to max(longest, max_length); returns ``edges`` (bins + 1) and ``counts``."""
    top = max([max_length, *lengths])
    width = max(1, math.ceil(top / bins))
    counts = [0] * bins
    for length in lengths:
        counts[min(bins - 1, length // width)] += 1
    return {"edges": [i * width for i in range(bins + 1)], "counts": counts}


def draw_histogram(hist: dict[str, list[int]], max_length: int, path: Path, title: str) -> None:
    """Write the histogram as a PNG bar chart with a red line at ``max_length``."""
    width, height, margin = 800, 420, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    counts, edges = hist["counts"], hist["edges"]
    top, span = max(counts) or 1, edges[-1] or 1
    plot_w, plot_h = width - 2 * margin, height - 2 * margin
    bar = plot_w / len(counts)
    for i, count in enumerate(counts):
        x0 = margin + i * bar
        y0 = height - margin - plot_h * count / top
        draw.rectangle([x0, y0, x0 + bar - 1, height - margin], fill=(70, 110, 180))
    x = margin + plot_w * max_length / span
    draw.line([x, margin, x, height - margin], fill=(220, 30, 30), width=2)
    draw.line([margin, height - margin, width - margin, height - margin], fill="black")
    draw.text((margin, 15), title, fill="black")
    label_x = x + 4 if x < width - 160 else x - 120
    draw.text((label_x, margin), f"max_length {max_length}", fill=(220, 30, 30))
    draw.text((margin, height - margin + 8), "0", fill="black")
    draw.text((width - margin - 60, height - margin + 8), f"{edges[-1]} tokens", fill="black")
    draw.text((4, margin), f"{top}", fill="black")
    image.save(path)


def summarise(measures: list[Measure], max_length: int) -> dict:
    """The JSON summary of a list of measures (see the module docstring)."""
    good = [m for m in measures if m.reason is None]
    rejected = Counter(m.reason for m in measures if m.reason is not None)
    sizes = [size for m in good for size in m.image_sizes]
    lengths = [m.length for m in good]
    return {
        "samples": len(measures),
        "usable": len(good),
        "rejected": dict(rejected.most_common()),
        "truncated_kept": sum(m.truncated for m in good),
        "with_image": sum(m.has_image for m in good),
        "text_only": sum(not m.has_image for m in good),
        "max_length": max_length,
        "tokens": _stats(lengths),
        "tokens_histogram": histogram(lengths, max_length),
        "images": {
            "count": len(sizes),
            "height": _stats([h for h, _ in sizes]),
            "width": _stats([w for _, w in sizes]),
        },
    }


def validate_source(source: RecordSource, estimator: LengthEstimator, out_dir: Path, name: str) -> dict:
    """Measure every sample of ``source`` and write the report files into ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    measures = []
    with (out_dir / "rejected.jsonl").open("w", encoding="utf-8") as rejected:
        for index in tqdm(range(len(source)), desc=f"validate {name}", unit="sample", mininterval=1):
            try:
                record, images = source.get(index)
                measure = estimator.measure(record, index, images=images)
            except SampleError as err:  # the source refused the record (malformed shard member, ...)
                measure = Measure(err.sample_id, reason=err.reason, message=str(err))
            measures.append(measure)
            if measure.reason is not None:
                row = {"id": measure.sample_id, "reason": measure.reason, "message": measure.message}
                rejected.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"data": name, **summarise(measures, estimator.max_length)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    draw_histogram(
        summary["tokens_histogram"],
        estimator.max_length,
        out_dir / "lengths.png",
        f"{name}: tokens per sample",
    )
    return summary


def format_summary(summary: dict) -> str:
    """A short human-readable report of a summary."""
    tokens = summary["tokens"]
    lines = [
        f"{summary['data']}: {summary['samples']} samples, {summary['usable']} usable "
        f"({summary['with_image']} with image, {summary['text_only']} text-only)",
        f"tokens (text + image) vs max_length {summary['max_length']}: "
        + ", ".join(f"{k} {v}" for k, v in tokens.items()),
        f"kept but truncated (tail cut): {summary['truncated_kept']}",
        "rejected: " + (", ".join(f"{k} {v}" for k, v in summary["rejected"].items()) or "none"),
    ]
    images = summary["images"]
    if images["count"]:
        lines.append(
            f"images: {images['count']}, height {images['height']['min']}-{images['height']['max']} "
            f"(median {images['height']['p50']}), width {images['width']['min']}-{images['width']['max']} "
            f"(median {images['width']['p50']})"
        )
    return "\n".join(lines)


def load_processor(model_cfg):
    """The processor a recipe's model uses, without loading weights where possible: an HF LlavaNext
    folder's, or one assembled from an HF CLIP folder's config and the LLM's tokenizer as
    :func:`~llava_ndino.model.build.assemble` builds it; otherwise (tiny, open_clip) the one built
    with the model."""
    if model_cfg.source == "llava" and model_cfg.llava:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_cfg.llava)
    vision = model_cfg.vision
    if model_cfg.source == "components" and vision and model_cfg.llm and not vision.startswith("openclip:"):
        from transformers import AutoTokenizer, CLIPVisionConfig, LlavaNextProcessor

        from llava_ndino.formats.prompts import llava_chat_template
        from llava_ndino.model.build import IMAGE_TOKEN, add_vlm_tokens, make_image_processor

        config = CLIPVisionConfig.from_pretrained(vision)
        pre = Path(vision) / "preprocessor_config.json"
        stats = json.loads(pre.read_text()) if pre.is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.llm)
        add_vlm_tokens(tokenizer)
        return LlavaNextProcessor(
            image_processor=make_image_processor(
                config.image_size, stats.get("image_mean"), stats.get("image_std")
            ),
            tokenizer=tokenizer,
            patch_size=config.patch_size,
            vision_feature_select_strategy="default",
            chat_template=llava_chat_template(),
            image_token=IMAGE_TOKEN,
            num_additional_image_tokens=1,
        )
    from llava_ndino.model.loading import build_model

    return build_model(model_cfg, seed=0)[1]


def resolve_target(target: str, root: Path | None) -> tuple[RecordSource, Path | None, str]:
    """A data file, a shard folder or a manifest name -> (record source, image root, display name)."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or (not path.exists() and target in load_manifests()):
        manifest = read_manifest(path) if path.suffix in (".yaml", ".yml") else load_manifests()[target]
        if root is None:
            raise ValueError(
                f"manifest {manifest.name}: set NDINO_DATA_ROOT=DIR or --root DIR to find its data"
            )
        path = manifest.local_path(root)
        if not path.exists():
            raise FileNotFoundError(f"manifest {manifest.name}: {path} does not exist under the data root")
        image_root = root / manifest.image_root if manifest.image_root else None
        name = manifest.name
    else:
        image_root, name = None, path.name
    if is_shard_dir(path):
        return ShardRecords(path), None, name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is neither a data file, a shard folder nor a manifest name")
    return JsonRecords(path), image_root, name


def run_validate(
    target: str,
    overrides: list[str],
    out: Path | None,
    image_root: str | None,
    root: str | None,
    decode: bool,
) -> dict:
    """``ndino data validate``: measure ``target`` with the recipe's processor, template and limits."""
    cfg = load_config(["output_dir=runs/validate", *overrides])
    data = cfg.data
    source, manifest_images, name = resolve_target(target, data_root(root or data.root))
    images = Path(image_root) if image_root else manifest_images
    images = images or (Path(data.image_root) if data.image_root else None)
    estimator = LengthEstimator(
        load_processor(cfg.model),
        data.template,
        data.max_length,
        images,
        data.max_pixels,
        decode=decode,
        allow_outside_root=data.allow_images_outside_root,
        control_tokens=data.control_tokens,
    )
    out_dir = out or Path("runs") / "validate" / name
    summary = validate_source(source, estimator, out_dir, name)
    print(format_summary(summary))
    print(f"report: {out_dir}/summary.json, {out_dir}/lengths.png, {out_dir}/rejected.jsonl")
    return summary

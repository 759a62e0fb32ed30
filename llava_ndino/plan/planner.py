"""Per-GPU memory planner (`ndino plan`): what a recipe needs on each GPU under every engine.

Parameters are counted exactly from the model's dimensions (:mod:`llava_ndino.plan.dimensions`:
the model folders' ``config.json`` files, the tiny model of a ``model.source=tiny`` recipe, or the
``ndino-8b`` preset where the folders are missing). Per GPU, an estimate adds

* weights (2 bytes for bf16, 4 for fp32), gradients of the trainable parameters, and AdamW state
  as DeepSpeed counts it for mixed precision: fp32 master copy + 2 fp32 moments = 12 bytes per
  trainable parameter (8 for fp32 weights). ZeRO-2 partitions gradients and optimizer state,
  ZeRO-3 the weights too, and the offload engines move those partitions to host RAM;
* activations of one micro-batch at ``data.max_length``: what autograd saves in each LLaMA decoder
  and CLIP encoder layer (Korthikanti et al.'s count redone for RMSNorm/LayerNorm, SwiGLU/QuickGELU
  and SDPA, checked tensor by tensor on CPU), the additive attention mask SDPA keeps per layer for
  padded rows, and the loss: 3 fp32 copies of the logits at the backward's start, or, above
  ``LOSS_CHUNK_ABOVE`` positions where the loss is chunked, the logits and their gradient in the
  logits' dtype plus one chunk in fp32. The loss
  computes logits only at the positions a label follows (``logits_to_keep``); the ``logit_fraction``
  key is their share of the micro-batch's positions. Its default 1 (every position) is the upper
  bound; training logs the real share as ``logit_fraction`` in ``metrics.jsonl``. With gradient
  checkpointing only each layer's input is kept, plus one layer's recomputation;
* other: engine buffers (DDP's gradient buckets, ZeRO's communication buckets and ZeRO-3's
  gathered layers, sized from ``launch/deepspeed/*.json``) and a fixed allowance for the CUDA
  context, NCCL and allocator fragmentation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from llava_ndino.config import ENGINES as RUN_ENGINES
from llava_ndino.config import RunConfig, load_config
from llava_ndino.plan.dimensions import ModelShape, TextShape, VisionShape, model_shape, preset_shape
from llava_ndino.train.losses import LOSS_CHUNK, LOSS_CHUNK_ABOVE

GIB = 2**30
ENGINES = tuple(name for name in RUN_ENGINES if name != "single")
"""Table order of the engines."""
PREFERENCE = ("ddp", "zero2", "zero3", "zero2_offload", "zero3_offload")
"""Least communication first: the recommendation takes the first one that fits."""
CONTEXT_BYTES = int(2.5 * GIB)
"""Per GPU: CUDA context and kernels (about 0.8 GiB), NCCL buffers and caching-allocator fragmentation."""
HOST_PER_RANK_BYTES = 8 * GIB
"""Host RAM per rank besides offloaded states: the process, CUDA host libraries, data-loader workers."""
TILES_PER_IMAGE = 5
"""anyres worst case: the base tile plus a 2x2 grid (672x672 for 336 px tiles)."""
PLAN_KEYS = {"gpus": 1, "gpus_per_node": 4, "gpu_mem_gb": 64.0, "model_preset": None, "logit_fraction": 1.0}
"""`ndino plan` keys that are not recipe keys, with their defaults (Leonardo: 4 A100 64 GB per node)."""
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "allgather_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_max_live_parameters": 1e9,
    "overlap_comm": False,
}
"""DeepSpeed's defaults for the ZeRO settings the planner reads."""


@dataclass(frozen=True)
class Precision:
    """Bytes per element of weights, gradients, AdamW state (per trainable parameter) and activations."""

    weight: int
    grad: int
    optimizer: int
    activation: int
    name: str

    @classmethod
    def for_gpu(cls, weight_bytes: int) -> Precision:
        """bf16 autocast activations; mixed-precision AdamW (12 bytes) for 16-bit weights, 8 for fp32."""
        if weight_bytes == 2:
            return cls(
                2, 2, 12, 2, "bf16 weights and activations, AdamW fp32 master + 2 moments (12 B/param)"
            )
        return cls(4, 4, 8, 2, "fp32 weights, bf16 autocast activations, AdamW 2 fp32 moments (8 B/param)")


CPU_FP32 = Precision(4, 4, 8, 4, "fp32 weights and activations (CPU), AdamW 2 fp32 moments")
"""What the training loop does on CPU; the benchmark uses it."""


@dataclass(frozen=True)
class Workload:
    """One micro-batch as the model sees it."""

    rows: int
    """Rows of the language-model batch (fewer when the micro-batch is packed)."""
    row_tokens: int
    images: int
    """Images in the micro-batch; each runs TILES_PER_IMAGE tiles through the tower."""
    attn: str = "sdpa"
    """Attention kernel: sdpa, eager or flash_attention_2."""
    logit_fraction: float = 1.0
    """Share of the positions whose logits the loss computes (1: every position, the upper bound)."""

    @property
    def tokens(self) -> int:
        """Language-model tokens in the micro-batch."""
        return self.rows * self.row_tokens


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ZeRO settings that size its buffers (in elements)."""

    reduce_bucket: float
    allgather_bucket: float
    prefetch_bucket: float
    max_live: float
    overlap_comm: bool

    @classmethod
    def read(cls, path: Path | None) -> ZeroSettings:
        """Read ``zero_optimization`` from a DeepSpeed JSON; absent or "auto" keys take DeepSpeed's defaults."""
        try:
            zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {}) if path else {}
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"cannot read the DeepSpeed config {path}: {err}") from None
        return cls(*(v if zero.get(k, "auto") == "auto" else zero[k] for k, v in DS_DEFAULTS.items()))


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU (and host bytes per rank) for one engine and checkpointing choice."""

    engine: str
    checkpointing: bool
    activations: float
    params: float
    grads: float
    optimizer: float
    buffers: float
    host: float = 0.0
    """Host RAM per rank for the offloaded states."""

    @property
    def other(self) -> float:
        """Engine buffers plus the fixed CUDA allowance."""
        return self.buffers + CONTEXT_BYTES

    @property
    def total(self) -> float:
        """Everything on the GPU."""
        return self.params + self.grads + self.optimizer + self.activations + self.other


# ---------------------------------------------------------------- activations


def text_layer_bytes(text: TextShape, work: Workload, a: int, trains: bool) -> float:
    """Bytes one decoder layer saves for backward over the micro-batch (``a``: activation bytes).

    Per token: each RMSNorm keeps its input in fp32 (4h); when the layer trains it also keeps the
    normalised input and the projections' input (a·h each). Attention keeps q, k, v and its output;
    with an attention mask k and v are first repeated to every head. SwiGLU keeps gate, SiLU(gate)
    and up, plus their product when the down projection trains. Per row, SDPA turns the boolean
    mask of padded or packed rows into an additive one (a bytes per pair) and keeps it; eager
    attention keeps the fp32 softmax and its cast for every head.
    """
    h, q, i = text.hidden, text.heads * text.head_dim, text.intermediate
    kv = text.kv_heads * text.head_dim if work.attn == "flash_attention_2" else q
    per_token = (
        2 * (4 * h + (2 * a * h if trains else 0)) + a * (2 * q + 2 * kv) + a * i * (4 if trains else 3)
    )
    pairs = work.rows * work.row_tokens**2
    scores = {"eager": pairs * text.heads * (4 + a), "sdpa": pairs * a}.get(work.attn, 0)
    return work.tokens * per_token + scores


def vision_layer_bytes(vision: VisionShape, tiles: int, a: int, attn: str) -> float:
    """Bytes one trainable CLIP encoder layer saves: 2 LayerNorm inputs in fp32 and their outputs,
    q, k, v, the attention output, and QuickGELU's input, sigmoid and output (no mask: full tiles)."""
    h, i, tokens = vision.hidden, vision.intermediate, tiles * vision.tokens_per_tile
    scores = tiles * vision.tokens_per_tile**2 * vision.heads * (4 + a) if attn == "eager" else 0
    return tokens * (2 * (4 * h + a * h) + a * 4 * h + a * 3 * i) + scores


def activation_parts(
    shape: ModelShape, trainable: set[str], work: Workload, precision: Precision, checkpointing: bool
) -> dict[str, float]:
    """Peak activation bytes of one micro-batch's forward and backward, in three parts.

    ``layers``: what the layers keep for backward (with checkpointing, each layer's input), the final
    norm, the boolean mask and the projector. ``log-probs``: the loss's fp32 log-probabilities.
    ``backward peak``: the larger of two transients that never coexist: the loss backward's two fp32
    gradients of the logits, and (with checkpointing) one layer's recomputed activations.
    Above ``LOSS_CHUNK_ABOVE`` positions the loss is chunked: ``log-probs`` is then the gradient of
    the logits, held in their dtype, and the loss's transient is the logits themselves plus one
    chunk's fp32 upcast and log-probabilities.
    """
    a, r, text = precision.activation, precision.weight, shape.text
    llm_trains = "llm" in trainable
    recompute = text_layer_bytes(text, work, a, llm_trains)
    layers = text.layers * (r * text.hidden * work.tokens if checkpointing else recompute)
    layers += work.tokens * text.hidden * (4 + (2 * a if llm_trains else 0))  # final norm, lm_head input
    layers += work.rows * work.row_tokens**2 if work.attn != "flash_attention_2" else 0
    vision = shape.vision
    if vision is not None and trainable & {"vision", "projector"}:
        tokens = work.images * TILES_PER_IMAGE * vision.tokens_per_tile
        layers += a * tokens * (vision.hidden * shape.feature_layers + 2 * text.hidden)  # projector
        if "vision" in trainable:
            layer = vision_layer_bytes(vision, work.images * TILES_PER_IMAGE, a, work.attn)
            layers += vision.layers * (r * vision.hidden * tokens if checkpointing else layer)
            recompute = max(recompute, layer)
    positions = work.tokens * work.logit_fraction
    logits = positions * text.vocab
    if positions > LOSS_CHUNK_ABOVE:  # ChunkedCrossEntropy: one gradient in the logits' dtype, fp32 per chunk
        chunk = 8.0 * LOSS_CHUNK * text.vocab  # a chunk's fp32 upcast and log-probabilities
        return {
            "layers": layers,
            "log-probs": a * logits,
            "backward peak": max(a * logits + chunk, recompute if checkpointing else 0.0),
        }
    return {
        "layers": layers,
        "log-probs": 4.0 * logits,
        "backward peak": max(8.0 * logits, recompute if checkpointing else 0.0),
    }


# ---------------------------------------------------------------- engines


def estimate(
    shape: ModelShape,
    trainable: set[str],
    work: Workload,
    precision: Precision,
    engine: str,
    checkpointing: bool,
    gpus: int,
    zero: ZeroSettings | None = None,
) -> Estimate:
    """Per-GPU bytes of ``engine`` (one of ENGINES) on ``gpus`` GPUs; ``zero`` sizes ZeRO's buffers."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    parts = shape.part_params()
    total, trained = sum(parts.values()), sum(n for part, n in parts.items() if part in trainable)
    w, g, o = precision.weight, precision.grad, precision.optimizer
    act = sum(activation_parts(shape, trainable, work, precision, checkpointing).values())
    row = Estimate(engine, checkpointing, act, total * w, trained * g, trained * o, trained * g)
    if engine == "ddp":  # gradient_as_bucket_view is off: the buckets are a second copy of the gradients
        return row
    zero = zero or ZeroSettings.read(None)
    offload = engine.endswith("_offload")
    kept = 0 if offload else 1 / gpus  # share of the partitioned states left on the GPU
    host = trained * (o + 4) / gpus if offload else 0.0  # optimizer state and fp32 gradient partitions
    if engine.startswith("zero2"):
        buckets = min(zero.reduce_bucket, trained) + min(zero.allgather_bucket, trained)
        overlap = 4.5 if zero.overlap_comm else 1  # HF's DeepSpeed guide: overlap_comm uses 4.5x the buckets
        return replace(
            row,
            grads=row.grads * kept,
            optimizer=row.optimizer * kept,
            buffers=buckets * g * overlap,
            host=host,
        )
    gathered = min(zero.max_live, shape.largest_unit(set(parts)) + zero.prefetch_bucket, total)
    buffers = gathered * w + (shape.largest_unit(trainable) + min(zero.reduce_bucket, trained)) * g
    host += total * w / gpus if offload else 0.0
    return replace(
        row,
        params=row.params * kept,
        grads=row.grads * kept,
        optimizer=row.optimizer * kept,
        buffers=buffers,
        host=host,
    )


def zero_settings(engine: str, cfg: RunConfig | None = None) -> ZeroSettings | None:
    """ZeRO settings of ``engine`` (None for ddp): the recipe's ``train.deepspeed_config`` for its own
    engine, else the shipped ``launch/deepspeed/ENGINE.json``; DeepSpeed's defaults for what is absent."""
    from llava_ndino.train.engine import DS_CONFIG_DIR

    if not engine.startswith("zero"):
        return None
    override = cfg.train.deepspeed_config if cfg is not None and cfg.engine == engine else None
    if override and not Path(override).is_file():
        raise ValueError(f"train.deepspeed_config={override} does not exist: pass a DeepSpeed JSON file")
    path = Path(override) if override else DS_CONFIG_DIR / f"{engine}.json"
    return ZeroSettings.read(path if path.is_file() else None)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanRequest:
    """The `ndino plan` keys besides the recipe's."""

    gpus: int
    gpus_per_node: int
    gpu_mem_gb: float
    model_preset: str | None
    logit_fraction: float = 1.0


def parse_plan_args(tokens: list[str]) -> tuple[PlanRequest, list[str]]:
    """Split `ndino plan` tokens into the planner's keys and the recipe tokens; validate the former."""
    values: dict[str, object] = dict(PLAN_KEYS)
    recipe: list[str] = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if sep and key.strip() in PLAN_KEYS:
            values[key.strip()] = value.strip()
        else:
            recipe.append(token)
    preset = values["model_preset"]
    request = PlanRequest(
        int(_number(values["gpus"], "gpus", int)),
        int(_number(values["gpus_per_node"], "gpus_per_node", int)),
        _number(values["gpu_mem_gb"], "gpu_mem_gb", float),
        str(preset) if preset not in (None, "", "null") else None,
        _number(values["logit_fraction"], "logit_fraction", float),
    )
    if request.logit_fraction > 1:
        raise ValueError(f"logit_fraction is a share of positions in (0, 1], got {request.logit_fraction:g}")
    if request.model_preset is not None:
        preset_shape(request.model_preset)  # an unknown name fails before the recipe loads
    return request, recipe


def _number(value: object, key: str, cast: type) -> float:
    """``value`` as a positive ``cast`` (int or float), or a ValueError naming ``key``."""
    try:
        number = cast(str(value))
    except ValueError:
        number = 0
    if not number > 0:
        kind = "a whole number >= 1" if cast is int else "a number > 0"
        raise ValueError(f"{key} must be {kind}, got {value!r} (e.g. {key}={PLAN_KEYS[key]:g})")
    return number


def trainable_parts(cfg: RunConfig) -> set[str]:
    """The parts ``cfg`` trains; LoRA and DPO, which the planner does not model, are refused."""
    if cfg.lora.enabled or cfg.objective == "dpo":
        raise ValueError(
            "ndino plan models full fine-tuning (vlm_sft, clm, sft); LoRA/QLoRA adapters and DPO's "
            "reference model are not modelled: plan with lora.enabled=false objective=sft for an upper bound"
        )
    return {"llm"} if cfg.model.source == "causal_lm" else set(cfg.train.trainable)


def workload(cfg: RunConfig, per_device: int, vision: bool, logit_fraction: float = 1.0) -> Workload:
    """The micro-batch of ``cfg`` at ``data.max_length``; packing puts it in rows of ``data.pack_length``."""
    rows, row_tokens = per_device, cfg.data.max_length
    if cfg.data.packing:
        row_tokens = cfg.data.pack_length or per_device * cfg.data.max_length
        rows = math.ceil(per_device * cfg.data.max_length / row_tokens)
    attn = cfg.model.attn_implementation
    return Workload(rows, row_tokens, per_device if vision else 0, attn, logit_fraction)


def recipe_choice(cfg: RunConfig) -> tuple[str, bool]:
    """The (engine, checkpointing) row of the recipe; ``single`` runs as ddp on several GPUs."""
    return ("ddp" if cfg.engine == "single" else cfg.engine), cfg.train.gradient_checkpointing


def weight_bytes(cfg: RunConfig) -> int:
    """Bytes per weight on the GPU: the tiny model is fp32, ``auto`` means bf16 (the LLaMA-3 checkpoints)."""
    return 4 if cfg.model.source == "tiny" or cfg.model.dtype == "float32" else 2


def run_plan(tokens: list[str]) -> str:
    """Load the recipe named in ``tokens`` and return the plan (what `ndino plan` prints)."""
    request, recipe_tokens = parse_plan_args(tokens)
    # the planner reads neither; placeholders let recipes that leave them to the command line load
    cfg = load_config(["output_dir=unused", *recipe_tokens, "train.max_steps=1", "train.epochs=null"])
    return format_plan(cfg, request)


def format_plan(cfg: RunConfig, request: PlanRequest) -> str:
    """Return the readable plan of ``cfg`` on ``request.gpus`` GPUs: set-up, table, host RAM, recommendation."""
    from llava_ndino.train.engine import resolve_batch

    trainable, shape, train = trainable_parts(cfg), model_shape(cfg, request.model_preset), cfg.train
    per_device, accum = resolve_batch(
        train.per_device_batch_size, train.grad_accum, train.global_batch_size, request.gpus
    )
    work = workload(cfg, per_device, shape.vision is not None, request.logit_fraction)
    precision = Precision.for_gpu(weight_bytes(cfg))
    rows = [
        estimate(shape, trainable, work, precision, engine, ckpt, request.gpus, zero_settings(engine, cfg))
        for engine in ENGINES
        for ckpt in (False, True)
    ]
    activations = activation_parts(shape, trainable, work, precision, train.gradient_checkpointing)
    images = f"; {_n(work.images, 'image')} x {TILES_PER_IMAGE} tiles" if work.images else ""
    layout = f"{_n(work.rows, 'packed row')}" if cfg.data.packing else "padded rows"
    global_batch = per_device * accum * request.gpus
    lines = [
        *_describe(cfg, request, shape, trainable, precision),
        f"micro-batch: {per_device} x {cfg.data.max_length} tokens (data.max_length, the worst case), "
        f"{layout}, {work.attn}{images}",
        f"logits at {work.logit_fraction:.0%} of positions (logit_fraction="
        + (
            "1, the upper bound; a run logs its real share as logit_fraction in metrics.jsonl)"
            if work.logit_fraction == 1
            else f"{work.logit_fraction:g})"
        ),
        f"activations with checkpointing {'on' if train.gradient_checkpointing else 'off'} (the recipe's): "
        + ", ".join(f"{name} {value / GIB:.1f} GiB" for name, value in activations.items()),
        f"global batch: {per_device} per GPU x {accum} accumulation x {_n(request.gpus, 'GPU')} = "
        f"{_n(global_batch, 'sample')} ({global_batch * cfg.data.max_length:,} tokens at most) per optimizer step",
        "",
        *_table(rows, request.gpu_mem_gb * GIB, recipe_choice(cfg)),
        *_footer(rows, request, cfg),
        recommend(rows, request.gpu_mem_gb * GIB),
    ]
    return "\n".join(lines)


def _n(count: int, word: str) -> str:
    """``count`` and ``word``, plural unless one: 1 GPU, 8 GPUs."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _count(n: int) -> str:
    """A parameter count with its unit: 8.03B, 303.5M, 4.1K."""
    for unit, size, digits in (("B", 1e9, 2), ("M", 1e6, 1), ("K", 1e3, 1)):
        if n >= size:
            return f"{n / size:.{digits}f}{unit}"
    return str(n)


def _describe(
    cfg: RunConfig, request: PlanRequest, shape: ModelShape, trainable: set[str], precision: Precision
) -> list[str]:
    """The set-up, model source, parameter counts and precision lines."""
    nodes = math.ceil(request.gpus / request.gpus_per_node)
    parts = shape.part_params()
    counts = ", ".join(f"{part} {_count(n)}" for part, n in parts.items())
    trained = [part for part in parts if part in trainable]
    return [
        f"ndino plan: recipe {cfg.recipe}, {_n(request.gpus, 'GPU')} ({_n(nodes, 'node')} x "
        f"{request.gpus_per_node}), "
        f"{request.gpu_mem_gb:g} GiB per GPU",
        "model: " + shape.source.replace("; ", "\n       "),
        f"parameters: {counts} = {_count(sum(parts.values()))}; "
        f"trainable {_count(sum(parts[p] for p in trained))} ({', '.join(trained)})",
        f"precision: {precision.name}",
    ]


def _table(rows: list[Estimate], limit: float, choice: tuple[str, bool]) -> list[str]:
    """The fixed-width table in GiB per GPU; the recipe's own row is marked with *."""
    head = "  engine         ckpt  params   grads   optim   activ   other   total  fits"
    lines = [f"{head} in {limit / GIB:g} GiB", "  " + "-" * (len(head) + 8)]
    for row in rows:
        mark = "*" if (row.engine, row.checkpointing) == choice else " "
        values = (row.params, row.grads, row.optimizer, row.activations, row.other, row.total)
        cells = "".join(f"{v / GIB:8.1f}" for v in values)
        ckpt = "yes" if row.checkpointing else "no"
        lines.append(f"{mark} {row.engine:<14}{ckpt:>4}{cells}  {'yes' if row.total <= limit else 'no'}")
    return lines


def _footer(rows: list[Estimate], request: PlanRequest, cfg: RunConfig) -> list[str]:
    """The legend and the host RAM per node of the offload rows."""
    ranks = min(request.gpus, request.gpus_per_node)
    host = ", ".join(
        f"{r.engine} {(r.host + HOST_PER_RANK_BYTES) * ranks / GIB:.0f} GiB"
        for r in rows
        if r.host and r.checkpointing
    )
    ckpt = "on" if cfg.train.gradient_checkpointing else "off"
    return [
        f"* the recipe's choice (engine={cfg.engine}, gradient checkpointing {ckpt}). Values in GiB per GPU.",
        f"other = {CONTEXT_BYTES / GIB:g} GiB (CUDA context, NCCL, fragmentation) + engine buffers: DDP's gradient",
        "  buckets, ZeRO's buckets (launch/deepspeed/*.json), ZeRO-3's gathered layers.",
        f"host RAM per node ({_n(ranks, 'rank')}): {host}",
        "  (offloaded optimizer state and fp32 gradients, for zero3_offload also the weights,",
        f"  + {HOST_PER_RANK_BYTES / GIB:g} GiB per rank for the process and its data loaders).",
    ]


def recommend(rows: list[Estimate], limit: float) -> str:
    """One line: the least-communication engine that fits (PREFERENCE order), without recomputation if it can."""
    for row in sorted(rows, key=lambda r: (PREFERENCE.index(r.engine), r.checkpointing)):
        if row.total <= limit:
            ckpt = "with" if row.checkpointing else "without"
            return (
                f"recommendation: {row.engine} {ckpt} gradient checkpointing "
                f"({row.total / GIB:.1f} of {limit / GIB:g} GiB per GPU)"
            )
    smallest = min(rows, key=lambda r: r.total)
    return (
        f"recommendation: nothing fits in {limit / GIB:g} GiB (smallest: {smallest.engine} at "
        f"{smallest.total / GIB:.1f} GiB): lower train.per_device_batch_size, plan at your data's longest "
        "sample with data.max_length=N, or add GPUs"
    )

"""The run configuration's schema: one dataclass per section, one documented field per key.

No ``from __future__ import annotations`` here: the loader needs the real field types (a section is
a dataclass type, not a string) to walk the schema.

The string literal under each field is its documentation: ``llava_ndino.config.describe_config`` reads
it back from this module's source, so it is written only once.
"""

from dataclasses import dataclass, field

from omegaconf import MISSING


class RecipeError(ValueError):
    """A recipe, a command-line override or the configuration they produce is invalid."""


@dataclass
class TinyConfig:
    """Sizes of the tiny random VLM (model.source=tiny) that the demo and the tests build in code."""

    tile_size: int = 112
    """Image tile side in pixels (a multiple of patch_size; CLIP ViT-L/14-336 uses 336)."""
    patch_size: int = 14
    """Vision patch side in pixels (CLIP ViT-L/14 uses 14); it must divide tile_size."""
    hidden_size: int = 128
    """Hidden size of the language model."""
    layers: int = 2
    """Number of language-model layers."""
    vision_hidden_size: int = 64
    """Hidden size of the vision encoder."""
    vision_layers: int = 2
    """Number of vision-encoder layers (at least 2: LLaVA reads the features of layer -2)."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary of the tiny tokenizer, before LLaMA-3's special tokens."""


@dataclass
class SyntheticConfig:
    """Generated training data instead of files (the demo's shapes set)."""

    kind: str | None = None
    """Which set to generate instead of reading data.path (shapes: the demo's coloured-shapes questions)."""
    train: int = 2000
    """Number of synthetic training samples."""
    eval: int = 200
    """Number of synthetic evaluation samples."""
    image_size: int = 160
    """Side of the synthetic images in pixels."""


@dataclass
class ModelConfig:
    """Which model to build and where its weights come from."""

    source: str = "components"
    """How to build the model: components (vision + llm folders), llava (an HF LlavaNext folder), tiny (a tiny random VLM built in code, for the demo) or causal_lm (the text-only causal LM at model.llm, for objectives clm, sft and dpo)."""
    vision: str | None = None
    """Vision tower: an HF CLIPVisionModel folder, or openclip:NAME_OR_DIR[:WEIGHTS]."""
    llm: str | None = None
    """Language model: an HF causal-LM folder."""
    llava: str | None = None
    """An HF LlavaNext folder (model.source=llava)."""
    projector: str | None = None
    """Pretrained projector weights: a LLaVA mm_projector.bin."""
    dtype: str = "auto"
    """Parameter dtype (auto: let the loader choose)."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the language model."""
    tiny: TinyConfig = field(default_factory=TinyConfig)
    """model.source=tiny: sizes of the tiny random VLM built in code."""


@dataclass
class DataConfig:
    """What to train on."""

    path: str | None = None
    """Training data: LLaVA conversations (JSON list, JSONL, or a shard folder from `ndino data shard`, streamed) for vlm_sft; JSONL rows {"text"} for clm, {"instruction", "input", "output"} or {"messages"} for sft, {"prompt", "chosen", "rejected"} for dpo."""
    image_root: str | None = None
    """Folder that the image paths in the data are relative to."""
    template: str = "llama3"
    """Chat template that turns conversations into tokens."""
    train_on: str = "assistant"
    """sft: tokens that carry loss: assistant (the answers and their stop token, as the template marks them) or all (every token of the rendered text but padding, as LLaMAntino-3-ANITA's SFT script trains)."""
    max_length: int = 2048
    """Maximum sequence length in tokens."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process)."""
    max_skip_ratio: float = 0.01
    """Largest fraction of samples that may be skipped as unusable before the run fails."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generated data instead of data.path (the demo)."""
    isolate_documents: bool = False
    """clm: keep attention inside each document of a packed block (positions restart per document); false lets attention cross the eos between documents, as plain concatenation does."""
    control_tokens: str = "skip"
    """Data text that spells a control token of the tokenizer (<|eot_id|>, <|start_header_id|>, <pad>, ...): skip the sample (reason control_token_in_text) or escape the string so it is read as plain text; never read as a real control token, which would let a user turn forge an assistant turn."""
    allow_images_outside_root: bool = False
    """Read image paths that are absolute or lead (through .. or symbolic links) outside data.image_root; off, such samples are skipped (reason outside_image_root)."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are skipped as decompression bombs (reason image_too_large)."""
    group_by_length: bool = False
    """Sample batches of one modality (image or text-only) and similar token length, to cut padding."""
    group_window: int = 64
    """data.group_by_length: batches per window whose samples are sorted by length before batching."""
    packing: bool = False
    """Pack each micro-batch's samples into one row with attention isolated per sample (no padding)."""
    pack_length: int = 0
    """data.packing: most tokens per packed row (0: the whole micro-batch in one row)."""
    mixture: str | None = None
    """Train on a stage mixture of data_manifests/ (e.g. short_it) instead of data.path; see `ndino data list`."""
    root: str | None = None
    """Local folder holding the manifests' data sets (null: the NDINO_DATA_ROOT environment variable)."""
    shuffle_buffer: int = 1000
    """Streaming from shards: samples held in the shuffle buffer of each loader worker."""


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging."""

    max_steps: int | None = None
    """Number of optimizer steps; set it or train.epochs (exactly one of the two is required)."""
    epochs: float | None = None
    """Passes over the training data instead of train.max_steps: max_steps = floor(epochs x samples / global batch), at least 1, computed at start from the data set's size (a shard folder's index.json counts; a streamed mixture sums its folders) and logged."""
    per_device_batch_size: int = 4
    """Samples per device in each micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated into each optimizer step (derived when train.global_batch_size is set)."""
    global_batch_size: int = 0
    """0: the per-device batch and accumulation are fixed and the global batch grows with the GPU count; N: the global batch is fixed at N samples per step and accumulation (then the per-device batch) adapts to the world size."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON to use instead of launch/deepspeed/ENGINE.json with engine=zero*; "auto" values are filled from the recipe."""
    lr: float = 1e-5
    """Peak learning rate."""
    lr_vision: float | None = None
    """Peak learning rate of the vision tower (null: train.lr)."""
    lr_projector: float | None = None
    """Peak learning rate of the projector (null: train.lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimizer: str = "adamw"
    """adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes; paged falls back to unpaged on CPU)."""
    warmup_ratio: float = 0.03
    """Fraction of train.max_steps over which the learning rate warms up."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    trainable: list[str] = field(default_factory=lambda: ["projector", "newline"])
    """Parts of the model to train (newline: the image-newline embedding); text objectives train every weight, or only the adapters with lora.enabled."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    save_every: int = 500
    """Save a checkpoint every N optimizer steps."""
    save_last: bool = True
    """Save a checkpoint when training ends (false only for benchmarks and dry runs: nothing is kept)."""
    keep_last: int = 3
    """Number of most recent checkpoints to keep."""
    cpu_threads: int = 0
    """Threads torch uses on CPU (0 keeps torch's default); 1 is fastest for tiny models."""


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, and QLoRA with quantize=4bit) for the text objectives."""

    enabled: bool = False
    """Train LoRA adapters on a frozen base model instead of every weight."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: adapters are scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get adapters (e.g. [q_proj, v_proj]), or [all-linear] for every linear layer but the output head."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r)."""
    quantize: str = "none"
    """Frozen base precision: none, or 4bit for QLoRA (bitsandbytes NF4, double quantisation, bf16 compute)."""


@dataclass
class DpoConfig:
    """Direct preference optimisation (objective dpo)."""

    beta: float = 0.1
    """Strength of the implicit KL penalty towards the reference model."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens keep their last tokens; data.max_length caps prompt + answer."""


@dataclass
class RunConfig:
    """A whole training run."""

    recipe: str = ""
    """Name or path of the recipe the run was loaded from (set by the loader)."""
    description: str = ""
    """One-line summary shown by `ndino recipes`."""
    output_dir: str = MISSING
    """Run folder for checkpoints, logs and the resolved config.yaml."""
    resume: str = "auto"
    """auto (latest checkpoint in output_dir, if any), none (start afresh) or a checkpoint path."""
    init_from: str | None = None
    """Weights that initialise the model before training (vlm_sft): a run directory (its latest checkpoint), a checkpoint (RUN/checkpoints/step_N) or an HF LlavaNext folder; keys and shapes must match the recipe's model. Only weights: optimizer, scheduler and step start fresh. Ignored when resume finds a checkpoint."""
    seed: int = 0
    """Random seed."""
    objective: str = "vlm_sft"
    """What to train: vlm_sft (image + conversation, loss on the answers), clm (packed raw text), sft (text instructions/chats, loss on the answers) or dpo (preference pairs, sigmoid DPO loss)."""
    engine: str = "single"
    """How the loop runs: single (one process; becomes ddp under torchrun with several processes), ddp (DistributedDataParallel; single when there is one process), or DeepSpeed zero2, zero2_offload, zero3, zero3_offload (configs in launch/deepspeed/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model construction."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and checkpointing."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters for text objectives."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """Preference optimisation settings."""


DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
"""Parameter dtypes a model can be loaded in (auto: as the weights are stored)."""


ATTENTION: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2")
"""Attention kernels of the language model (flash_attention_2 needs the gpu extra)."""


ENGINES: tuple[str, ...] = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")
"""Values of ``engine``: one process, DDP, and the DeepSpeed ZeRO configs in launch/deepspeed/."""

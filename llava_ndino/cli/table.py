"""The ``ndino`` commands as a table: each command's help, its options (declared once, shared option
sets reused) and the handler that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llava_ndino.chain import CHAINS, describe_chains
from llava_ndino.cli.handlers import (
    cmd_ask,
    cmd_assemble,
    cmd_chain,
    cmd_data_list,
    cmd_data_shard,
    cmd_data_translate,
    cmd_data_validate,
    cmd_demo,
    cmd_export,
    cmd_plan,
    cmd_recipes,
    cmd_tiny,
    cmd_train,
)
from llava_ndino.config import ATTENTION, DTYPES


@dataclass(frozen=True)
class Arg:
    """One argparse argument: its flags and ``add_argument`` keywords."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    """Declare an argument as ``add_argument(*flags, **options)`` would."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help texts, its arguments and the function that runs it (or subcommands)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int | None] | None = None
    description: str | None = None
    epilog: str | None = None
    args: tuple[Arg, ...] = ()
    children: tuple[Command, ...] = ()


OVERRIDES = arg(
    "overrides", nargs="*", metavar="KEY=VALUE", help="recipe=NAME and dotted key=value overrides"
)
ATTN_IMPLEMENTATION = arg(
    "--attn-implementation",
    default="sdpa",
    choices=ATTENTION,
    help="attention kernel (default sdpa; flash_attention_2 needs the gpu extra)",
)


FORCE = arg(
    "--force",
    action="store_true",
    help="replace an existing non-empty --out folder that no ndino export wrote (never an input, the current "
    "directory, home or a repository root)",
)


def dtype_arg(help: str = "weight dtype (default auto: as stored)") -> Arg:
    """The shared ``--dtype`` option."""
    return arg("--dtype", default="auto", choices=DTYPES, help=help)


PLAN_EPILOG = """keys (besides recipe=NAME and any recipe override such as data.max_length=4096):
  gpus=N           total GPUs, i.e. the world size (default 1)
  gpus_per_node=N  GPUs per node, for the host RAM per node (default 4, Leonardo)
  gpu_mem_gb=G     memory per GPU in GiB (default 64, Leonardo's A100 64 GB)
  model_preset=ndino-8b  use the built-in shapes even when the model folders exist
  logit_fraction=F share of positions whose logits the loss computes (default 1, the upper
                   bound; a run's metrics.jsonl logs the real share as logit_fraction)

examples:
  ndino plan recipe=long_it gpus=8
  ndino plan recipe=adapt gpus=16 gpu_mem_gb=80 train.per_device_batch_size=1"""

ASK_DESCRIPTION = """Answer a question about an image with a LlavaNext model: a run directory (latest
checkpoint), a checkpoint directory, or any HF LlavaNext folder (e.g. a released LLaVA-NDiNO
checkpoint downloaded locally). Greedy at --temperature 0 (default), sampled otherwise.
With --batch, each input line {"id", "image", "question"} gives an output line
{"id", "question", "answer"}, or {"id", "error"} for a bad line, a missing or unreadable image
or a question above --max-prompt-tokens. OUT is written as OUT.partial and replaced at the end;
running the batch again answers only the ids not answered yet.
A bad image in single mode exits with status 2."""

EXPORT_DESCRIPTION = """Write the latest checkpoint of a run directory (or the given checkpoint directory, or an
HF LlavaNext folder) as a self-contained HF LlavaNext folder: weights in the original LLaVA-NeXT
key layout, processor, tokenizer, chat template, and a generation config that stops on <|eot_id|>.
Plain transformers 4.x and 5.x load it with LlavaNextForConditionalGeneration and AutoProcessor.
Text runs (objective clm, sft or dpo) give a merged HF causal-LM folder (AutoModelForCausalLM,
AutoTokenizer with the recipe's chat template), or with --adapter a PEFT adapter folder
(peft.PeftModel.from_pretrained on the base model.llm)."""

PLAN_DESCRIPTION = """Print, before launch, a per-GPU memory estimate of a recipe for every engine (ddp, zero2,
zero2_offload, zero3, zero3_offload), with and without gradient checkpointing: weights, gradients,
AdamW state, activations of one micro-batch at data.max_length, engine buffers and a CUDA allowance;
host RAM per node for the offload engines, the global batch, and the engine to use. Parameter
counts come from the model folders' config.json files, else from the ndino-8b preset (said so)."""


CHAIN_DESCRIPTION = """Train a released LLaVA-NDiNO combination stage by stage: each stage's recipe into
RUNS_DIR/<run>, with init_from=RUNS_DIR/<previous run>. A stage whose latest checkpoint reached its
train.max_steps is skipped, one that stopped early resumes, so running the chain again continues it
and runs that several releases share (align, pt, short_it, pt_short_it) are trained once.
KEY=VALUE overrides apply to every stage (not recipe, output_dir or init_from)."""


CHAIN_NAME = arg("name", choices=CHAINS, metavar="NAME", help=f"the release: {', '.join(CHAINS)}")
CHAIN_OPTIONS = (
    arg("--runs-dir", default="runs", help="folder of the stages' run directories (default runs)"),
    arg(
        "--dry-run",
        action="store_true",
        help="print each stage's command, output_dir and init_from; run nothing",
    ),
    arg(
        "--launcher",
        metavar="CMD",
        help='run each stage as CMD ARGS... in a new process, e.g. "torchrun --nproc-per-node 4 launch/train.py" '
        "(default: ndino train, in this process)",
    ),
)
CHAIN_OVERRIDES = arg("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every stage")
CHAIN_TAIL = {"metavar": "NAME [KEY=VALUE ...]", "help": f"the release ({', '.join(CHAINS)}), then overrides"}


class ChainArguments(argparse.Action):
    """Reads NAME, the options and the KEY=VALUE overrides after NAME in any order: plain argparse refuses
    overrides that follow an option (``ndino chain pt --runs-dir r train.lr=2e-5``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        inner = argparse.ArgumentParser(prog=parser.prog)
        for item in (CHAIN_NAME, *CHAIN_OPTIONS, CHAIN_OVERRIDES):
            inner.add_argument(*item.flags, **item.options)
        inner.set_defaults(
            **{k: v for k, v in vars(namespace).items() if k in ("runs_dir", "dry_run", "launcher")}
        )
        for key, value in vars(inner.parse_intermixed_args(values)).items():
            setattr(namespace, key, value)


def _chain_epilog() -> str:
    return (
        "chains (run [recipe]; each run's folder is RUNS_DIR/run):\n"
        + describe_chains()
        + "\n\nexamples:\n  ndino chain pt_short_long --dry-run\n"
        "  ndino chain short_long --runs-dir /scratch/runs\n"
        '  ndino chain pt --launcher "torchrun --nproc-per-node 4 launch/train.py"'
    )


def _data_commands() -> tuple[Command, ...]:
    """The ``ndino data`` subcommands that read data sets: list, validate."""
    return (
        Command(
            "list",
            "show the data manifests, the stage mixtures, and which data sets are present locally",
            cmd_data_list,
            args=(arg("--root", help="local data root (default: $NDINO_DATA_ROOT)"),),
        ),
        Command(
            "validate",
            "report counts, token lengths vs max_length, rejected samples and image sizes before training",
            cmd_data_validate,
            description="Measure every sample as training would encode it (image token counts from image "
            "headers, without decoding pixels unless --decode) and write summary.json, lengths.png and "
            "rejected.jsonl.",
            epilog="examples:\n  ndino data validate data/train.json --recipe long_it --image-root data/images\n"
            "  ndino data validate llava_instruct_conv_58k_ita --recipe long_it data.max_length=4096",
            args=(
                arg("target", metavar="PATH_OR_MANIFEST", help="LLaVA JSON/JSONL, shard folder or manifest"),
                arg(
                    "--recipe",
                    required=True,
                    nargs="+",
                    metavar=("NAME", "KEY=VALUE"),
                    help="recipe whose processor, template and limits apply, then its overrides "
                    "(data.max_length=...)",
                ),
                arg("--image-root", help="folder the image paths are relative to"),
                arg("--root", help="local data root for manifest names (default: $NDINO_DATA_ROOT)"),
                arg("--out", help="report folder (default runs/validate/NAME)"),
                arg("--decode", action="store_true", help="decode every image fully (finds truncated files)"),
            ),
        ),
    )


def _data_write_commands() -> tuple[Command, ...]:
    """The ``ndino data`` subcommands that write data sets: shard, translate."""
    return (
        Command(
            "shard",
            "write webdataset tar shards (image bytes + JSON conversation) with an index and checksums",
            cmd_data_shard,
            description="Convert a LLaVA JSON/JSONL plus image folder, or an HF datasets folder saved with "
            "save_to_disk, into deterministic webdataset shards: the same input gives byte-identical shards.",
            epilog="example: ndino data shard data/train.json shards/train --image-root data/images",
            args=(
                arg("input", help="LLaVA JSON/JSONL file or HF datasets folder"),
                arg("out", help="output folder (shard-*.tar + index.json)"),
                arg(
                    "--image-root", help="folder the image paths are relative to (default: the JSON's folder)"
                ),
                arg(
                    "--samples-per-shard", type=int, default=1000, help="samples per tar file (default 1000)"
                ),
                arg(
                    "--max-skip-ratio",
                    type=float,
                    default=0.01,
                    help="largest share of samples that may be dropped (missing or refused images) before "
                    "nothing is written (default 0.01, as data.max_skip_ratio)",
                ),
                arg(
                    "--allow-outside-root",
                    action="store_true",
                    help="copy images whose paths are absolute or lead outside the image root (trusted data only)",
                ),
            ),
        ),
        Command(
            "translate",
            "translate LLaVA conversations into Italian (MADLAD-400 or Argos), resumable",
            cmd_data_translate,
            description="Translate the turns of a LLaVA JSON/JSONL file into Italian, keeping <image> "
            "placeholders, line breaks, turns and ids. Writes JSONL record by record; running again skips "
            "the ids already in OUT.",
            epilog="example: ndino data translate conv_58k.json conv_58k_ita.jsonl --backend madlad "
            "--model models/madlad400-3b-mt --device cuda --dtype bfloat16",
            args=(
                arg("input", metavar="IN", help="LLaVA JSON/JSONL file (records need an id)"),
                arg("output", metavar="OUT", help="output JSONL file (appended; resumable)"),
                arg("--backend", choices=["madlad", "argos"], default="madlad", help="default madlad"),
                arg(
                    "--model",
                    default="google/madlad400-3b-mt",
                    help="madlad: local model folder (default: the HF id, from cache)",
                ),
                arg("--batch-size", type=int, default=16, help="records per backend call (default 16)"),
                arg("--device", default="cpu", help="madlad: torch device (default cpu)"),
                dtype_arg("madlad: weight dtype (default auto)"),
                arg("--max-new-tokens", type=int, default=256, help="madlad: longest translated line"),
                arg("--num-beams", type=int, default=1, help="madlad: beam size (default 1, greedy)"),
                arg("--source-lang", default="en", help="argos: source language code (default en)"),
            ),
        ),
    )


def _run_commands() -> tuple[Command, ...]:
    """Training and planning: train, demo, plan, recipes."""
    from llava_ndino.config import describe_config

    return (
        Command(
            "train",
            "train with a recipe: ndino train recipe=NAME key=value ...",
            cmd_train,
            description="Run (or resume) training. Arguments are recipe=NAME (or a YAML path) and dotted "
            "key=value overrides; torchrun launch/train.py takes the same arguments.",
            epilog="example: ndino train recipe=demo train.max_steps=50 output_dir=runs/try\n\nkeys:\n"
            + describe_config(),
            args=(OVERRIDES,),
        ),
        Command(
            "chain",
            "train a released LLaVA-NDiNO chain (e.g. pt_short_long) stage by stage, skipping finished stages",
            cmd_chain,
            description=CHAIN_DESCRIPTION,
            epilog=_chain_epilog(),
            args=(
                *CHAIN_OPTIONS,
                arg("chain", nargs=argparse.REMAINDER, action=ChainArguments, **CHAIN_TAIL),
            ),
        ),
        Command(
            "demo",
            "train a tiny VLM from scratch on CPU, evaluate, export and ask it about a fresh image",
            cmd_demo,
            description="The embedded default (make demo): recipe=demo on synthetic Italian shapes questions, "
            "then exact-match accuracy per question type on held-out questions, an HF export, and one answer "
            "on a freshly generated image. Accepts the same key=value overrides as `ndino train`.",
            epilog="examples:\n  ndino demo train.max_steps=100 output_dir=runs/quick\n"
            "  ndino demo --no-train output_dir=runs/demo-zero3",
            args=(
                arg("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of recipe=demo"),
                arg(
                    "--no-train",
                    action="store_true",
                    help="skip training: evaluate, export and ask with the latest checkpoint in output_dir, "
                    "e.g. after `torchrun --nproc_per_node 2 launch/train.py recipe=demo engine=zero3 "
                    "output_dir=DIR`",
                ),
            ),
        ),
        Command(
            "plan",
            "estimate per-GPU memory of a recipe under ddp, zero2, zero3 and their offload variants",
            cmd_plan,
            description=PLAN_DESCRIPTION,
            epilog=PLAN_EPILOG,
            args=(
                arg(
                    "overrides",
                    nargs="*",
                    metavar="KEY=VALUE",
                    help="recipe=NAME, planner keys and overrides",
                ),
            ),
        ),
        Command("recipes", "list the shipped recipes with a one-line description each", cmd_recipes),
    )


def _model_commands() -> tuple[Command, ...]:
    """Model folders: tiny, assemble."""
    return (
        Command(
            "tiny",
            "write tiny random-weight model folders (CLIP tower, LLaMA-3-style LM + tokenizer, open_clip ViT)",
            cmd_tiny,
            description="Write deterministic tiny random-weight HF folders: OUT/vision (CLIPVisionModel), "
            "OUT/llm (LlamaForCausalLM + a byte-level BPE tokenizer with LLaMA-3's special tokens and chat "
            "template) and OUT/openclip (an open_clip ViT config and weights). Use them to smoke-test a set-up "
            "without downloading real weights.",
            args=(
                arg("--out", required=True, help="output directory"),
                arg("--image-size", type=int, default=336, help="vision tile size in pixels (default 336)"),
                arg("--seed", type=int, default=0, help="random seed for the weights (default 0)"),
                arg(
                    "--text-data",
                    action="store_true",
                    help="also write small synthetic Italian JSONL sets to OUT/text/ for the text recipes "
                    "(text, heldout, instructions, chat, preferences)",
                ),
            ),
        ),
        Command(
            "assemble",
            "assemble a LlavaNext model from a CLIP tower and a LLaMA-3 causal LM",
            cmd_assemble,
            description="Build an HF LlavaNext folder (model + LlavaNextProcessor with the LLaMA-3 chat "
            "template) from a vision tower and a language model. Adds <image> and a dedicated pad token, "
            "resizes the embeddings (new rows = mean of the old ones) and sets the LLaVA-NeXT anyres config.",
            epilog="example: ndino tiny --out /tmp/t && "
            "ndino assemble --vision /tmp/t/vision --llm /tmp/t/llm --out /tmp/m",
            args=(
                arg(
                    "--vision",
                    required=True,
                    help="HF CLIPVisionModel folder, or openclip:NAME_OR_DIR[:WEIGHTS] "
                    "(e.g. openclip:ViT-L-14-336:/path/openai.pt or openclip:/tmp/t/openclip)",
                ),
                arg("--llm", required=True, help="HF causal-LM folder of the LLaMA-3 family"),
                arg("--projector", help="LLaVA mm_projector.bin to start from (default: random projector)"),
                arg("--out", required=True, help="output folder (an earlier export there is replaced)"),
                FORCE,
                dtype_arg(),
                ATTN_IMPLEMENTATION,
            ),
        ),
    )


def _query_commands() -> tuple[Command, ...]:
    """Trained models: ask, export."""
    return (
        Command(
            "ask",
            "ask a model about an image (single question, streaming, or a JSONL batch)",
            cmd_ask,
            description=ASK_DESCRIPTION,
            epilog="examples:\n"
            '  ndino ask --model runs/long_it --image foto.jpg "Cosa c\'è di strano in questa immagine?"\n'
            '  ndino ask --model LLaVA-NDiNO_pt_long --image foto.jpg --stream --temperature 0.6 "Descrivi la foto"\n'
            "  ndino ask --model runs/long_it --batch domande.jsonl --out risposte.jsonl --image-root images/",
            args=(
                arg("question", nargs="?", help="the question (single mode)"),
                arg(
                    "--model",
                    required=True,
                    help="run directory, checkpoint directory or HF LlavaNext folder",
                ),
                arg("--image", help="image file (single mode)"),
                arg(
                    "--max-new-tokens",
                    type=int,
                    default=128,
                    help="answer length limit in tokens (default 128)",
                ),
                arg("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"),
                arg(
                    "--top-p",
                    type=float,
                    default=1.0,
                    help="nucleus sampling mass when sampling (default 1.0)",
                ),
                arg(
                    "--stream", action="store_true", help="print the answer as it is generated (single mode)"
                ),
                arg("--batch", metavar="IN.jsonl", help="answer every line of a JSONL file instead"),
                arg("--out", metavar="OUT.jsonl", help="where --batch writes its answers"),
                arg("--batch-size", type=int, default=8, help="questions per generate call (default 8)"),
                arg(
                    "--max-prompt-tokens",
                    type=int,
                    help="refuse a question whose prompt is longer, in tokens besides the image's "
                    "(default: llava_ndino.infer.DEFAULT_MAX_PROMPT_TOKENS, 4096)",
                ),
                arg(
                    "--image-root", help="folder the JSONL image paths are relative to (default: current dir)"
                ),
                dtype_arg(),
                ATTN_IMPLEMENTATION,
            ),
        ),
        Command(
            "export",
            "export a run or checkpoint as an HF folder (LlavaNext; causal LM or PEFT adapter for text runs)",
            cmd_export,
            description=EXPORT_DESCRIPTION,
            epilog="examples:\n  ndino export runs/long_it --out release/LLaVA-NDiNO_long --dtype bfloat16\n"
            "  ndino export runs/long_it/checkpoints/step_500 --out release/step_500\n"
            "  ndino export runs/anita_sft --out release/anita_sft_merged --dtype bfloat16\n"
            "  ndino export runs/anita_sft --adapter --out release/anita_sft_adapter",
            args=(
                arg(
                    "path",
                    metavar="RUN_OR_CHECKPOINT",
                    help="run directory, checkpoint directory or HF folder",
                ),
                arg("--out", required=True, help="output folder (an earlier export there is replaced)"),
                FORCE,
                dtype_arg(),
                arg(
                    "--adapter",
                    action="store_true",
                    help="text LoRA/QLoRA runs: write the PEFT adapter folder instead of the merged model",
                ),
            ),
        ),
    )


def commands() -> tuple[Command, ...]:
    """Every ``ndino`` subcommand, declared once."""
    return (
        *_run_commands(),
        *_model_commands(),
        *_query_commands(),
        Command(
            "data",
            "data sets: list manifests, validate, write webdataset shards, translate to Italian",
            description="Data at scale: manifests and stage mixtures (data_manifests/), validation before "
            "training, webdataset shards for streaming, and machine translation of LLaVA conversations.",
            children=(*_data_commands(), *_data_write_commands()),
        ),
    )

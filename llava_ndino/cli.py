"""The ``ndino`` command line: dispatch only; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _cmd_tiny(args: argparse.Namespace) -> None:
    from llava_ndino.model.tiny import TinySizes, write_tiny

    sizes = TinySizes(image_size=args.image_size)
    paths = write_tiny(Path(args.out), sizes, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:>9}: {path}")


def _cmd_assemble(args: argparse.Namespace) -> None:
    from llava_ndino.export import save_llava_folder
    from llava_ndino.model.build import LoadOptions, assemble_from_folders

    options = LoadOptions(dtype=args.dtype, attn_implementation=args.attn_implementation)
    model, processor = assemble_from_folders(
        args.vision, Path(args.llm), Path(args.projector) if args.projector else None, options
    )
    save_llava_folder(model, processor, Path(args.out))
    print(f"wrote LlavaNext folder {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``ndino`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ndino",
        description="llava-ndino: train, query and release Italian LLaVA-NeXT (LLaVA-NDiNO) and LLaMAntino models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser(
        "tiny",
        help="write tiny random-weight model folders (CLIP tower, LLaMA-3-style LM + tokenizer, open_clip ViT)",
        description="Write deterministic tiny random-weight HF folders: OUT/vision (CLIPVisionModel), "
        "OUT/llm (LlamaForCausalLM + a byte-level BPE tokenizer with LLaMA-3's special tokens and chat "
        "template) and OUT/openclip (an open_clip ViT config and weights). Use them to smoke-test a set-up "
        "without downloading real weights.",
    )
    tiny.add_argument("--out", required=True, help="output directory")
    tiny.add_argument("--image-size", type=int, default=336, help="vision tile size in pixels (default 336)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    tiny.set_defaults(func=_cmd_tiny)

    asm = sub.add_parser(
        "assemble",
        help="assemble a LlavaNext model from a CLIP tower and a LLaMA-3 causal LM",
        description="Build an HF LlavaNext folder (model + LlavaNextProcessor with the LLaMA-3 chat template) "
        "from a vision tower and a language model. Adds <image> and a dedicated pad token, resizes the "
        "embeddings (new rows = mean of the old ones) and sets the LLaVA-NeXT anyres config.",
        epilog="example: ndino tiny --out /tmp/t && "
        "ndino assemble --vision /tmp/t/vision --llm /tmp/t/llm --out /tmp/m",
    )
    asm.add_argument(
        "--vision",
        required=True,
        help="HF CLIPVisionModel folder, or openclip:NAME_OR_DIR[:WEIGHTS] "
        "(e.g. openclip:ViT-L-14-336:/path/openai.pt or openclip:/tmp/t/openclip)",
    )
    asm.add_argument("--llm", required=True, help="HF causal-LM folder of the LLaMA-3 family")
    asm.add_argument("--projector", help="LLaVA mm_projector.bin to start from (default: random projector)")
    asm.add_argument("--out", required=True, help="output folder")
    asm.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    asm.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention kernel (default sdpa; flash_attention_2 needs the gpu extra)",
    )
    asm.set_defaults(func=_cmd_assemble)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ndino`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

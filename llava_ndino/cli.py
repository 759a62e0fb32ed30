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


def _cmd_ask(args: argparse.Namespace) -> int:
    from llava_ndino.data.conversation import SampleError
    from llava_ndino.infer import load_answerer, read_image

    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.batch:
        if args.image or args.question or args.stream:
            args.parser.error(
                "--batch reads images and questions from the JSONL file: drop --image/QUESTION/--stream"
            )
        if not args.out:
            args.parser.error("--batch needs --out OUT.jsonl")
        answerer = load_answerer(Path(args.model), args.dtype, args.attn_implementation)
        counts = answerer.answer_jsonl(
            Path(args.batch),
            Path(args.out),
            args.batch_size,
            Path(args.image_root) if args.image_root else None,
            **generation,
        )
        print(f"{counts['answered']} answered, {counts['errors']} errors -> {args.out}")
        return 0
    if not args.image or not args.question:
        args.parser.error(
            'give --image IMG and a question, e.g. ndino ask --model DIR --image foto.jpg "Cosa vedi?"'
        )
    try:
        image = read_image(Path(args.image), args.image)
    except SampleError as err:
        print(f"ndino ask: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    answerer = load_answerer(Path(args.model), args.dtype, args.attn_implementation)
    if args.stream:
        answerer.ask(image, args.question, stream=lambda text: print(text, end="", flush=True), **generation)
        print()
    else:
        print(answerer.ask(image, args.question, **generation))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from llava_ndino.export import save_llava_folder
    from llava_ndino.model.build import LoadOptions
    from llava_ndino.train.model_setup import load_trained

    model, processor = load_trained(Path(args.path), LoadOptions(dtype=args.dtype))
    save_llava_folder(model, processor, Path(args.out))
    print(f"wrote LlavaNext folder {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from llava_ndino.config import load_config
    from llava_ndino.train.loop import train

    result = train(load_config(args.overrides))
    print(f"{result.status} at step {result.step}; run directory {result.run_dir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> None:
    from llava_ndino.demo import run_demo

    run_demo(args.overrides)


def _cmd_recipes(args: argparse.Namespace) -> None:
    from llava_ndino.config import list_recipes

    for name, description in list_recipes():
        print(f"{name:<24} {description}")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``ndino`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ndino",
        description="llava-ndino: train, query and release Italian LLaVA-NeXT (LLaVA-NDiNO) and LLaMAntino models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from llava_ndino.config import describe_config

    train = sub.add_parser(
        "train",
        help="train with a recipe: ndino train recipe=NAME key=value ...",
        description="Run (or resume) training. Arguments are recipe=NAME (or a YAML path) and dotted "
        "key=value overrides; torchrun launch/train.py takes the same arguments.",
        epilog="example: ndino train recipe=demo train.max_steps=50 output_dir=runs/try\n\nkeys:\n"
        + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe=NAME and overrides")
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser(
        "demo",
        help="train a tiny VLM from scratch on CPU, evaluate, export and ask it about a fresh image",
        description="The embedded default (make demo): recipe=demo on synthetic Italian shapes questions, "
        "then exact-match accuracy per question type on held-out questions, an HF export, and one answer "
        "on a freshly generated image. Accepts the same key=value overrides as `ndino train`.",
        epilog="example: ndino demo train.max_steps=100 output_dir=runs/quick",
    )
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of recipe=demo")
    demo.set_defaults(func=_cmd_demo)

    recipes = sub.add_parser("recipes", help="list the shipped recipes with a one-line description each")
    recipes.set_defaults(func=_cmd_recipes)

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
    ask = sub.add_parser(
        "ask",
        help="ask a model about an image (single question, streaming, or a JSONL batch)",
        description="Answer a question about an image with a LlavaNext model: a run directory (latest\n"
        "checkpoint), a checkpoint directory, or any HF LlavaNext folder (e.g. a released LLaVA-NDiNO\n"
        "checkpoint downloaded locally). Greedy at --temperature 0 (default), sampled otherwise.\n"
        'With --batch, each input line {"id", "image", "question"} gives an output line\n'
        '{"id", "question", "answer"}, or {"id", "error"} for a missing or unreadable image.\n'
        "A bad image in single mode exits with status 2.",
        epilog="examples:\n"
        '  ndino ask --model runs/long_it --image foto.jpg "Cosa c\'è di strano in questa immagine?"\n'
        '  ndino ask --model LLaVA-NDiNO_pt_long --image foto.jpg --stream --temperature 0.6 "Descrivi la foto"\n'
        "  ndino ask --model runs/long_it --batch domande.jsonl --out risposte.jsonl --image-root images/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ask.add_argument("question", nargs="?", help="the question (single mode)")
    ask.add_argument(
        "--model", required=True, help="run directory, checkpoint directory or HF LlavaNext folder"
    )
    ask.add_argument("--image", help="image file (single mode)")
    ask.add_argument(
        "--max-new-tokens", type=int, default=128, help="answer length limit in tokens (default 128)"
    )
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ask.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)"
    )
    ask.add_argument(
        "--stream", action="store_true", help="print the answer as it is generated (single mode)"
    )
    ask.add_argument("--batch", metavar="IN.jsonl", help="answer every line of a JSONL file instead")
    ask.add_argument("--out", metavar="OUT.jsonl", help="where --batch writes its answers")
    ask.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    ask.add_argument(
        "--image-root", help="folder the JSONL image paths are relative to (default: current dir)"
    )
    ask.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ask.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention kernel (default sdpa; flash_attention_2 needs the gpu extra)",
    )
    ask.set_defaults(func=_cmd_ask, parser=ask)

    export = sub.add_parser(
        "export",
        help="export a run or checkpoint as an HF LlavaNext folder that transformers 4.x and 5.x load",
        description="Write the latest checkpoint of a run directory (or the given checkpoint directory, or an\n"
        "HF LlavaNext folder) as a self-contained HF LlavaNext folder: weights in the original LLaVA-NeXT\n"
        "key layout, processor, tokenizer, chat template, and a generation config that stops on <|eot_id|>.\n"
        "Plain transformers 4.x and 5.x load it with LlavaNextForConditionalGeneration and AutoProcessor.",
        epilog="examples:\n  ndino export runs/long_it --out release/LLaVA-NDiNO_long --dtype bfloat16\n"
        "  ndino export runs/long_it/checkpoints/step_500 --out release/step_500",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "path", metavar="RUN_OR_CHECKPOINT", help="run directory, checkpoint directory or HF folder"
    )
    export.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    export.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype (default: as stored)",
    )
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ndino`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"ndino {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

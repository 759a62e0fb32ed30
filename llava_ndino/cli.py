"""The ``ndino`` command line: dispatch only; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _cmd_tiny(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from llava_ndino.model.tiny import FOLDER_SIZES, write_tiny

    sizes = replace(FOLDER_SIZES, tile_size=args.image_size)
    paths = write_tiny(Path(args.out), sizes, seed=args.seed)
    if args.text_data:
        from llava_ndino.synthetic.text_samples import write_text_samples

        paths.update(write_text_samples(Path(args.out) / "text", seed=args.seed))
    for name, path in paths.items():
        print(f"{name:>9}: {path}")


def _cmd_assemble(args: argparse.Namespace) -> None:
    from llava_ndino.export.vlm import save_llava_folder
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
    from llava_ndino.export.text import export_text_run, is_text_run
    from llava_ndino.export.vlm import save_llava_folder
    from llava_ndino.model.build import LoadOptions
    from llava_ndino.model.loading import load_trained

    if is_text_run(Path(args.path)):
        export_text_run(Path(args.path), Path(args.out), adapter=args.adapter, dtype=args.dtype)
        print(f"wrote {'PEFT adapter' if args.adapter else 'merged causal-LM'} folder {args.out}")
        return 0
    if args.adapter:
        args.parser.error("--adapter applies to text runs trained with lora.enabled=true")
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
    from llava_ndino.demo.run import run_demo

    run_demo(args.overrides, train_first=not args.no_train)


def _cmd_plan(args: argparse.Namespace) -> None:
    from llava_ndino.plan.planner import run_plan

    print(run_plan(args.overrides))


def _cmd_recipes(args: argparse.Namespace) -> None:
    from llava_ndino.config import list_recipes

    for name, description in list_recipes():
        print(f"{name:<24} {description}")


def _cmd_data_list(args: argparse.Namespace) -> None:
    from llava_ndino.data.manifests import data_root, format_table

    print(format_table(data_root(args.root)))


def _cmd_data_validate(args: argparse.Namespace) -> None:
    from llava_ndino.prep.validate import run_validate

    run_validate(
        args.target,
        [f"recipe={args.recipe[0]}", *args.recipe[1:]],
        Path(args.out) if args.out else None,
        args.image_root,
        args.root,
        args.decode,
    )


def _cmd_data_shard(args: argparse.Namespace) -> None:
    from llava_ndino.prep.shards import hf_items, llava_items, write_shards

    source = Path(args.input)
    if source.is_dir():
        items = hf_items(source)
    else:
        items = llava_items(source, Path(args.image_root) if args.image_root else None)
    index = write_shards(items, Path(args.out), args.samples_per_shard, source=str(source))
    print(f"{index['samples']} samples in {len(index['shards'])} shards -> {args.out}/index.json")
    for sample_id, why in index["dropped"].items():
        print(f"dropped {sample_id}: {why}")


def _cmd_data_translate(args: argparse.Namespace) -> None:
    from llava_ndino.prep.translate import ArgosTranslator, MadladTranslator, translate_file

    if args.backend == "madlad":
        translator = MadladTranslator.from_pretrained(
            args.model, args.device, args.dtype, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams
        )
    else:
        translator = ArgosTranslator(args.source_lang, "it")
    counts = translate_file(Path(args.input), Path(args.output), translator, args.batch_size)
    print(f"{counts['translated']} translated, {counts['skipped_done']} already done -> {args.output}")


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
        epilog="examples:\n  ndino demo train.max_steps=100 output_dir=runs/quick\n"
        "  ndino demo --no-train output_dir=runs/demo-zero3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of recipe=demo")
    demo.add_argument(
        "--no-train",
        action="store_true",
        help="skip training: evaluate, export and ask with the latest checkpoint in output_dir, e.g. "
        "after `torchrun --nproc_per_node 2 launch/train.py recipe=demo engine=zero3 output_dir=DIR`",
    )
    demo.set_defaults(func=_cmd_demo)

    plan = sub.add_parser(
        "plan",
        help="estimate per-GPU memory of a recipe under ddp, zero2, zero3 and their offload variants",
        description="Print, before launch, a per-GPU memory estimate of a recipe for every engine (ddp, zero2,\n"
        "zero2_offload, zero3, zero3_offload), with and without gradient checkpointing: weights, gradients,\n"
        "AdamW state, activations of one micro-batch at data.max_length, engine buffers and a CUDA allowance;\n"
        "host RAM per node for the offload engines, the global batch, and the engine to use. Parameter\n"
        "counts come from the model folders' config.json files, else from the ndino-8b preset (said so).",
        epilog="keys (besides recipe=NAME and any recipe override such as data.max_length=4096):\n"
        "  gpus=N           total GPUs, i.e. the world size (default 1)\n"
        "  gpus_per_node=N  GPUs per node, for the host RAM per node (default 4, Leonardo)\n"
        "  gpu_mem_gb=G     memory per GPU in GiB (default 64, Leonardo's A100 64 GB)\n"
        "  model_preset=ndino-8b  use the built-in shapes even when the model folders exist\n"
        "  logit_fraction=F share of positions whose logits the loss computes (default 1, the upper\n"
        "                   bound; a run's metrics.jsonl logs the real share as logit_fraction)\n\n"
        "examples:\n  ndino plan recipe=long_it gpus=8\n"
        "  ndino plan recipe=adapt gpus=16 gpu_mem_gb=80 train.per_device_batch_size=1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe=NAME, planner keys and overrides"
    )
    plan.set_defaults(func=_cmd_plan)

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
    tiny.add_argument(
        "--text-data",
        action="store_true",
        help="also write small synthetic Italian JSONL sets to OUT/text/ for the text recipes "
        "(text, heldout, instructions, chat, preferences)",
    )
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
        help="export a run or checkpoint as an HF folder (LlavaNext; causal LM or PEFT adapter for text runs)",
        description="Write the latest checkpoint of a run directory (or the given checkpoint directory, or an\n"
        "HF LlavaNext folder) as a self-contained HF LlavaNext folder: weights in the original LLaVA-NeXT\n"
        "key layout, processor, tokenizer, chat template, and a generation config that stops on <|eot_id|>.\n"
        "Plain transformers 4.x and 5.x load it with LlavaNextForConditionalGeneration and AutoProcessor.\n"
        "Text runs (objective clm, sft or dpo) give a merged HF causal-LM folder (AutoModelForCausalLM,\n"
        "AutoTokenizer with the recipe's chat template), or with --adapter a PEFT adapter folder\n"
        "(peft.PeftModel.from_pretrained on the base model.llm).",
        epilog="examples:\n  ndino export runs/long_it --out release/LLaVA-NDiNO_long --dtype bfloat16\n"
        "  ndino export runs/long_it/checkpoints/step_500 --out release/step_500\n"
        "  ndino export runs/anita_sft --out release/anita_sft_merged --dtype bfloat16\n"
        "  ndino export runs/anita_sft --adapter --out release/anita_sft_adapter",
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
    export.add_argument(
        "--adapter",
        action="store_true",
        help="text LoRA/QLoRA runs: write the PEFT adapter folder instead of the merged model",
    )
    export.set_defaults(func=_cmd_export, parser=export)
    data = sub.add_parser(
        "data",
        help="data sets: list manifests, validate, write webdataset shards, translate to Italian",
        description="Data at scale: manifests and stage mixtures (data_manifests/), validation before "
        "training, webdataset shards for streaming, and machine translation of LLaVA conversations.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    data_list = data_sub.add_parser(
        "list", help="show the data manifests, the stage mixtures, and which data sets are present locally"
    )
    data_list.add_argument("--root", help="local data root (default: $NDINO_DATA_ROOT)")
    data_list.set_defaults(func=_cmd_data_list)
    validate = data_sub.add_parser(
        "validate",
        help="report counts, token lengths vs max_length, rejected samples and image sizes before training",
        description="Measure every sample as training would encode it (image token counts from image "
        "headers, without decoding pixels unless --decode) and write summary.json, lengths.png and "
        "rejected.jsonl.",
        epilog="examples:\n  ndino data validate data/train.json --recipe long_it --image-root data/images\n"
        "  ndino data validate llava_instruct_conv_58k_ita --recipe long_it data.max_length=4096",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument(
        "target", metavar="PATH_OR_MANIFEST", help="LLaVA JSON/JSONL, shard folder or manifest"
    )
    validate.add_argument(
        "--recipe",
        required=True,
        nargs="+",
        metavar=("NAME", "KEY=VALUE"),
        help="recipe whose processor, template and limits apply, then its overrides (data.max_length=...)",
    )
    validate.add_argument("--image-root", help="folder the image paths are relative to")
    validate.add_argument("--root", help="local data root for manifest names (default: $NDINO_DATA_ROOT)")
    validate.add_argument("--out", help="report folder (default runs/validate/NAME)")
    validate.add_argument(
        "--decode", action="store_true", help="decode every image fully (finds truncated files)"
    )
    validate.set_defaults(func=_cmd_data_validate)
    shard = data_sub.add_parser(
        "shard",
        help="write webdataset tar shards (image bytes + JSON conversation) with an index and checksums",
        description="Convert a LLaVA JSON/JSONL plus image folder, or an HF datasets folder saved with "
        "save_to_disk, into deterministic webdataset shards: the same input gives byte-identical shards.",
        epilog="example: ndino data shard data/train.json shards/train --image-root data/images",
    )
    shard.add_argument("input", help="LLaVA JSON/JSONL file or HF datasets folder")
    shard.add_argument("out", help="output folder (shard-*.tar + index.json)")
    shard.add_argument(
        "--image-root", help="folder the image paths are relative to (default: the JSON's folder)"
    )
    shard.add_argument(
        "--samples-per-shard", type=int, default=1000, help="samples per tar file (default 1000)"
    )
    shard.set_defaults(func=_cmd_data_shard)
    translate = data_sub.add_parser(
        "translate",
        help="translate LLaVA conversations into Italian (MADLAD-400 or Argos), resumable",
        description="Translate the turns of a LLaVA JSON/JSONL file into Italian, keeping <image> "
        "placeholders, line breaks, turns and ids. Writes JSONL record by record; running again skips "
        "the ids already in OUT.",
        epilog="example: ndino data translate conv_58k.json conv_58k_ita.jsonl --backend madlad "
        "--model models/madlad400-3b-mt --device cuda --dtype bfloat16",
    )
    translate.add_argument("input", metavar="IN", help="LLaVA JSON/JSONL file (records need an id)")
    translate.add_argument("output", metavar="OUT", help="output JSONL file (appended; resumable)")
    translate.add_argument("--backend", choices=["madlad", "argos"], default="madlad", help="default madlad")
    translate.add_argument(
        "--model",
        default="google/madlad400-3b-mt",
        help="madlad: local model folder (default: the HF id, from cache)",
    )
    translate.add_argument("--batch-size", type=int, default=16, help="records per backend call (default 16)")
    translate.add_argument("--device", default="cpu", help="madlad: torch device (default cpu)")
    translate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    translate.add_argument("--max-new-tokens", type=int, default=256, help="madlad: longest translated line")
    translate.add_argument("--num-beams", type=int, default=1, help="madlad: beam size (default 1, greedy)")
    translate.add_argument("--source-lang", default="en", help="argos: source language code (default en)")
    translate.set_defaults(func=_cmd_data_translate)
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

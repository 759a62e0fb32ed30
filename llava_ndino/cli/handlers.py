"""What each ``ndino`` command does: thin functions that read the parsed arguments and call the apps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_tiny(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from llava_ndino.model.tiny import FOLDER_SIZES, write_tiny

    sizes = replace(FOLDER_SIZES, tile_size=args.image_size)
    paths = write_tiny(Path(args.out), sizes, seed=args.seed)
    if args.text_data:
        from llava_ndino.synthetic.text_samples import write_text_samples

        paths.update(write_text_samples(Path(args.out) / "text", seed=args.seed))
    for name, path in paths.items():
        print(f"{name:>9}: {path}")


def cmd_assemble(args: argparse.Namespace) -> None:
    from llava_ndino.export.folders import check_output_folder
    from llava_ndino.export.vlm import save_llava_folder
    from llava_ndino.model.build import LoadOptions, assemble_from_folders

    sources = [Path(args.llm), *([Path(args.projector)] if args.projector else [])]
    if not args.vision.startswith("openclip:"):
        sources.append(Path(args.vision))
    check_output_folder(Path(args.out), sources, args.force)  # before minutes of loading
    options = LoadOptions(dtype=args.dtype, attn_implementation=args.attn_implementation)
    model, processor = assemble_from_folders(
        args.vision, Path(args.llm), Path(args.projector) if args.projector else None, options
    )
    save_llava_folder(model, processor, Path(args.out), sources, args.force)
    print(f"wrote LlavaNext folder {args.out}")


def cmd_ask(args: argparse.Namespace) -> int:
    from llava_ndino.data.conversation import SampleError
    from llava_ndino.infer import DEFAULT_MAX_PROMPT_TOKENS, load_answerer, read_image

    max_prompt_tokens = args.max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS
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
            max_prompt_tokens,
            **generation,
        )
        done = f", {counts['already_done']} answered before" if counts["already_done"] else ""
        print(f"{counts['answered']} answered, {counts['errors']} errors{done} -> {args.out}")
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
    try:
        answerer.check_prompt_length(args.question, max_prompt_tokens)
    except SampleError as err:
        print(f"ndino ask: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    if args.stream:
        answerer.ask(image, args.question, stream=lambda text: print(text, end="", flush=True), **generation)
        print()
    else:
        print(answerer.ask(image, args.question, **generation))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llava_ndino.export.folders import check_output_folder
    from llava_ndino.export.text import export_text_run, is_text_run
    from llava_ndino.export.vlm import save_llava_folder
    from llava_ndino.model.build import LoadOptions
    from llava_ndino.model.loading import load_trained

    source, out = Path(args.path), Path(args.out)
    if is_text_run(source):
        export_text_run(source, out, adapter=args.adapter, dtype=args.dtype, force=args.force)
        print(f"wrote {'PEFT adapter' if args.adapter else 'merged causal-LM'} folder {args.out}")
        return 0
    if args.adapter:
        args.parser.error("--adapter applies to text runs trained with lora.enabled=true")
    check_output_folder(out, [source], args.force)  # before minutes of loading
    model, processor = load_trained(source, LoadOptions(dtype=args.dtype))
    save_llava_folder(model, processor, out, [source], args.force)
    print(f"wrote LlavaNext folder {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llava_ndino.config import load_config
    from llava_ndino.train.loop import train

    result = train(load_config(args.overrides))
    print(f"{result.status} at step {result.step}; run directory {result.run_dir}")
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from llava_ndino.chain import run_chain

    return run_chain(args.name, Path(args.runs_dir), args.overrides, args.dry_run, args.launcher)


def cmd_demo(args: argparse.Namespace) -> None:
    from llava_ndino.demo.run import run_demo

    run_demo(args.overrides, train_first=not args.no_train)


def cmd_plan(args: argparse.Namespace) -> None:
    from llava_ndino.plan.planner import run_plan

    print(run_plan(args.overrides))


def cmd_recipes(args: argparse.Namespace) -> None:
    from llava_ndino.config import list_recipes

    for name, description in list_recipes():
        print(f"{name:<24} {description}")


def cmd_data_list(args: argparse.Namespace) -> None:
    from llava_ndino.data.manifests import data_root, format_table

    print(format_table(data_root(args.root)))


def cmd_data_validate(args: argparse.Namespace) -> None:
    from llava_ndino.prep.validate import run_validate

    run_validate(
        args.target,
        [f"recipe={args.recipe[0]}", *args.recipe[1:]],
        Path(args.out) if args.out else None,
        args.image_root,
        args.root,
        args.decode,
    )


def cmd_data_shard(args: argparse.Namespace) -> None:
    from llava_ndino.prep.shards import hf_items, llava_items, write_shards

    source = Path(args.input)
    if source.is_dir():
        items = hf_items(source)
    else:
        items = llava_items(
            source, Path(args.image_root) if args.image_root else None, args.allow_outside_root
        )
    index = write_shards(items, Path(args.out), args.samples_per_shard, str(source), args.max_skip_ratio)
    print(f"{index['samples']} samples in {len(index['shards'])} shards -> {args.out}/index.json")
    for sample_id, why in index["dropped"].items():
        print(f"dropped {sample_id}: {why}")


def cmd_data_translate(args: argparse.Namespace) -> None:
    from llava_ndino.prep.translate import ArgosTranslator, MadladTranslator, translate_file

    if args.backend == "madlad":
        translator = MadladTranslator.from_pretrained(
            args.model, args.device, args.dtype, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams
        )
    else:
        translator = ArgosTranslator(args.source_lang, "it")
    counts = translate_file(Path(args.input), Path(args.output), translator, args.batch_size)
    print(f"{counts['translated']} translated, {counts['skipped_done']} already done -> {args.output}")

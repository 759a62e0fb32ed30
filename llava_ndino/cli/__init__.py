"""The ``ndino`` command line: the parser built from the command table, and the entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from llava_ndino.cli.table import Command, commands


def _add_commands(sub: argparse._SubParsersAction, table: tuple[Command, ...]) -> None:
    """Add every command of ``table`` (and their children, recursively) to ``sub``."""
    for command in table:
        raw = "\n" in (command.description or "") or "\n" in (command.epilog or "")
        parser = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
        )
        for item in command.args:
            parser.add_argument(*item.flags, **item.options)
        if command.children:
            dest = f"{command.name}_command"
            _add_commands(
                parser.add_subparsers(dest=dest, required=True, metavar=dest.upper()), command.children
            )
        else:
            parser.set_defaults(func=command.run, parser=parser)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``ndino`` argument parser with every subcommand of :func:`commands`."""
    parser = argparse.ArgumentParser(
        prog="ndino",
        description="llava-ndino: train, query and release Italian LLaVA-NeXT (LLaVA-NDiNO) and LLaMAntino models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), commands())
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

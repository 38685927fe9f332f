"""The ``ofa-lightning`` command.

Subcommands that are not training runs live here beside the (coming) LightningCLI ones:
``convert`` turns an official OFA checkpoint into this project's format.
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Sequence


def _parse_override(text: str) -> tuple[str, Any]:
    """``field=value`` with value read as a Python literal when it is one (256, 0.1, True)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} is not of the form field=value")
    name, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ofa-lightning",
        description="OFA, the unified multimodal seq2seq model, as a Lightning research template.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "convert", help="official OFA checkpoint (fairseq .pt, bare or HF state dict) -> ofa-lightning",
        description="Read an official checkpoint without arbitrary unpickling, check it loads "
                    "strictly into the matching architecture, and write this project's format.")
    convert.add_argument("source", help="official checkpoint file")
    convert.add_argument("destination", help="output file (.pt)")
    convert.add_argument("--ema", action="store_true",
                         help="take the EMA weights stored by --store-ema runs (VQA checkpoints)")
    convert.add_argument("--set", dest="overrides", action="append", type=_parse_override,
                         default=[], metavar="FIELD=VALUE",
                         help="replace a config field, e.g. --set code_image_size=256")
    return parser


def _convert(args: argparse.Namespace) -> None:
    from ofa_lightning.checkpoint import convert

    loaded = convert(args.source, args.destination, use_ema=args.ema, **dict(args.overrides))
    print(f"wrote {args.destination} (from a {loaded.source_format} checkpoint): {loaded.config}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from ofa_lightning.checkpoint import CheckpointError

    try:
        {"convert": _convert}[args.command](args)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        sys.exit(f"ofa-lightning {args.command}: error: {error}")


if __name__ == "__main__":
    main()

"""The ``dylora`` command line: ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dylora", description="Continual skill acquisition with LoRA experts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="add a stream of real skills to the default model and show the routing")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for report.md and events.jsonl")
    demo.add_argument("--model", default="default", help="HF model id, local folder or 'default'")
    demo.add_argument("--max-examples", type=int, default=48, help="training examples embedded per skill")
    demo.add_argument("--new-tokens", type=int, default=48, help="tokens per sample completion")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    try:
        if args.command == "demo":
            from .demo import run

            run(args.out, model_name=args.model, max_examples=args.max_examples, new_tokens=args.new_tokens,
                console=Console())
    except (ValueError, FileNotFoundError, KeyError) as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

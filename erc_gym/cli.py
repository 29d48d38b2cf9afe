"""The ``erc-gym`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``erc-gym <command> ...`` to the command's own argument parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": ("erc_gym.demo", "PPO vs PPO+ERC on a toy batch: loss, gradients, entropy"),
        "llm": ("erc_gym.llm.cli", "train a causal LM with GRPO/DAPO/GPPO (+ERC)"),
    }
    parser = argparse.ArgumentParser(
        prog="erc-gym",
        description="Entropy Ratio Clipping (ERC) testbed.",
        epilog="Run 'erc-gym <command> --help' for the options of a command.",
    )
    parser.add_argument(
        "command",
        choices=sorted(commands),
        help="; ".join(f"{k}: {v[1]}" for k, v in commands.items()),
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if argv else 2)
    args = parser.parse_args(argv[:1])
    import importlib

    module = importlib.import_module(commands[args.command][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()

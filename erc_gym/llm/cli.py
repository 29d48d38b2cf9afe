"""``erc-gym llm``: train a causal LM with GRPO / DAPO / GPPO (+ERC) from the command line.

Every :class:`~erc_gym.llm.TrainerConfig` field is a flag (``--prompts-per-step 16``); its help
text is the field's docstring. ``--preset`` sets a named group of fields first.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import math
from typing import Any

from erc_gym.llm.trainer import PRESETS, ERCTrainer, TrainerConfig


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one flag per TrainerConfig field."""
    parser = argparse.ArgumentParser(
        prog="erc-gym llm",
        description="GRPO / DAPO / GPPO (+ERC) for a transformers causal LM. Presets: "
        + ", ".join(f"{k} ({v})" for k, v in PRESETS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named settings, applied first")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if a checkpoint exists in the run folder",
    )
    docs = field_docs(TrainerConfig)
    for f in dataclasses.fields(TrainerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = docs.get(f.name, "")
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                type=lambda s: s.lower() in ("1", "true", "yes"),
                default=None,
                help=f"{help_text} (true/false; default {default})",
            )
            continue
        kind: Any = (
            type(default)
            if default is not None
            else (float if f.name.startswith("erc_") else int if f.name == "vocab_size" else str)
        )
        parser.add_argument(
            flag, type=_parse_optional(kind), default=None, help=f"{help_text} (default {default})"
        )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainerConfig:
    """Preset first, then every flag that was given."""
    values: dict[str, Any] = {}
    if args.preset:
        values |= PRESETS[args.preset]
        values["name"] = args.preset
    for f in dataclasses.fields(TrainerConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return TrainerConfig(**values)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``erc-gym llm`` / ``python -m erc_gym.llm``."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    trainer = ERCTrainer(config)
    lines = trainer.train(resume=not args.no_resume)
    evals = [ln["eval_accuracy"] for ln in lines if "eval_accuracy" in ln]
    summary = {
        "run": str(trainer.run_path),
        "steps": trainer.step,
        "eval_accuracy_first": evals[0] if evals else math.nan,
        "eval_accuracy_last": evals[-1] if evals else math.nan,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

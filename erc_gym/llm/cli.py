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
import math
import textwrap
from pathlib import Path
from typing import Any

from erc_gym.cli_args import CliParser, boolean, fail, writable_dir
from erc_gym.jsonl import dumps_strict
from erc_gym.llm.trainer import PRESETS, ERCTrainer, TrainerConfig, check_resume
from erc_gym.methods import MethodSettings


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its dataclass bases (the string under a field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
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


def _field_kind(f: dataclasses.Field[Any]) -> type:
    """The value type of a field whose default may be None, from its annotation."""
    if f.default is not None:
        return type(f.default)
    annotation = str(f.type)
    for kind in (float, int, str):
        if kind.__name__ in annotation.replace(" ", "").split("|"):
            return kind
    return str


def _parse_optional(kind: type, flag: str) -> Any:
    def parse(text: str) -> Any:
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} or none, got {text!r}"
            ) from None

    parse.__name__ = flag  # argparse names the converter in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one flag per TrainerConfig field."""
    parser = CliParser(
        prog="erc-gym llm",
        description="GRPO / DAPO / GPPO (+ERC) for a transformers causal LM. Presets: "
        + ", ".join(f"{k} ({v})" for k, v in PRESETS.items())
        + ". The run lives in RUN_DIR/NAME; running the same command again resumes it from its "
        "last checkpoint, and a changed setting (other than --steps or logging) is refused "
        "unless --restart is given.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named settings, applied first")
    parser.add_argument(
        "--restart",
        "--overwrite",
        "--no-resume",
        dest="restart",
        action="store_true",
        help="start over: delete the run folder's checkpoint and metrics (a run is otherwise "
        "resumed, and refused if its recorded settings differ)",
    )
    docs = field_docs(TrainerConfig)
    # the trainer's own settings first, then the rival methods' (erc_gym.methods.MethodSettings)
    methods = {f.name for f in dataclasses.fields(MethodSettings)}
    for f in sorted(dataclasses.fields(TrainerConfig), key=lambda f: f.name in methods):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = docs.get(f.name, "")
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                type=boolean,
                default=None,
                metavar="{true,false}",
                help=f"{help_text} (default {str(default).lower()})",
            )
            continue
        kind: Any = _field_kind(f)
        parser.add_argument(
            flag,
            type=_parse_optional(kind, flag),
            default=None,
            help=f"{help_text} (default {default})",
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
    """Entry point of ``erc-gym llm`` / ``python -m erc_gym.llm``.

    Bad settings, a missing model or dataset and a run folder made with other settings end with
    one line on stderr and exit status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
        if not args.restart:
            check_resume(config)
        writable_dir(parser.prog, "--run-dir", str(Path(config.run_dir) / config.name))
        trainer = ERCTrainer(config)
    except (ValueError, OSError) as err:
        fail(parser.prog, str(err))
    lines = trainer.train(resume=not args.restart)
    evals = [ln["eval_accuracy"] for ln in lines if "eval_accuracy" in ln]
    summary = {
        "run": str(trainer.run_path),
        "steps": trainer.step,
        "eval_accuracy_first": evals[0] if evals else math.nan,
        "eval_accuracy_last": evals[-1] if evals else math.nan,
    }
    print(dumps_strict(summary))


if __name__ == "__main__":
    main()

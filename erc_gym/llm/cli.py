"""``erc-gym llm``: train a causal LM with GRPO / DAPO / GPPO (+ERC) from the command line.

Every :class:`~erc_gym.llm.TrainerConfig` field is a flag (``--prompts-per-step 16``); its help
text is the field's docstring. ``--preset`` sets a named group of fields first.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import math
import shlex
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, NoReturn

from erc_gym.cli_args import CliParser, boolean, fail, writable_dir
from erc_gym.jsonl import dumps_strict, read_jsonl
from erc_gym.llm.trainer import (
    PRESETS,
    ERCTrainer,
    TrainerConfig,
    check_resume,
    find_checkpoint,
)
from erc_gym.methods import MethodSettings

#: The flags that start a run over; the resume command drops them.
RESTART_FLAGS = ("--restart", "--overwrite", "--no-resume")


@functools.cache  # parsing the module's source costs ~0.1 s: once per process
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
        *RESTART_FLAGS,
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

    Bad settings, a missing model or dataset, a run folder made with other settings and a run
    whose checkpoints are all damaged end with one line on stderr and exit status 2, before the
    model is built. A run folder with a checkpoint resumes from it (a line says from which step)
    or, if it has all its steps, ends at once. A full disk, a broken verifier or Ctrl-C during
    training end with one line naming the last checkpoint and the command that resumes (exit 1,
    or 130 for Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as err:
        fail(prog, str(err))
    run_path = Path(config.run_dir) / config.name
    trainer: ERCTrainer | None = None
    try:
        try:
            found = None if args.restart else check_resume(config)
            writable_dir(prog, "--run-dir", str(run_path))
            if found is not None:
                damaged = f" ({', '.join(found.damaged)} is damaged)" if found.damaged else ""
                if found.step >= config.steps and (run_path / "model").is_dir():
                    note(
                        f"{run_path} already finished: step {found.step} of {config.steps}; "
                        "nothing to do (a larger --steps continues it, --restart starts over)"
                    )
                    print(dumps_strict(_summary(run_path, found.step)))
                    return
                note(f"resuming {run_path} from step {found.step} ({found.path}){damaged}")
            trainer = ERCTrainer(config)
        except (ValueError, OSError) as err:
            fail(prog, str(err))
        with warnings.catch_warnings():  # the "resuming" line above has said it
            warnings.filterwarnings("ignore", message="damaged checkpoint")
            trainer.train(resume=not args.restart)
    except KeyboardInterrupt:
        where = "" if trainer is None else f" at step {trainer.step}"
        stopped(prog, 130, f"stopped by SIGINT{where}", run_path, argv, newline=config.progress)
    except OSError as err:  # a full disk or a read-only folder mid-run
        what = f"cannot write {err.filename or run_path} ({err.strerror or err})"
        stopped(prog, 1, what, run_path, argv)
    except ValueError as err:  # e.g. a verifier that returns NaN for everything
        stopped(prog, 1, str(err), run_path, argv)
    print(dumps_strict(_summary(trainer.run_path, trainer.step)))


def note(message: str) -> None:
    """One ``erc-gym llm: <message>`` line on stderr (stdout keeps the JSON summary)."""
    sys.stderr.write(f"erc-gym llm: {message}\n")


def stopped(
    prog: str, code: int, what: str, run_path: Path, argv: list[str], newline: bool = False
) -> NoReturn:
    """One line: what stopped the run, the checkpoint it resumes from, the command; exit."""
    try:
        found = find_checkpoint(run_path)
    except ValueError:
        found = None
    kept = (
        "no checkpoint yet (the same command starts from step 0)"
        if found is None
        else f"the last checkpoint ({found.path}, step {found.step}) is intact"
    )
    again = shlex.join(["erc-gym", "llm", *(a for a in argv if a not in RESTART_FLAGS)])
    text = " ".join(f"{what}; {kept}; resume with: {again}".split())
    sys.stderr.write(("\n" if newline else "") + f"{prog}: error: {text}\n")
    raise SystemExit(code)


def _summary(run_path: Path, step: int) -> dict[str, Any]:
    """The closing JSON line: run folder, steps, first and last held-out accuracy."""
    evals = [
        row["eval_accuracy"]
        for row in read_jsonl(run_path / "metrics.jsonl")
        if "eval_accuracy" in row
    ]
    return {
        "run": str(run_path),
        "steps": step,
        "eval_accuracy_first": evals[0] if evals else math.nan,
        "eval_accuracy_last": evals[-1] if evals else math.nan,
    }


if __name__ == "__main__":
    main()

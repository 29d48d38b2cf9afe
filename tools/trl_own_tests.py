"""Run TRL's own GRPO trainer tests against ERCGRPOTrainer, offline, with ERC off and on.

TRL's test suite is not in its wheel, nor in its sdist on PyPI (trl 1.16.0's sdist holds only the
``trl`` package). This script therefore takes TRL's ``tests/`` folder from, in order:

1. ``--source DIR``: a TRL checkout (or any folder with ``tests/test_grpo_trainer.py``); copied
   into the cache;
2. the cache (``--cache``, default ``$ERC_GYM_CACHE/trl_own_tests`` or
   ``~/.cache/erc_gym/trl_own_tests``: outside the repository, so a fresh clone on the same
   machine finds it; nothing of TRL's is committed);
3. the sdist of the installed TRL version (``pip download``), if it contains ``tests/``;
4. ``git clone --branch v<version>`` of TRL's public repository (needs GitHub access).

When none has it, it prints one line saying so and exits with status 3 (``make trl-own-tests``
then reports a skip, or fails with ``TRL_OWN_TESTS_REQUIRED=1``). A copy from another TRL version
than the installed one is used with a warning: its tests may call APIs the installed TRL changed,
and those fail in every mode alike.

The tests run offline: this module, loaded as a pytest plugin (``-p trl_own_tests``), replaces
the hub models they name (``trl-internal-testing/tiny-Qwen2ForCausalLM-2.5`` and the other
text-only architectures) by the same architectures built from a small config with a local
character tokenizer (a ChatML chat template), and the ``trl-internal-testing/zen`` data set by a
local one with the same configurations and columns, built from Python's own Zen (``import
this``). Models and data sets it cannot stand in for (vision, remote code) fail in every mode.

Three runs of the same selection:

* ``stock``: TRL's ``GRPOTrainer``, the baseline;
* ``off``: ``trl.GRPOTrainer`` / ``trl.GRPOConfig`` replaced by ``ERCGRPOTrainer`` /
  ``ERCGRPOConfig`` (ERC off);
* ``on``: the same with ERC on, band (0.98, 1.02) and ``num_iterations=2`` by default, so that
  every test that does not choose a schedule trains off-policy, where ERC acts.

In all three runs every test's config defaults to ``max_steps=4`` (``--max-steps``; TRL's tests
otherwise train 3 epochs of the data set, about 50 steps, 1-2 minutes a test on a loaded 2-core
machine); with ``num_iterations=2`` that leaves two off-policy steps per test in ``on``.

A test that passes in ``stock`` but fails in ``off`` is a regression; in ``on`` it is allowed only
when the error is one of ERC's documented refusals (each names the setting). The script prints
the counts, every differing test with its reason and how many tests ERC clipped tokens in, writes
``summary.json`` under ``--dest``, and exits 1 on an undocumented difference.

``--subset ci`` (what ``make trl-own-tests`` runs) selects the tests of TRL's ``TestGRPOTrainer``
class that exercise the loss, the old-log-prob pass and generation reuse (the keyword expression
:data:`CI_SUBSET`); ``--subset all`` runs the whole file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("stock", "off", "on")
_MODE_ENV = "ERC_GYM_TRL_TESTS_MODE"
_STANDINS_ENV = "ERC_GYM_TRL_TESTS_STANDINS"
_CLIPS_ENV = "ERC_GYM_TRL_TESTS_CLIPS"
_MAX_STEPS_ENV = "ERC_GYM_TRL_TESTS_MAX_STEPS"
_OUTCOMES_ENV = "ERC_GYM_TRL_TESTS_OUTCOMES"
#: Files of TRL's tests/ the GRPO tests import (the rest of the suite is not copied).
_TEST_FILES = (
    "__init__.py",
    "conftest.py",
    "testing_utils.py",
    "testing_constants.py",
    "test_grpo_trainer.py",
)
#: The band of the ``on`` run (narrower than the paper's 0.95 / 1.05, so that ERC clips in most
#: of the 4-step tests), and its default schedule (off-policy, so that ERC acts).
ERC_ON = {"erc_low": 0.98, "erc_high": 1.02, "num_iterations": 2}
#: ERC's refusals (each a ValueError/RuntimeError naming the setting, docs/scale_out.md).
DOCUMENTED_REFUSALS = (
    "ERC needs importance_sampling_level='token'",
    "ERC with erc_clip=",
    "ERC needs beta=0.0",
    "ERC needs off-policy mini-batches",
    "ERC is on but TRL did not run its old-log-prob pass",
)
#: The CI subset: training tests over loss types, schedules and generation settings.
CI_SUBSET = (
    "TestGRPOTrainer and (test_init_minimal or test_train_loss_types or "
    "test_train_multiple_iterations or test_train_delta_clipping or test_train_with_entropy_filter "
    "or test_train_with_static_entropy or test_entropy_bonus or test_train_with_off_policy_mask "
    "or test_train_beta_non_zero or test_train_sequence_importance_sampling or Qwen2ForCausalLM) "
    "and not liger and not vllm and not peft"
)

# ---------------------------------------------------------------------------- stand-ins

#: Hub architecture name prefix -> transformers model type (text-only models).
_ARCHITECTURES = {
    "Qwen3Moe": "qwen3_moe",
    "Qwen3": "qwen3",
    "Qwen2": "qwen2",
    "Llama": "llama",
    "Mistral": "mistral",
    "Gemma2": "gemma2",
    "Cohere2": "cohere2",
    "GptOss": "gpt_oss",
    "Glm4Moe": "glm4_moe",
}
_SMALL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "max_position_embeddings": 512,
}
#: ChatML, the format of the Qwen stand-ins' chat template.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _standin_spec(name: str) -> tuple[str, str] | None:
    """``(model_type, head)`` of a hub id like ``org/tiny-Qwen2ForCausalLM-2.5``, else None."""
    if "/" not in name or os.path.exists(name):
        return None
    tail = name.split("/")[-1].removeprefix("tiny-")
    for head in ("ForCausalLM", "ForSequenceClassification"):
        if head in tail:
            arch = tail.split(head)[0]
            if arch in _ARCHITECTURES:
                return _ARCHITECTURES[arch], head
    if name.startswith("Qwen/Qwen2"):
        return "qwen2", "ForCausalLM"
    return None


def _tokenizer() -> Any:
    import string

    from erc_gym.envs.tokenizer import CharTokenizer

    tok = CharTokenizer.build(string.printable)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def build_standin(name: str, root: Path) -> Path | None:
    """A local folder standing in for hub model ``name`` (built once), or None if unsupported."""
    spec = _standin_spec(name)
    if spec is None:
        return None
    folder = root / name.replace("/", "--")
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_type, head = spec
    tok = _tokenizer()
    fields: dict[str, Any] = {**_SMALL, "vocab_size": len(tok)}
    if "moe" in model_type or model_type == "gpt_oss":
        fields.update(num_experts=4, num_local_experts=4, num_experts_per_tok=2)
    config = AutoConfig.for_model(model_type, **fields)
    config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    if head == "ForSequenceClassification":
        config.num_labels = 1
    auto = AutoModelForCausalLM if head == "ForCausalLM" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = auto.from_config(config)
    tmp = Path(tempfile.mkdtemp(dir=root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # built by a parallel run meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _zen_lines() -> list[str]:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]


def zen(config: str) -> Any:
    """The ``trl-internal-testing/zen`` stand-in: train/test splits of one configuration."""
    from datasets import Dataset

    lines = _zen_lines()
    prompts = [" ".join(line.split()[: max(2, len(line.split()) // 2)]) for line in lines]
    data: dict[str, list[Any]]
    if config == "standard_prompt_only":
        data = {"prompt": prompts}
    elif config == "conversational_prompt_only":
        data = {"prompt": [[{"role": "user", "content": p}] for p in prompts]}
    else:
        raise ValueError(f"no offline stand-in for trl-internal-testing/zen config {config!r}")
    return Dataset.from_dict(data).train_test_split(test_size=0.1, shuffle=False)


def _install_standins(root: Path) -> None:
    """Redirect hub model ids to local stand-ins and ``load_dataset('.../zen')`` to :func:`zen`."""
    import datasets
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    root.mkdir(parents=True, exist_ok=True)

    def redirect(owner: Any) -> None:
        original = owner.__dict__["from_pretrained"].__func__

        def from_pretrained(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(name, str):
                local = build_standin(name, root)
                name = str(local) if local is not None else name
            return original(cls, name, *args, **kwargs)

        owner.from_pretrained = classmethod(from_pretrained)

    for owner in (
        _BaseAutoModelClass,
        transformers.PreTrainedModel,
        transformers.AutoConfig,
        transformers.PretrainedConfig,
        transformers.AutoTokenizer,
        transformers.PreTrainedTokenizerBase,
        transformers.AutoProcessor,
    ):
        redirect(owner)

    load_dataset = datasets.load_dataset

    def offline_load_dataset(path: str, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if path != "trl-internal-testing/zen":
            return load_dataset(path, name, *args, **kwargs)
        splits = zen(name or "standard_prompt_only")
        split, streaming = kwargs.get("split"), kwargs.get("streaming", False)
        if split is None:
            return splits.to_iterable_dataset() if streaming else splits
        part = splits[split]
        return part.to_iterable_dataset() if streaming else part

    datasets.load_dataset = offline_load_dataset


# ---------------------------------------------------------------------------- pytest plugin


def _older_tests_shim() -> None:
    """Let an older copy of TRL's tests import ``is_<pkg>_available`` helpers TRL has dropped.

    A missing ``trl.import_utils.is_<pkg>_available`` answers whether ``<pkg>`` is importable.
    """
    import importlib
    import importlib.util

    import_utils = importlib.import_module("trl.import_utils")

    def missing(name: str) -> Any:
        if name.startswith("is_") and name.endswith("_available"):
            package = name[3 : -len("_available")]
            return lambda: importlib.util.find_spec(package) is not None
        raise AttributeError(f"module 'trl.import_utils' has no attribute {name!r}")

    setattr(import_utils, "__getattr__", missing)  # noqa: B010 -- PEP 562 module hook


def pytest_configure(config: Any) -> None:
    """Install the stand-ins and, in ``off``/``on``, swap TRL's trainer before tests import it."""
    _install_standins(Path(os.environ[_STANDINS_ENV]))
    _older_tests_shim()
    mode = os.environ.get(_MODE_ENV, "stock")
    import dataclasses

    import trl
    import trl.trainer.grpo_trainer as grpo_module

    defaults: dict[str, Any] = {}
    max_steps = int(os.environ.get(_MAX_STEPS_ENV, "0"))
    if max_steps > 0:
        defaults["max_steps"] = max_steps
    if mode == "stock":
        base: type = grpo_module.GRPOConfig
        trainer_cls: type = grpo_module.GRPOTrainer
    else:
        from erc_gym.integrations import trl as adapter

        base = adapter.ERCGRPOConfig
        trainer_cls = adapter.ERCGRPOTrainer
        if mode == "on":
            defaults.update(ERC_ON)
        clips = os.environ.get(_CLIPS_ENV)
        if clips:
            trainer_cls = _recording_trainer(trainer_cls, Path(clips))
    fields = [(k, type(v), dataclasses.field(default=v)) for k, v in defaults.items()]
    config_cls = dataclasses.make_dataclass(base.__name__, fields, bases=(base,))
    # found by pickle (TRL saves its config with torch.save) as this module's attributes
    for cls, name in ((config_cls, "StandInConfig"), (trainer_cls, "StandInTrainer")):
        if cls.__module__ in ("types", __name__):
            cls.__module__, cls.__qualname__ = __name__, name
            globals()[name] = cls
    for module in (trl, grpo_module):
        setattr(module, "GRPOTrainer", trainer_cls)  # noqa: B010 -- swapped at run time
        setattr(module, "GRPOConfig", config_cls)  # noqa: B010


def pytest_runtest_logreport(report: Any) -> None:
    """Append each test phase's outcome and first message line to the outcomes file."""
    path = os.environ.get(_OUTCOMES_ENV)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
    row = {"test": report.nodeid, "when": report.when, "outcome": report.outcome}
    row["message"] = message.strip().splitlines()[0][:300] if message.strip() else ""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _recording_trainer(base: type, path: Path) -> type:
    """The trainer, appending each test's ERC clip counts to ``path`` (one JSON line a batch)."""

    class ERCGRPOTrainer(base):
        def _erc_log_metrics(self, rho: Any, h_old: Any, valid: Any) -> None:
            sums = self._erc_metric_sums(rho, h_old, valid).tolist()
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            with path.open("a") as f:
                f.write(json.dumps({"test": test, "tokens": sums[0], "clipped": sums[1] + sums[2]}))
                f.write("\n")
            super()._erc_log_metrics(rho, h_old, valid)

    return ERCGRPOTrainer


# ---------------------------------------------------------------------------- driver


def default_cache() -> Path:
    base = os.environ.get("ERC_GYM_CACHE") or Path.home() / ".cache" / "erc_gym"
    return Path(base) / "trl_own_tests"


def _copy_tests(src: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=dest.parent))
    (tmp / "tests").mkdir()
    for name in _TEST_FILES:
        if (src / "tests" / name).exists():
            shutil.copy2(src / "tests" / name, tmp / "tests" / name)
    version = (src / "VERSION").read_text().strip() if (src / "VERSION").exists() else "unknown"
    (tmp / "VERSION").write_text(version + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def find_tests(version: str, cache: Path, source: Path | None) -> tuple[Path | None, list[str]]:
    """The folder holding TRL's ``tests/`` (see the module docstring), and what was tried."""
    tried: list[str] = []
    cache.mkdir(parents=True, exist_ok=True)
    if source is not None:
        if not (source / "tests" / "test_grpo_trainer.py").exists():
            return None, [f"--source {source}: no tests/test_grpo_trainer.py"]
        label = (source / "VERSION").read_text().strip() if (source / "VERSION").exists() else ""
        dest = cache / f"trl-{label or 'source'}"
        _copy_tests(source, dest)
        return dest, tried
    for candidate in [cache / f"trl-{version}", *sorted(cache.glob("trl-*"), reverse=True)]:
        if (candidate / "tests" / "test_grpo_trainer.py").exists():
            return candidate, tried
    tried.append(f"cache {cache}: empty")
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run(
            [*pip, f"trl=={version}", "-d", tmp], capture_output=True, text=True, check=False
        )
        sdists = list(Path(tmp).glob("trl-*.tar.gz"))
        if done.returncode == 0 and sdists:
            with tarfile.open(sdists[0]) as tar:
                members = [m for m in tar.getmembers() if "/tests/" in m.name]
                if any(m.name.endswith("/tests/test_grpo_trainer.py") for m in members):
                    tar.extractall(tmp, members=members, filter="data")
                    _copy_tests(Path(tmp) / f"trl-{version}", cache / f"trl-{version}")
                    return cache / f"trl-{version}", tried
            tried.append(f"PyPI sdist trl=={version}: has no tests/")
        else:
            tried.append(f"PyPI sdist trl=={version}: pip download failed")
        url = "https://github.com/huggingface/trl"
        try:
            clone = subprocess.run(
                ["git", "clone", "-q", "--depth", "1", "--branch", f"v{version}", url, tmp + "/g"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            ok = clone.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            _copy_tests(Path(tmp) / "g", cache / f"trl-{version}")
            return cache / f"trl-{version}", tried
        tried.append(f"git clone {url} v{version}: failed (no access?)")
    return None, tried


def run_mode(
    root: Path, mode: str, keyword: str, standins: Path, max_steps: int, extra: list[str]
) -> dict:
    """Run the selected tests in one mode; outcomes per test id from a JUnit XML report."""
    out = standins.parent
    report = out / f"outcomes-{mode}.jsonl"
    clips = out / f"clips-{mode}.jsonl"
    clips.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    env = {
        **os.environ,
        _MODE_ENV: mode,
        _STANDINS_ENV: str(standins),
        _CLIPS_ENV: str(clips),
        _MAX_STEPS_ENV: str(max_steps),
        _OUTCOMES_ENV: str(report),
        # tiny models: one thread each; two threads on a shared 2-core machine ran 20x slower
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "--durations=15",
        "-p",
        "trl_own_tests",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "--rootdir",
        str(root),
        "-k",
        keyword,
        *extra,
        str(root / "tests" / "test_grpo_trainer.py"),
    ]
    start = time.perf_counter()
    log = out / f"pytest-{mode}.log"
    with log.open("w") as f:  # streamed, to follow a long run
        subprocess.run(cmd, env=env, cwd=root, stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    output = log.read_text()
    outcomes = read_report(report)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome, _ in outcomes.values():
        key = "failed" if outcome in ("failed", "error") else outcome
        counts[key] = counts.get(key, 0) + 1
    clipped_tests: set[str] = set()
    if clips.exists():
        for line in clips.read_text().splitlines():
            row = json.loads(line)
            if row["clipped"] > 0:
                clipped_tests.add(row["test"])
    tail = output.strip().splitlines()[-1:] if outcomes else output.strip().splitlines()[-5:]
    return {
        "counts": counts,
        "outcomes": outcomes,
        "seconds": round(seconds),
        "tail": tail,
        "tests_with_erc_clipping": len(clipped_tests),
    }


def read_report(report: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first message line)}`` from the plugin's outcome lines.

    A test's outcome is that of its first phase (setup, call, teardown) that did not pass: an
    error in setup or teardown counts as ``error``, a failed call as ``failed``.
    """
    outcomes: dict[str, tuple[str, str]] = {}
    if report.exists():
        for line in report.read_text().splitlines():
            row = json.loads(line)
            outcome = row["outcome"]
            if outcome == "failed" and row["when"] != "call":
                outcome = "error"
            if outcomes.get(row["test"], ("passed", ""))[0] == "passed":
                outcomes[row["test"]] = (outcome, row["message"])
    return outcomes


def compare(base: dict[str, tuple[str, str]], mode: dict[str, tuple[str, str]]) -> dict:
    """Tests that pass in the baseline but not in ``mode``: documented refusals and others."""
    changed = {
        name: value
        for name, value in mode.items()
        if value[0] in ("failed", "error") and base.get(name, ("passed", ""))[0] == "passed"
    }
    refused = {n: v for n, v in changed.items() if any(r in v[1] for r in DOCUMENTED_REFUSALS)}
    other = {n: v for n, v in changed.items() if n not in refused}
    return {"refused": refused, "other": other}


def main(argv: list[str] | None = None) -> int:
    from erc_gym.cli_args import CliParser, non_negative_int

    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--subset", choices=("ci", "all"), default="ci")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k (overrides --subset)")
    parser.add_argument(
        "--max-steps",
        type=non_negative_int,
        default=4,
        help="default max_steps of every test's config, in all three runs (0: TRL's, 3 epochs)",
    )
    parser.add_argument("--source", type=Path, default=None, help="a TRL checkout to copy from")
    parser.add_argument("--cache", type=Path, default=None, help="where TRL's tests are kept")
    parser.add_argument("--dest", type=Path, default=Path("runs/trl_own_tests"))
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)

    import trl

    root, tried = find_tests(trl.__version__, args.cache or default_cache(), args.source)
    if root is None:
        print(
            f"trl_own_tests: TRL {trl.__version__}'s tests/ are not available here "
            f"({'; '.join(tried)}); pass --source DIR with a TRL checkout",
            file=sys.stderr,
        )
        return 3
    found = (root / "VERSION").read_text().strip()
    print(f"TRL's tests from {root} (TRL {found}); installed trl {trl.__version__}")
    if found != trl.__version__:
        print(f"warning: the tests are TRL {found}'s, run against trl {trl.__version__}")
    keyword = args.keyword or (CI_SUBSET if args.subset == "ci" else "")
    dest = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    standins = dest / "standins"
    results: dict[str, Any] = {}
    for mode in args.modes:
        results[mode] = run_mode(root, mode, keyword, standins, args.max_steps, args.pytest_args)
        res = results[mode]
        print(f"[{mode}] {json.dumps(res['counts'])} in {res['seconds']} s", flush=True)
        if not res["outcomes"]:
            print("  no test ran: " + " | ".join(res["tail"]))
    base = results.get("stock", {}).get("outcomes") or read_report(dest / "outcomes-stock.jsonl")
    undocumented = 0
    for mode in ("off", "on"):
        if mode not in results:
            continue
        diff = compare(base, results[mode]["outcomes"])
        results[mode]["refused"] = {n: list(v) for n, v in diff["refused"].items()}
        results[mode]["differs"] = {n: list(v) for n, v in diff["other"].items()}
        undocumented += len(diff["other"])
        print(
            f"\n[{mode}] {len(diff['refused']) + len(diff['other'])} tests fail that pass with "
            f"GRPOTrainer: {len(diff['refused'])} documented ERC refusals, "
            f"{len(diff['other'])} other"
        )
        for name, (outcome, message) in sorted({**diff["refused"], **diff["other"]}.items()):
            print(f"  {outcome}: {name}\n      {message}")
        if mode == "on":
            print(f"  ERC clipped tokens in {results[mode]['tests_with_erc_clipping']} tests")
    summary = {
        "trl_installed": trl.__version__,
        "trl_tests": found,
        "keyword": keyword,
        **{m: {k: v for k, v in r.items() if k != "outcomes"} for m, r in results.items()},
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"\nwrote {dest / 'summary.json'}")
    if any(not r["outcomes"] for r in results.values()):
        print("trl_own_tests: a run collected no test", file=sys.stderr)
        return 1
    if undocumented:
        print(f"trl_own_tests: {undocumented} undocumented differences", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

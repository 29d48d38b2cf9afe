"""The layers of erc_gym (docs/architecture.md): no import cycle, and each layer imports only the
layers below it. Every ``import`` statement counts, function-local ones included; only those under
``if TYPE_CHECKING:`` (never executed) do not. The kind registry's built-in kinds count as
imports of the registry, since the grid reaches them through it."""

from __future__ import annotations

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Core: the loss (and the rival methods' settings), entropies, advantages, adaptive controllers,
#: diagnostics and the run-log primitives.
CORE = {
    "erc_gym.losses",
    "erc_gym.entropy",
    "erc_gym._entropy_triton",
    "erc_gym.advantages",
    "erc_gym.adaptive_band",
    "erc_gym.adaptive_coef",
    "erc_gym.methods",
    "erc_gym.diagnostics",
    "erc_gym.jsonl",
    "erc_gym.atomic",
    "erc_gym.limits",
}
#: Old module paths that forward to erc_gym.lab for one release.
SHIMS = {
    "erc_gym.runner",
    "erc_gym.stress",
    "erc_gym.analysis",
    "erc_gym.plots",
    "erc_gym.report",
    "erc_gym.experiment_config",
    "erc_gym._deprecated",
}
CLI = {
    "erc_gym.cli",
    "erc_gym.cli_args",
    "erc_gym.demo",
    "erc_gym.__main__",
    "erc_gym.llm.cli",
    "erc_gym.llm.__main__",
}


def _modules() -> dict[str, Path]:
    out = {}
    for base, package in ((ROOT / "erc_gym", "erc_gym"), (ROOT / "envs", "erc_gym.envs")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def layer(module: str) -> str:
    """core, envs, adapter (trainers and integrations), lab, cli, shim or root."""
    if module in CORE:
        return "core"
    if module in SHIMS:
        return "shim"
    if module in CLI:
        return "cli"
    if module == "erc_gym":
        return "root"
    if module.startswith("erc_gym.envs"):
        return "envs"
    if module.startswith("erc_gym.lab"):
        return "lab"
    if module.split(".")[1] in ("bandit", "sb3", "llm", "integrations"):
        return "adapter"
    raise AssertionError(f"{module}: no layer; add it to the architecture (and this test)")


#: What each layer may import.
ALLOWED = {
    "core": {"core"},
    "envs": {"core", "envs"},
    "adapter": {"core", "envs", "adapter"},
    "lab": {"core", "envs", "adapter", "lab"},
    "cli": {"core", "envs", "adapter", "lab", "cli"},
    "shim": {"lab", "shim", "core"},
    "root": {"envs"},
}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _resolve(name: str) -> str | None:
    """The erc_gym module that ``name`` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The erc_gym modules that ``module``'s import statements name."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if _type_checking_only(node, parents):
            continue
        out |= {m for n in names if (m := _resolve(n)) is not None and m != module}
    return out


def graph() -> dict[str, set[str]]:
    edges = {m: imports(m) for m in MODULES}
    from erc_gym.lab.kinds import BUILTIN_KINDS

    edges["erc_gym.lab.kinds"] |= set(BUILTIN_KINDS.values())
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_function_local_imports_and_cycles():
    """The check itself: a function-local import is an edge, and a back edge makes a cycle."""
    assert "erc_gym.lab.kinds.base" in imports("erc_gym.lab.kinds.bandit")
    assert "erc_gym.bandit" in imports("erc_gym.lab.kinds.bandit")  # inside a method
    assert "erc_gym.lab.grid" not in imports("erc_gym.lab.kinds.bandit")  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_erc_gym():
    assert _cycles(graph()) == []


def test_each_layer_imports_only_the_layers_below_it():
    wrong = [
        f"{m} ({layer(m)}) imports {d} ({layer(d)})"
        for m, deps in graph().items()
        for d in sorted(deps)
        if layer(d) not in ALLOWED[layer(m)]
    ]
    assert wrong == []


OLD_PATHS = re.compile(
    r"^erc_gym\.(runner|stress|analysis|plots|report|experiment_config)$|"
    r"^erc_gym\.diagnostics\.EntropyDynamicsCallback$"
)


def test_our_code_uses_the_new_paths():
    """The library, its tests, scripts and examples import nothing from a deprecated path (no
    DeprecationWarning comes from our own code); only this file's shim tests do."""
    found = []
    for folder in ("erc_gym", "envs", "tests", "experiments", "examples", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == Path(__file__) or (
                path.parent == ROOT / "erc_gym" and path.stem in {s[8:] for s in SHIMS}
            ):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                found += [f"{path.relative_to(ROOT)}: {n}" for n in names if OLD_PATHS.match(n)]
    assert found == []


#: Old module -> (new module of its main names, names checked to be the same objects).
MOVED = {
    "erc_gym.runner": ("erc_gym.lab.runner", ["run_experiment", "run_one", "_mp_context"]),
    "erc_gym.experiment_config": ("erc_gym.lab.config", ["validate_experiment", "ConfigError"]),
    "erc_gym.analysis": ("erc_gym.lab.analysis", ["load_runs", "summarize", "Run"]),
    "erc_gym.stress": ("erc_gym.lab.stress", ["cell_table", "effect_table", "claims_table"]),
    "erc_gym.plots": ("erc_gym.lab.plots", ["plot_experiment", "smooth"]),
    "erc_gym.report": ("erc_gym.lab.report", ["write_report", "markdown_table"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_warn_once_and_forward_every_name(old, monkeypatch):
    new, same = MOVED[old]
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} is deprecated") as record:
        module = importlib.import_module(old)
    assert len(record) == 1
    target = importlib.import_module(new)
    for name in same:
        assert getattr(module, name) is getattr(target, name)
    for name in module.__all__:  # the old public names all resolve, wherever they went
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name


def test_old_names_that_moved_or_were_renamed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import erc_gym.analysis as analysis
        import erc_gym.experiment_config as experiment_config
        import erc_gym.plots as plots
        import erc_gym.stress as stress
    from erc_gym.lab import kinds, stats
    from erc_gym.lab import plots as new_plots
    from erc_gym.limits import MAX_GRID_SEED, MAX_GRID_SEEDS

    assert analysis.iqm is stats.iqm and stress.diff_ci is stats.diff_ci
    assert stress.axis_settings is kinds.axis_settings
    assert stress.plot_stress_map is new_plots.plot_stress_map
    assert plots._save is new_plots.save_figure and plots._pyplot is new_plots.pyplot
    assert (experiment_config.MAX_SEED, experiment_config.MAX_SEEDS) == (
        MAX_GRID_SEED,
        MAX_GRID_SEEDS,
    )


def test_the_warning_names_the_importing_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "erc_gym.report", raising=False)
    monkeypatch.delattr(sys.modules["erc_gym"], "report", raising=False)
    with pytest.warns(DeprecationWarning) as record:
        import erc_gym.report  # noqa: F401
    assert record[0].filename == __file__


def test_diagnostics_reexport_of_the_sb3_callback_warns():
    import erc_gym.diagnostics as diagnostics
    from erc_gym.sb3 import EntropyDynamicsCallback

    with pytest.warns(DeprecationWarning, match="import it from erc_gym.sb3"):
        assert diagnostics.EntropyDynamicsCallback is EntropyDynamicsCallback


def _code_only(source: str) -> str:
    """The source without comments, docstrings and other prose (string statements)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            node.value.value = ""
    return ast.unparse(tree)


def test_dapo_numbers_and_the_recipe_list_are_written_once():
    """DAPO's clip-higher 0.28 and dual-clip 10 live in ``LossConfig.dapo``; every list of the
    recipe names (grid schema, runner, figures, SB3 keyword form) comes from ``RECIPES``."""
    code = "\n".join(
        _code_only(p.read_text())
        for p in [*(ROOT / "erc_gym").rglob("*.py"), *(ROOT / "envs").rglob("*.py")]
    )
    assert code.count("0.28") == 1
    assert len(re.findall(r"dual_clip\w*=10(\.0)?\b", code)) == 2  # dapo and gppo, in losses
    assert len(re.findall(r"'ppo'.{0,40}'dapo'.{0,40}'gppo'", code)) == 1  # RECIPES


def test_sb3_recipe_kwargs_are_derived_from_the_loss_recipes():
    from erc_gym.losses import RECIPES, sb3_recipe_kwargs

    assert sb3_recipe_kwargs("ppo") == {}
    assert sb3_recipe_kwargs("dapo") == {"clip_range_high": 0.28, "dual_clip": 10.0}
    assert sb3_recipe_kwargs("gppo") == {"clip_variant": "gppo", "dual_clip": 10.0}
    dapo = RECIPES["dapo"]()
    assert (dapo.eps_high, dapo.dual_clip_c) == (0.28, 10.0)


def test_one_list_of_loss_metric_keys():
    """``LOSS_METRIC_KEYS`` is what ``loss_metrics`` returns (``ENTROPY_METRIC_KEYS`` only with
    entropies); ERCPPO's ``train/*`` keys are a filtered, renamed copy of it."""
    import torch

    from erc_gym.losses import (
        ENTROPY_METRIC_KEYS,
        LOSS_METRIC_KEYS,
        ERCConfig,
        LossConfig,
        policy_loss,
    )
    from erc_gym.sb3.ppo import _ERC_LOG_KEYS

    lp, h = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    config = LossConfig.dapo(ERCConfig())
    with_h = policy_loss(lp, lp + 0.1, torch.randn(4), entropy=h, old_entropy=h, config=config)
    without = policy_loss(lp, lp + 0.1, torch.randn(4), config=LossConfig.dapo())
    assert set(with_h.metrics) == set(LOSS_METRIC_KEYS)
    assert set(without.metrics) == set(LOSS_METRIC_KEYS) - set(ENTROPY_METRIC_KEYS)
    assert set(_ERC_LOG_KEYS) < set(LOSS_METRIC_KEYS)
    assert _ERC_LOG_KEYS["entropy_mean"] == "entropy"


def test_the_rival_methods_add_only_their_listed_keys():
    """Every method of ``METHODS`` adds to ``LOSS_METRIC_KEYS`` only ``METHOD_METRIC_KEYS``."""
    import torch

    from erc_gym.losses import (
        LOSS_METRIC_KEYS,
        METHOD_METRIC_KEYS,
        METHODS,
        LossConfig,
        policy_loss,
    )
    from erc_gym.methods import MethodSettings

    lp, h = torch.randn(4, 3), (torch.rand(4, 3) + 0.1).requires_grad_(True)
    seen: set[str] = set()
    for name, settings in METHODS.items():
        band = (settings.get("erc_low"), settings.get("erc_high"))
        methods = MethodSettings(**{k: v for k, v in settings.items() if not k.startswith("erc_")})
        config = methods.apply_to(LossConfig.named("dapo", *band), kl_estimator="k3")
        coef = {"entropy_coef": 0.01} if methods.entropy_target is not None else {}
        out = policy_loss(
            lp, lp + 0.1, torch.randn(4), entropy=h, old_entropy=h.detach(), config=config, **coef
        )
        extra = set(out.metrics) - set(LOSS_METRIC_KEYS)
        assert extra <= set(METHOD_METRIC_KEYS), (name, extra)
        seen |= extra
    assert seen == set(METHOD_METRIC_KEYS)  # and each listed key is some method's


def test_comments_point_into_the_repository():
    """Docstrings and comments cite docs/method.md, not a document outside the repository, and
    no issue numbers (history is in the commit messages)."""
    outside = re.compile(r"ERC_SPEC|[Ii]ssue #\d|#\d+,? items? \d|\(#\d+\)")
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for folder in ("erc_gym", "envs", "tests", "experiments", "tools", "examples")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".sh", ".md") and path != Path(__file__)
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert found == []

"""The API reference (docs/api/*.md): the public packages are on it, and every public symbol on it
has a docstring.

autodoc leaves a member without a docstring out of the page without a warning, so the strict
site build alone would not notice one; this test does. It imports the modules as the build does,
with TRL and verl replaced by autodoc's mock objects (they live in their own environments), so it
needs Sphinx: ``make docs`` installs it and runs this file after the build.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("sphinx", reason="needs the docs extra: make docs")

from sphinx.ext.autodoc.mock import mock
from sphinx.pycode import ModuleAnalyzer

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
DIRECTIVE = re.compile(r"^\.\. automodule:: (\S+)\n((?:   :[\w-]+:.*\n)*)", re.M)
#: The engines the integrations import; the docs build mocks them too (docs/conf.py).
MOCKED = ["trl", "verl"]


def _documented_modules() -> dict[str, bool]:
    """Module name -> whether its members are documented (no ``:no-members:``)."""
    out = {}
    for page in sorted(API.glob("*.md")):
        for name, options in DIRECTIVE.findall(page.read_text()):
            out[name] = ":no-members:" not in options
    return out


def _import(name: str) -> ModuleType:
    with mock(MOCKED):
        return importlib.import_module(name)


def _attr_docs(module_name: str) -> dict[tuple[str, str], list[str]]:
    return ModuleAnalyzer.for_module(module_name).find_attr_docs()


def _own_doc(obj: Any) -> str | None:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def _data_documented(module: ModuleType, name: str, obj: Any) -> bool:
    """A ``#:`` comment or a docstring after the assignment, in the module or the submodule
    it was imported from (as autodoc finds it)."""
    homes = [module.__name__] + [
        sub.__name__
        for sub in list(sys.modules.values())
        if sub is not None
        and sub.__name__.startswith(module.__name__ + ".")
        and getattr(sub, name, None) is obj
    ]
    return any(("", name) in _attr_docs(home) for home in homes)


def _missing(module: ModuleType) -> list[str]:
    missing = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        where = f"{module.__name__}.{name}"
        if getattr(obj, "__sphinx_mock__", False):  # built on a mocked engine class
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if _own_doc(obj) is None:
                missing.append(where)
            if inspect.isclass(obj):
                missing += _missing_members(obj, where)
        elif not _data_documented(module, name, obj):
            missing.append(f"{where} (data: add a #: comment)")
    return missing


def _in_class_docstring(cls: type, name: str) -> bool:
    """``name`` is described in the class docstring's ``Attributes:`` / ``Args:`` section."""
    doc = inspect.getdoc(cls) or ""
    return re.search(rf"^\s+{re.escape(name)}( \(.*\))?:", doc, re.M) is not None


def _missing_members(cls: type, where: str) -> list[str]:
    missing = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        # an override of a base class's method (gymnasium's reset / step, torch's forward) is
        # that base's API; without a docstring of its own it is left off the page
        if any(name in vars(base) for base in cls.__mro__[1:]) and not _own_doc(member):
            continue
        func = member.fget if isinstance(member, property) else member
        if isinstance(func, staticmethod | classmethod):
            func = func.__func__
        if (inspect.isfunction(func) or isinstance(member, property)) and not _own_doc(func):
            missing.append(f"{where}.{name}")
    if dataclasses.is_dataclass(cls):
        docs = _attr_docs(cls.__module__)
        for field in dataclasses.fields(cls):
            own = field.name in inspect.get_annotations(cls)
            described = (cls.__qualname__, field.name) in docs or _in_class_docstring(
                cls, field.name
            )
            if own and not field.name.startswith("_") and not described:
                missing.append(f"{where}.{field.name} (field)")
    return missing


def test_api_pages_cover_the_public_packages():
    documented = _documented_modules()
    for name in (
        "erc_gym",
        "erc_gym.losses",
        "erc_gym.entropy",
        "erc_gym.sb3",
        "erc_gym.envs",
        "erc_gym.llm",
        "erc_gym.integrations",
        "erc_gym.integrations.trl",
        "erc_gym.integrations.verl",
    ):
        assert name in documented, f"docs/api has no page for {name}"


def test_top_level_page_lists_every_top_level_name():
    import erc_gym

    page = (API / "erc_gym.md").read_text()
    for name in erc_gym.__all__:
        assert f".{name}`" in page, f"docs/api/erc_gym.md does not list erc_gym.{name}"


@pytest.mark.parametrize("module_name", sorted(_documented_modules()))
def test_every_public_symbol_has_a_docstring(module_name):
    module = _import(module_name)
    assert _own_doc(module), f"{module_name} has no module docstring"
    if _documented_modules()[module_name]:
        assert _missing(module) == []

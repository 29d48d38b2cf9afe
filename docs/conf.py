"""Sphinx configuration of the erc_gym documentation site (``make docs``; see docs/README.md).

The pages are the Markdown files of this folder (MyST), the notebooks under ``notebooks/``
(MyST-NB, shown without executing them; ``tests/test_notebooks.py`` runs them) and the API
reference under ``api/``, generated from the docstrings by autodoc (Google style through
napoleon). ``make docs`` builds in strict mode: every warning is an error, and ``nitpicky``
makes every cross-reference to this project's objects resolve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

project = "erc_gym"
author = "erc_gym developers"
copyright = "erc_gym developers"

extensions = [
    "myst_nb",  # Markdown pages (MyST) and notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Markdown pages and notebooks. README.md (how to build these docs) and data/ are not pages.
exclude_patterns = ["_build", "README.md", "data", "**/.ipynb_checkpoints"]
root_doc = "index"

# MyST: GitHub-style heading anchors, so links such as results.md#experiment-grids keep working
# on the site as they do on GitHub.
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath"]

# Notebooks are shown as stored (without outputs; CI executes them in tests/test_notebooks.py).
nb_execution_mode = "off"

# API reference. TRL and verl are optional extras that cannot share one environment (verl pins
# transformers < 5.11, TRL needs >= 5.2); their adapters are documented with the engines
# replaced by autodoc's mock objects, which is enough to read the adapters' docstrings and
# signatures (tests/integrations run the real thing in .venv-trl / .venv-verl).
autodoc_mock_imports = ["trl", "verl"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Strict references: our own objects must resolve; third-party types are not linked (the build
# is offline, so there are no intersphinx inventories to link them to).
nitpicky = True
_EXTERNAL = (
    "torch",
    "Tensor",
    "np",
    "numpy",
    "gym",
    "gymnasium",
    "stable_baselines3",
    "transformers",
    "tokenizers",
    "trl",
    "verl",
    "pydantic",
    "omegaconf",
    "tqdm",
    "matplotlib",
    "collections",
    "concurrent",
    "contextlib",
    "pathlib",
    "typing",
    "types",
    "datetime",
    "argparse",
    "dataclasses",
    "th",  # SB3's alias of torch
    "Module",
    "TensorDict",
    "PreTrainedTokenizerFast",
    "ActType",
    "ObsType",
    "scipy",
    "filelock",
    "Path",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    # type variables and private bases that appear in signatures and class headers
    (r"py:class", r"erc_gym\..*\.(Self\w+|_\w+)"),
]

# Methods that override a library's (gymnasium's reset/step, SB3's train) without a docstring
# of their own are not repeated here with the library's text, whose cross-references point into
# that library's documentation.
autodoc_inherit_docstrings = False


html_theme = "furo"
html_title = "erc_gym"
html_static_path: list[str] = []


def _attribute_docstrings_are_prose(app, what, name, obj, options, lines):
    """Undo napoleon's reading of an attribute docstring's first words as a type.

    Google style lets an attribute docstring start with ``type: description``; this project
    writes them as prose ("Presets only: pad the tokenizer ...", "The same on a GPU, where ...:
    32M elements"), and the type comes from the annotation. Napoleon moves the text before the
    first colon to a trailing ``:type:`` field; this puts it back where it was written.
    """
    if what not in ("attribute", "data", "property") or not lines:
        return
    if not lines[-1].startswith(":type: "):
        return
    prefix = lines.pop()[len(":type: ") :]
    while lines and not lines[-1].strip():
        lines.pop()
    for k, line in enumerate(lines):
        if line.strip():
            lines[k] = f"{prefix}: {line}"
            break


def setup(app):
    # runs after napoleon (priority 500) has rewritten the docstring
    app.connect("autodoc-process-docstring", _attribute_docstrings_are_prose, priority=600)

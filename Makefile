# One-command set-up and jobs. `make demo` runs the main job, `make test` the test suite;
# both create .venv and install the project on first use.
#
# torch: on a machine without nvidia-smi (TORCH=cpu) the CPU-only wheel torch==X+cpu comes from
# PyTorch's CPU index, so pip does not pull PyPI's CUDA build (GBs of nvidia-* packages); where
# that index is not reachable (offline CI with a local wheel folder or mirror) pip takes torch==X
# from the configured indexes. With nvidia-smi (TORCH=cuda) PyPI's default CUDA build is used.
# Override with `make setup TORCH=cpu` or `make setup TORCH=cuda`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q --disable-pip-version-check
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' constraints-cpu.txt)

comma := ,

.PHONY: setup demo test test-slow test-gpu test-trl test-verl test-integrations test-ray trl-own-tests ci lint format bench docs clean

setup: $(VENV)/.installed

# $(call make_venv,DIR,EXTRAS): a virtualenv in DIR with the project installed editable with
# EXTRAS, torch chosen as described at the top (shared by .venv, .venv-trl and .venv-verl).
ifeq ($(TORCH),cpu)
define make_venv
	python3 -m venv $(1)
	@if $(1)/bin/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" 2>/dev/null; then \
		echo "torch: CPU build torch==$(TORCH_VERSION)+cpu from $(TORCH_CPU_INDEX)"; \
		$(1)/bin/python -m pip install $(PIP_FLAGS) "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); \
	else \
		echo "torch: $(TORCH_CPU_INDEX) not reachable; torch==$(TORCH_VERSION) from the configured indexes"; \
	fi
	$(1)/bin/python -m pip install $(PIP_FLAGS) -c constraints-cpu.txt -e ".[$(2)]" 2>&1 | grep -v "^WARNING: Location" || true
endef
else
define make_venv
	python3 -m venv $(1)
	@echo "torch: TORCH=cuda (nvidia-smi found, or set by hand): PyPI's default CUDA build"
	$(1)/bin/python -m pip install $(PIP_FLAGS) -e ".[$(2)]" 2>&1 | grep -v "^WARNING: Location" || true
endef
endif

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(call make_venv,$(VENV),dev)
	$(PY) -c "import erc_gym, torch; print('erc_gym', erc_gym.__version__, 'torch', torch.__version__)"
	touch $@

demo: setup
	$(PY) -m erc_gym experiment quick

test: setup
	$(PY) -m pytest -m "not slow and not gpu and not trl and not verl and not ray"

test-slow: setup
	$(PY) -m pytest -m "slow and not trl and not verl and not ray"

test-gpu: setup
	$(PY) -m pytest -m gpu

# TRL integration tests, in their own environment (TRL's pins differ from verl's; see
# docs/scale_out.md). Creates $(VENV_TRL) on first use.
VENV_TRL ?= .venv-trl

$(VENV_TRL)/.installed: pyproject.toml constraints-cpu.txt
	$(call make_venv,$(VENV_TRL),dev$(comma)trl)
	@# DeepSpeed for the ZeRO-3 tests (its CPU accelerator; no CUDA ops are built). Where it
	@# does not install, the ZeRO-3 test is skipped and the rest of the suite still runs.
	DS_BUILD_OPS=0 $(VENV_TRL)/bin/python -m pip install $(PIP_FLAGS) "deepspeed>=0.19,<0.20" \
		|| echo "deepspeed did not install: the ZeRO-3 test of test_trl.py will be skipped"
	$(VENV_TRL)/bin/python -c "import trl, torch; print('trl', trl.__version__, 'torch', torch.__version__)"
	touch $@

test-trl: $(VENV_TRL)/.installed
	$(VENV_TRL)/bin/python -m pytest -m trl tests/integrations

# TRL's own GRPO tests against ERCGRPOTrainer, ERC off and on (tools/trl_own_tests.py, whose
# docstring says where TRL's tests come from: TRL's sdist on PyPI has none, so a machine without
# GitHub access needs a cached copy). Without one it prints why and skips;
# TRL_OWN_TESTS_REQUIRED=1 makes that a failure. TRL_OWN_TESTS_ARGS="--subset all" runs the whole file.
TRL_OWN_TESTS_ARGS ?= --subset ci

trl-own-tests: $(VENV_TRL)/.installed
	@$(VENV_TRL)/bin/python tools/trl_own_tests.py $(TRL_OWN_TESTS_ARGS); rc=$$?; \
	if [ $$rc -eq 3 ] && [ -z "$(TRL_OWN_TESTS_REQUIRED)" ]; then \
		echo "trl-own-tests: SKIPPED (no copy of TRL's tests here)"; exit 0; fi; exit $$rc

# verl pins transformers < 5.11, so its tests run in their own environment, built from scratch
# (13 min wall on a loaded 2-core machine, 2.7 min of it CPU; docs/scale_out.md).
VERL_VENV ?= .venv-verl

$(VERL_VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(call make_venv,$(VERL_VENV),dev$(comma)verl)
	$(VERL_VENV)/bin/python -c "import verl, erc_gym.integrations.verl; print('verl', verl.__version__)"
	touch $@

test-verl: $(VERL_VENV)/.installed
	$(VERL_VENV)/bin/python -m pytest -m verl tests/integrations

# Both integration suites (each in its own environment).
test-integrations: test-trl test-verl

# The documentation site (docs/README.md): Sphinx + MyST-NB + furo, built into site/ in strict
# mode (-W: any warning fails; -n: every reference to this project's objects must resolve; -E:
# every page is read again, so no warning hides in a cached page). Adds the docs extra to .venv.
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install $(PIP_FLAGS) -c constraints-cpu.txt -e ".[dev,docs]" 2>&1 | grep -v "^WARNING: Location" || true
	touch $@

docs: $(VENV)/.docs-installed
	rm -rf site
	$(VENV)/bin/sphinx-build -E -W --keep-going -n -q -b html docs site
	rm -rf jupyter_execute  # MyST-NB's copy of the notebooks, written beside the output folder
	$(PY) -m pytest -q tests/test_docs_api.py
	@echo "built site/index.html (open it with: python -m webbrowser site/index.html)"

# The Ray launcher suite (docs/cluster.md): a real Ray cluster on 127.0.0.1 started by the tests.
# In its own environment so that `make setup` stays free of Ray; creates $(VENV_RAY) on first use.
VENV_RAY ?= .venv-ray

$(VENV_RAY)/.installed: pyproject.toml constraints-cpu.txt
	$(call make_venv,$(VENV_RAY),dev$(comma)ray)
	$(VENV_RAY)/bin/python -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"
	touch $@

test-ray: $(VENV_RAY)/.installed
	$(VENV_RAY)/bin/python -m pytest -m ray tests/test_ray*.py

# What CI runs (.ci/run): lint, the documentation site, the default suite, the TRL and verl suites,
# TRL's own GRPO tests, the Ray launcher suite.
ci: lint docs test test-integrations trl-own-tests test-ray

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) experiments/bench/bench_entropy.py
	$(PY) experiments/bench/bench_loss.py

clean:
	rm -rf $(VENV) $(VENV_TRL) $(VERL_VENV) $(VENV_RAY) .pytest_cache .ruff_cache .mypy_cache .hypothesis site

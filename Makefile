# One-command set-up and jobs. `make demo` runs the main job, `make test` the test suite;
# both create .venv and install the project (CPU torch via constraints-cpu.txt) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: setup demo test test-slow test-gpu test-trl test-verl lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints-cpu.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import erc_gym, torch; print('erc_gym', erc_gym.__version__, 'torch', torch.__version__)"
	touch $@

demo: setup
	$(PY) -m erc_gym experiment quick

test: setup
	$(PY) -m pytest -m "not slow and not gpu"

test-slow: setup
	$(PY) -m pytest -m slow

test-gpu: setup
	$(PY) -m pytest -m gpu

# TRL integration tests, in their own environment (TRL's pins differ from verl's; see
# docs/scale_out.md). Creates $(VENV_TRL) on first use.
VENV_TRL ?= .venv-trl

$(VENV_TRL)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV_TRL)
	$(VENV_TRL)/bin/python -m pip install $(PIP_FLAGS) -c constraints-cpu.txt -e ".[dev,trl]" 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV_TRL)/bin/python -c "import trl, torch; print('trl', trl.__version__, 'torch', torch.__version__)"
	touch $@

test-trl: $(VENV_TRL)/.installed
	$(VENV_TRL)/bin/python -m pytest tests/integrations/test_trl.py

# verl pins transformers < 5.11, so its tests run in their own environment, built from scratch
# (13 min wall on a loaded 2-core machine, 2.7 min of it CPU; docs/scale_out.md).
VERL_VENV ?= .venv-verl
test-verl:
	rm -rf $(VERL_VENV)
	python3 -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install $(PIP_FLAGS) -c constraints-cpu.txt -e ".[dev,verl]" 2>&1 | grep -v "^WARNING: Location" || true
	$(VERL_VENV)/bin/python -c "import verl, erc_gym.integrations.verl; print('verl', verl.__version__)"
	$(VERL_VENV)/bin/python -m pytest tests/integrations/test_verl.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) experiments/bench_entropy.py
	$(PY) experiments/bench_loss.py

clean:
	rm -rf $(VENV) $(VENV_TRL) $(VERL_VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis

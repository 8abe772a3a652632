# Two commands are all the set-up anyone needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test test-fast appworld clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when pyproject.toml changes; the stamp records the last install.
$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(STAMP_RUN)

# The default job: `python -m jaxagent.train --config tiny` (SFT then LOOP on AppTown, from scratch, on a CPU).
# Extra settings go in ARGS, e.g. `make run ARGS="seed=1 run_dir=runs/tiny-seed1"`.
run: $(STAMP_RUN)
	$(PY) -m jaxagent.train $(ARGS)

# --durations: the CI log shows where the suite's time goes (it must stay well under 15 minutes on 2 cores).
test: $(STAMP_TEST)
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

test-fast: $(STAMP_TEST)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# AppWorld's own virtualenv (pins pydantic 1) and the offline task set, in ./.appworld; the AppWorld tests and
# `env.name=appworld` runs create it on first use, this target does it up front (about a minute).
appworld: $(STAMP_RUN)
	$(PY) -m jaxagent.envs.appworld setup

clean:
	rm -rf $(VENV) build *.egg-info

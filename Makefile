# Two commands are all the set-up anyone needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test test-fast appworld constraints clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Exact versions from the constraints file; reinstall when it or pyproject.toml changes (the stamp is the last install).
CONSTRAINTS := third_party/constraints.txt

# `make run` installs without compiling every installed module to bytecode (half the install time): Python
# compiles the ones a run imports when it first imports them. The suite starts many processes, so `make test`
# compiles them all (compileall skips the modules already compiled; the few files written for a newer Python, such as
# torch's 3.12-syntax test helpers, fail to compile here as they do under pip, and are never imported).
$(STAMP_RUN): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet --no-compile -c $(CONSTRAINTS) -e .
	touch $@

$(STAMP_TEST): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@ $(STAMP_RUN)

# The default job: `python -m jaxagent.train --config tiny` (SFT then LOOP on AppTown, from scratch, on a CPU).
# Extra settings go in ARGS, e.g. `make run ARGS="seed=1 run_dir=runs/tiny-seed1"`.
run: $(STAMP_RUN)
	$(PY) -m jaxagent.train $(ARGS)

# --durations: the CI log shows where the suite's time goes (the target is 10 minutes on 2 cores after install).
# AppWorld's own virtualenv is part of the install (the AppWorld tests run the real package); a no-op once built.
# The project's own modules are compiled to bytecode first, as the installed ones are: each of the suite's many
# processes would otherwise compile them again (on machines that set PYTHONDONTWRITEBYTECODE, Python never saves them).
test: $(STAMP_TEST) appworld
	$(PY) -m compileall -q jaxagent benchmarks > /dev/null
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

test-fast: $(STAMP_TEST)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# AppWorld's own virtualenv (pins pydantic 1) and the offline task set, in ./.appworld; the AppWorld tests and
# `env.name=appworld` runs create it on first use, this target does it up front (about a minute).
appworld: $(STAMP_RUN)
	$(PY) -m jaxagent.envs.appworld setup

# After changing a dependency: re-pin both constraint files from the current environments (run `make test` first).
constraints: $(STAMP_TEST)
	{ sed -n '1,2p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable | grep -v '^ruff==' \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	{ sed -n '1,2p' jaxagent/envs/appworld/constraints.txt; .appworld/venv/bin/pip freeze --exclude-editable; } \
	  > appworld-constraints.new && mv appworld-constraints.new jaxagent/envs/appworld/constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands are all the set-up anyone needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test test-fast clean

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

# Until the training driver (jaxagent.train) lands, `make run` runs the foundation demo: tokenizer, model,
# LoRA behaviour cloning, cached greedy decoding, checkpoint, export and re-import.
run: $(STAMP_RUN)
	$(PY) -m jaxagent.demo $(ARGS)

test: $(STAMP_TEST)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP_TEST)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml cluster/requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so the dependency resolver never pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The cluster image's locked versions as constraints (hashes dropped): the tests run what the image runs.
	sed -e '/--hash=/d' -e 's/ *\\$$//' cluster/requirements.lock > $(VENV)/constraints.txt
	$(BIN)/pip install -q -e '.[dev]' -c $(VENV)/constraints.txt
	touch $(STAMP)

.PHONY: setup demo test lock
setup: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/metaaligner demo --output demo_output

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -m "not slow" tests

# Regenerate the cluster image's lock files (cluster/requirements.lock, cluster/deepspeed.lock) after a dependency bump.
lock: $(STAMP)
	VENV=$(VENV) bash cluster/lock.sh

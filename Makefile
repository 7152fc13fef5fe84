# `make run`: set up .venv and run the smoke suite (baseline vs HL on synthetic data, CPU, a few minutes).
# `make test`: set up .venv and run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch/torchvision come from constraints.txt only when the venv has no torch yet (a user's own build stays).
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || \
		$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -e ".[test,notebooks]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m hlbench.run $(ARGS)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n auto $(ARGS)

clean-venv:
	rm -rf $(VENV)

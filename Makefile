# Two commands do all the set-up on a fresh machine (see README.md):
#   make lab    build .venv if needed, run `batchnorm lab` (quick profile), print the report path
#   make test   build .venv if needed (and Chromium for the report test), run the test suite
# constraints.txt pins every package (torch 2.13.0 CPU build included) so set-up never
# pulls a CUDA build of torch.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: lab test bench venv chromium

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

venv: $(STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install chromium; the browser test will be skipped"; }

lab: $(STAMP)
	$(VENV)/bin/batchnorm lab $(ARGS)

test: $(STAMP) chromium
	$(VENV)/bin/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/batchnorm bench $(ARGS)

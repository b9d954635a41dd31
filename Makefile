# make demo / make test on a fresh clone: create .venv, install, run.
VENV   := .venv
PY     := $(VENV)/bin/python
VLRL   := $(VENV)/bin/vlrl
DEMO   := demo-out
# The oldest transformers vlrl supports (pyproject's floor; the GPU image's release). `make test` runs the
# model-facing tests (marker `model`) a second time with it laid over the venv: a --target folder on
# PYTHONPATH holding transformers and the huggingface-hub 1.x it needs (hub 2.x is for newer releases).
FLOOR_TF := 5.17.0
FLOOR    := .venv-floor
# the Tinker recipes `vlrl serve` is tested against (tests/test_serve_cookbook.py), unmodified
COOKBOOK := 0.6.1

.PHONY: install test test-newest test-floor browser demo demo-maze demo-maze3 bench clean

install: $(VENV)/.installed

# torch first, pinned, with pip: on the dev/CI machines this release installs from local disk (no download).
# The rest with uv where it can (7 s where pip took 50 on two cores; what torch pip installed stays, since it
# satisfies the requirement), with pip where uv fails (uv reads neither pip.conf nor PIP_* settings).
UV_OR_PIP = $(VENV)/bin/uv pip install -q --python $(PY) $(1) || $(PY) -m pip install -q $(1)
PROJECT   := -e ".[dev,serve,tinker-client]"
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q uv || echo "no uv here: pip installs the rest" >&2
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(call UV_OR_PIP,torch==2.14.1 torchvision==0.29.1 $(PROJECT))
	$(call UV_OR_PIP,--no-deps tinker-cookbook==$(COOKBOOK))
	touch $@

$(FLOOR)/.installed: Makefile
	rm -rf $(FLOOR)
	$(PY) -m pip install -q --no-deps --target $(FLOOR) transformers==$(FLOOR_TF) "huggingface-hub>=1.5,<2" \
		"httpx>=0.23,<1" "httpcore>=1,<2" certifi
	touch $@

browser:
	@bash scripts/ensure-chromium.sh

# every CPU test on the newest transformers the venv resolved, then the model tests on the floor
test: test-newest test-floor

# Two workers, one per core: most tests are one Python process on one core (tiny models, CLI runs), and each
# worker's torch keeps to one thread so they never oversubscribe. A third worker (tried) let the short tests
# finish sooner but took a third of a core from the longest demo, which sets the end (the maze demo took
# 1,075 s beside two other workers, 640-700 s beside one).
# loadgroup: tests go out one at a time, in order, so the longest tests (first in the collection:
# tests/conftest.py puts them there) start at once on different workers and the short tests fill in around them.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-newest: install browser
	$(PYTEST)

test-floor: install $(FLOOR)/.installed
	PYTHONPATH=$(abspath $(FLOOR)) $(PYTEST) -m "model and not slow and not gpu"

demo: install
	bash scripts/demo.sh $(VLRL) $(DEMO)

# the multi-turn image task: 2x2 mazes, a new frame after every move
demo-maze: install
	bash scripts/demo-maze.sh $(VLRL) $(DEMO)

# the same on 3x3 mazes that take 4 moves (a blind policy solves 0.25): about 40 minutes on 2 cores
demo-maze3: install
	bash scripts/demo-maze.sh $(VLRL) $(DEMO) 3

bench: install
	$(PY) bench/prepare_validate.py

clean:
	rm -rf $(DEMO) .pytest_cache $(FLOOR)

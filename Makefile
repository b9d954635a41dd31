# make demo / make test on a fresh clone: create .venv, install, run.
VENV   := .venv
PY     := $(VENV)/bin/python
VLRL   := $(VENV)/bin/vlrl
DEMO   := demo-out

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# torch first, pinned: on the dev/CI machines this release installs from local disk (no download).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	bash scripts/demo.sh $(VLRL) $(DEMO)

bench: install
	$(PY) bench/prepare_validate.py

clean:
	rm -rf $(DEMO) .pytest_cache

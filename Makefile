# The two commands a newcomer needs are `make run` and `make test` (README). Both create or reuse
# the virtualenv in $(VENV); pass VENV=/path/to/venv to reuse one you already have.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weak2full-installed
# Stages and tests import this checkout's src/, whatever checkout the shared virtualenv was installed from
# (relative on purpose: DVC experiments run in their own temporary copies).
export PYTHONPATH := src

.PHONY: install run test test-fast bench repro results push clean-outputs

# The stamp is a copy of the pyproject.toml the virtualenv was installed from: a fresh clone of the same
# dependencies reuses a shared virtualenv without running pip (a file's date would say every clone is
# newer), and changed dependencies install again. torch goes first and alone: pip takes the pinned build
# from this machine's disk.
install:
	@if ! cmp -s pyproject.toml $(STAMP); then \
	  set -e; \
	  test -x $(PY) || python3 -m venv $(VENV); \
	  echo "installing the dependencies into $(VENV)"; \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1; \
	  $(PY) -m pip install -q -e '.[test]'; \
	  cp pyproject.toml $(STAMP); \
	fi

# Make the checkout a git + DVC repo when it is not one (a tarball, say), then run the chain.
run: install
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || (git init -q && git add -A && git -c user.name=weak2full -c user.email=weak2full@localhost commit -qm "initial checkout")
	@test -d .dvc || $(VENV)/bin/dvc init -q
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro
	@$(PY) -m weak2full results

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# `make bench BENCH_ARGS=--quick`: the same figures on smaller sizes (bench/run_all.py).
bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run_all.py $(BENCH_ARGS)

results: install
	@$(PY) -m weak2full results

# `make push REMOTE=name`: send DVC-tracked outputs (models, datasets, pseudo-labels) to a remote.
push: install
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc push $(if $(REMOTE),-r $(REMOTE),)

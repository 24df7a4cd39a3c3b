# deps, demo and test are idempotent and install what they need (run as root on Debian 12);
# lock regenerates requirements.lock from the ranges in pyproject.toml.
SHELL := /bin/bash
PYTHON := .venv/bin/python

.PHONY: deps lock demo test lint bench

deps:
	@bash scripts/install-deps.sh

lock:  # make lock LOCK_ARGS=--upgrade takes up every new release inside the ranges
	@bash scripts/lock.sh $(LOCK_ARGS)

demo: deps
	$(PYTHON) -m roam.demo

test: deps
	$(PYTHON) -m ruff check roam tests bench
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check roam tests bench
	$(PYTHON) -m mypy

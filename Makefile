# Both targets are idempotent and install what they need (run as root on Debian 12).
SHELL := /bin/bash
PYTHON := .venv/bin/python

.PHONY: deps demo test lint bench

deps:
	@bash scripts/install-deps.sh

demo: deps
	$(PYTHON) -m roam.demo

test: deps
	$(PYTHON) -m ruff check roam tests bench
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check roam tests bench
	$(PYTHON) -m mypy

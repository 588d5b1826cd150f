# The two commands of the README. Each sets up what is missing (.venv, TeX), then runs.
.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@.venv/bin/python -m pytest -q tests

bench: setup
	@for b in bench/*.py; do echo "== $$b"; .venv/bin/python $$b; done

# The two commands the README promises: `make demo` and `make test`. Both set up first.
SHELL := /bin/bash
ENV := set -a && . .host/env && set +a

.PHONY: setup demo test lint workflows bench
setup:
	@bash scripts/setup.sh

demo: setup
	@$(ENV) && $$PYTHON scripts/demo.py

# Two pytest-xdist workers, a test file each at a time (module fixtures are built once), the
# longest files first (tests/conftest.py).
test: setup
	@$(ENV) && $$PYTHON -m ruff check . && $$PYTHON -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	@$(ENV) && $$PYTHON -m ruff check .

workflows: setup
	@$(ENV) && $$PYTHON scripts/make_workflows.py

bench: setup
	@$(ENV) && for b in benchmarks/bench_*.py; do echo "== $$b"; $$PYTHON $$b || exit 1; done

# The two commands a new machine needs; each first runs the (idempotent) set-up.
.PHONY: setup serve test lint typecheck

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/disagg serve $(TOPOLOGY)

test: setup
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .

typecheck: setup
	bash scripts/typecheck.sh

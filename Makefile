# The two commands a new machine needs; each first runs the (idempotent) set-up.
.PHONY: setup serve test lint bench-transfer

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/disagg serve $(TOPOLOGY)

test: setup
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .

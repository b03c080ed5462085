# The two quickstart commands, and the quick test loop. Each installs what it needs first (idempotent).
.PHONY: install demo test test-fast

install:
	@bash scripts/install.sh

demo: install
	avlabel demo

test: install
	python3 -m pytest -q --durations=15  # the slowest tests: the suite's time budget is 15 minutes

# the quick loop while working: everything but the tests marked slow (CI runs them all)
test-fast: install
	python3 -m pytest -q -m "not slow"

# The two quickstart commands, and the quick test loop. Each installs what it needs first (idempotent).
.PHONY: install demo test test-fast
# two pytest-xdist workers: much of the suite waits on one core (imports, subprocesses, servers) while the other is
# free; tests/conftest.py groups the tests so that nothing expensive is built twice. PARALLEL= runs in one process.
PARALLEL ?= -n 2 --dist loadgroup --no-loadscope-reorder

install:
	@bash scripts/install.sh

demo: install
	avlabel demo

test: install
	python3 -m pytest -q $(PARALLEL)

# the quick loop while working: everything but the tests marked slow (CI runs them all)
test-fast: install
	python3 -m pytest -q -m "not slow" $(PARALLEL)

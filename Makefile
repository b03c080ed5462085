# The two quickstart commands. Each installs what it needs first (idempotent).
.PHONY: install demo test

install:
	@bash scripts/install.sh

demo: install
	avlabel demo

test: install
	python3 -m pytest -q

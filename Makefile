# Thin wrappers around tasks.py, for those used to make.
PYTHON ?= python3

.PHONY: run test lint chaos
run:
	$(PYTHON) tasks.py run
test:
	$(PYTHON) tasks.py test
lint:
	$(PYTHON) tasks.py lint
chaos:
	$(PYTHON) tasks.py chaos

# Two-command set-up: `make demo` and `make test` each create .venv when missing and install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: demo test install lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) requirements.txt pyproject.toml
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m projects.demo.run --config=configs/demo.py --workdir=$(WORKDIR)

# Two workers: the suite is mostly single-threaded XLA compiles, so a 2-core machine runs two
# test files at once; --dist loadfile keeps each file's module fixtures in one worker.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests projects

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo bench ocr clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,demo,vision,bench,ocr]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m prunable demo --readme README.md

bench: $(STAMP)
	$(PY) bench/run_all.py

ocr: $(STAMP)
	$(PY) examples/ocr_capstone.py

clean:
	rm -rf $(VENV) build *.egg-info

# Every target creates .venv when missing; `make test` also installs the system packages tests use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8080
# Debian packages the tests and benchmarks run for real (binary name:package name).
SYSTEM_TOOLS := wrk:wrk chromium:chromium redis-server:redis-server

.PHONY: install serve test bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing system packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "missing system packages:$$missing (run: sudo apt-get install -y$$missing)" >&2; exit 1; \
		fi; \
	fi

serve: install
	$(BIN)/image-service serve --host $(HOST) --port $(PORT)

test: install system-deps
	$(BIN)/python -m pytest

bench: install system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

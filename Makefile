# Every target creates .venv when missing; `make test` also installs the system packages tests use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8080
# Debian packages the tests and benchmarks run for real (binary name:package name); the
# benchmarks also count instructions under valgrind.
SYSTEM_TOOLS := wrk:wrk chromium:chromium redis-server:redis-server
BENCH_TOOLS := valgrind:valgrind

# The official Tinybird CLI (`tb check`, its SQL template renderer) pins pydantic~=2.8, urllib3<2,
# click<8.2 and cryptography~=41, so it lives in a venv of its own; tests call .venv-tb/bin/*.
TB_VENV := .venv-tb
TB_STAMP := $(TB_VENV)/.installed-stamp
TINYBIRD_CLI := tinybird-cli==6.5.5

.PHONY: install serve test bench system-deps clean tinybird-cli

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

$(TB_STAMP):
	test -x $(TB_VENV)/bin/python || $(PYTHON) -m venv $(TB_VENV)
	$(TB_VENV)/bin/python -m pip install --quiet '$(TINYBIRD_CLI)'
	touch $(TB_STAMP)

tinybird-cli: $(TB_STAMP)

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS) $(EXTRA_TOOLS); do \
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

test: install system-deps $(TB_STAMP)
	$(BIN)/python -m mypy image_service
	$(BIN)/python -m pytest

bench: install
	$(MAKE) --no-print-directory system-deps EXTRA_TOOLS="$(BENCH_TOOLS)"
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(TB_VENV) build *.egg-info .pytest_cache

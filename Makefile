# Every target creates .venv when missing; `make test` also installs the system packages tests use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# `make serve HOST=0.0.0.0 PORT=9000 CONFIG=service.toml`: each passed on only when given on make's
# command line (zsh exports HOST as the machine's name), so the configuration and its
# IMAGE_SERVICE_SERVER__* variables decide otherwise.
SERVE_FLAGS = $(foreach flag,HOST PORT CONFIG,$(if $(filter command line,$(origin $(flag))),--$(shell echo $(flag) | tr A-Z a-z) $($(flag))))
# Debian packages the tests and benchmarks run for real (binary name:package name); the
# benchmarks also count instructions under valgrind.
SYSTEM_TOOLS := wrk:wrk chromium:chromium redis-server:redis-server
BENCH_TOOLS := valgrind:valgrind

# The official Tinybird CLI (`tb check`, its SQL template renderer) pins pydantic~=2.8, urllib3<2,
# click<8.2 and cryptography~=41, so it lives in a venv of its own; tests call .venv-tb/bin/*.
TB_VENV := .venv-tb
TINYBIRD_CLI := tinybird-cli==6.5.5
# Named after the pin: changing it reinstalls.
TB_STAMP := $(TB_VENV)/.installed-$(TINYBIRD_CLI)

.PHONY: install serve test bench system-deps clean tinybird-cli

# A venv at $(1) with a working pip; a half-built one (python3 -m venv failed midway, or the Python
# it linked to is gone) is made again. Debian's python3 needs python3-venv, installed here as root.
define ENSURE_VENV
$(1)/bin/python -m pip --version >/dev/null 2>&1 || { \
	rm -rf $(1); \
	$(PYTHON) -m venv $(1) 2>/dev/null || { \
		rm -rf $(1); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing python3-venv"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
			$(PYTHON) -m venv $(1); \
		else \
			echo "$(PYTHON) -m venv failed: on Debian, run: sudo apt-get install -y python3-venv" >&2; exit 1; \
		fi; }; }
endef

$(STAMP): pyproject.toml
	@$(call ENSURE_VENV,$(VENV))
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

$(TB_STAMP):
	@$(call ENSURE_VENV,$(TB_VENV))
	$(TB_VENV)/bin/python -m pip install --quiet '$(TINYBIRD_CLI)'
	rm -f $(TB_VENV)/.installed-*
	touch '$(TB_STAMP)'

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
	$(BIN)/image-service serve $(SERVE_FLAGS)

test: install system-deps $(TB_STAMP)
	$(BIN)/python -m mypy image_service
	$(BIN)/python -m pytest

bench: install
	$(MAKE) --no-print-directory system-deps EXTRA_TOOLS="$(BENCH_TOOLS)"
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(TB_VENV) build *.egg-info .pytest_cache

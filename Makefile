# tidemill: `make up` runs the whole system, `make test` runs the suite. Both install first.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: up test pytest lint fmt docs bench bench-quick install clean browser pgbouncer netns

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tidemill needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

up: $(STAMP)
	$(BIN)/tidemill up

test: lint docs pytest

# The docs site (MkDocs, Material theme) into build/site; the configuration and CLI reference
# pages are generated from the code first, so they cannot drift.
docs: $(STAMP)
	$(BIN)/python docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The browser test drives Debian's chromium through Playwright (never `playwright install`,
# which downloads a browser build): install the distribution package when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for tests/test_browser.py"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# The suite runs the system under test through a real PgBouncer in transaction pooling mode
# (tests/support/pgbouncer.py): Debian's package, installed like chromium above.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer || { \
		echo "installing Debian's pgbouncer for the suite's pooled DATABASE_URL"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq pgbouncer; }

# tests/test_many_hosts.py puts workers in network namespaces: `ip` from iproute2.
netns:
	@command -v ip >/dev/null 2>&1 || test -x /usr/sbin/ip || { \
		echo "installing Debian's iproute2 for tests/test_many_hosts.py"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq iproute2; }

pytest: $(STAMP) browser pgbouncer netns
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

BENCHES := queue_roundtrip durability webhooks logmask fanout cache lifecycle gdpr backup scheduler dashboard pgbouncer soak

# Each bench prints its figures; bench/record.py also writes them, with the machine and the
# date, to docs/benchmarks-results.md.
bench: $(STAMP)
	$(BIN)/python -m bench.record $(BENCHES)

bench-quick: $(STAMP)
	$(BIN)/python -m bench.record --quick $(BENCHES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build

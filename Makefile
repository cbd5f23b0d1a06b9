# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CWT_VENV := .venv-cwt
STAMP  := $(VENV)/.installed
CWT_STAMP := $(CWT_VENV)/.installed

.PHONY: run demo-files test lint unit fuzz bench bench-ratios clean venv broker postgres chromium \
	swtpm screenshots qemu-tools qemu-image \
	test-qemu test-qemu-user qemu-clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# python-cwt 3.3.0 requires cbor2 < 6 while the project needs cbor2 6.x, so the
# cwt interoperability checks run in their own environment (tests/interop).
$(CWT_STAMP):
	$(PYTHON) -m venv $(CWT_VENV)
	$(CWT_VENV)/bin/python -m pip install --quiet 'cwt==3.3.0' 'cbor2<6'
	touch $@

venv: $(STAMP) $(CWT_STAMP)

run: $(STAMP)
	$(PY) -m simulators.site_demo

# the same round trip with files carried by hand between licagent and licserver
demo-files: $(STAMP)
	$(PY) -m simulators.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check agent hw apps simulators tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The MQTT tests and benchmarks run a real mosquitto broker on a loopback port;
# install it on Debian when it is missing (as root, or with sudo if there is one).
broker:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update && $$SUDO apt-get install -y mosquitto; }

# The ledger tests also run on a real PostgreSQL server (initdb into a temporary folder,
# a loopback port); install Debian's postgresql package when its programs are missing.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update && $$SUDO apt-get install -y postgresql; }

# licadmin ui's browser tests (tests/admin/test_ui_browser.py) drive a real headless Chromium:
# Debian's chromium and chromium-driver, through Selenium; no driver is ever downloaded.
chromium:
	@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium chromium-driver; }

# PNGs of each licadmin ui screen into docs/ (shown in the README), taken by the browser tests
screenshots: $(STAMP) chromium
	SCREENSHOTS=$(CURDIR)/docs $(PY) -m pytest -q -p no:cacheprovider tests/admin/test_ui_browser.py

# The TPM key store tests (issue 16 item 6) run a real software TPM (swtpm) and reach it
# with tpm2-tools; install Debian's packages when their programs are missing.
swtpm:
	@{ command -v swtpm && command -v swtpm_setup && command -v tpm2_sign; } >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y swtpm swtpm-tools tpm2-tools; }

unit: $(STAMP) $(CWT_STAMP) broker postgres chromium swtpm
	$(PY) -m pytest -q -p no:cacheprovider

test: lint unit

# At least 1,000,000 generated inputs across every decoder: signed files and the store
# (tests/agent/test_fuzz.py), every decoder at once with a seeded mutator (test_fuzz_decoders:
# frames, RPC, MQTT, HTTP bodies, facts, settings, CSV), every CLI file argument and the
# licensing server's and the agent's HTTP bodies. Each test adds its count to .fuzz-count; the total and the
# time are printed at the end (README: Results). The same tests run small inside `make test`.
FUZZ_FILES := tests/agent/test_fuzz.py tests/agent/test_fuzz_decoders.py \
	tests/admin/test_fuzz_cli.py tests/simulators/test_fuzz_http.py tests/hw/test_fuzz_https.py
fuzz: $(STAMP)
	@rm -f .fuzz-count; start=$$(date +%s); \
	FUZZ_COUNT_FILE=$(CURDIR)/.fuzz-count FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} \
	  DECODER_FUZZ_EXAMPLES=$${DECODER_FUZZ_EXAMPLES:-38000} \
	  CLI_FUZZ_EXAMPLES=$${CLI_FUZZ_EXAMPLES:-1000} HTTP_FUZZ_EXAMPLES=$${HTTP_FUZZ_EXAMPLES:-5000} \
	  HTTPS_FUZZ_EXAMPLES=$${HTTPS_FUZZ_EXAMPLES:-1000} \
	  $(PY) -m pytest -q -p no:cacheprovider $(FUZZ_FILES) || exit 1; \
	awk -v t=$$(( $$(date +%s) - start )) \
	  '{n += $$1} END {printf "fuzz: %d generated inputs in %d s, no exception escaped\n", n, t}' \
	  .fuzz-count

bench: $(STAMP) broker postgres
	$(PY) tests/bench/run.py

# only the rows measured against a floor (issue 17), the growth table and the memory per
# server of a 10,000-server licsim fleet (on its own mosquitto): about two minutes
bench-ratios: $(STAMP) broker
	$(PY) tests/bench/run.py --ratios

# The emulated ARM automation server (issue 7): an arm64 Debian bookworm guest built from
# Debian's packages into $(LICQEMU_CACHE) (outside the repository; reused when present),
# booted under qemu-system-aarch64 by the qemu:// backend. Host tools come from apt.
QEMU_TOOLS := qemu-system-aarch64 qemu-aarch64 debootstrap cpio depmod mkfs.ext4 dpkg-deb
qemu-tools:
	@missing=; for t in $(QEMU_TOOLS); do command -v $$t >/dev/null || \
	  test -x /usr/sbin/$$t || test -x /sbin/$$t || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "installing host tools for:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
	    qemu-system-arm qemu-user debootstrap debian-archive-keyring cpio kmod e2fsprogs; fi

qemu-image: $(STAMP) qemu-tools
	$(PY) simulators/qemu/build_image.py

# the HAL contract suite, activation + reclaim with licadmin/licserver, and power cuts,
# against the agent in the guest (tests/qemu; `make test` reports them as skipped)
test-qemu: qemu-image swtpm
	LICQEMU_TESTS=1 $(PY) -m pytest -q -p no:cacheprovider tests/qemu

# the fast lane: the guest's arm64 CPython under qemu-aarch64 user-mode emulation
# (no kernel, no binfmt_misc) running the core tests
test-qemu-user: qemu-image
	$(PY) simulators/qemu/user_mode.py -- -q -p no:cacheprovider

# the guest image cache lives outside the repository; `make clean` leaves it alone
qemu-clean:
	rm -rf "$${LICQEMU_CACHE:-$$HOME/.cache/bms-licensing/qemu}"

clean:
	rm -rf $(VENV) $(CWT_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

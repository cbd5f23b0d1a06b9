# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CWT_VENV := .venv-cwt
STAMP  := $(VENV)/.installed
CWT_STAMP := $(CWT_VENV)/.installed

.PHONY: run demo-files test lint unit fuzz bench clean venv broker

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
	$(VENV)/bin/ruff check agent hw simulators tests admin
	$(VENV)/bin/mypy

# The MQTT tests and benchmarks run a real mosquitto broker on a loopback port;
# install it on Debian when it is missing (as root, or with sudo if there is one).
broker:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update && $$SUDO apt-get install -y mosquitto; }

unit: $(STAMP) $(CWT_STAMP) broker
	$(PY) -m pytest -q -p no:cacheprovider

test: lint unit

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-20000} $(PY) -m pytest -q -p no:cacheprovider tests/agent/test_fuzz.py

bench: $(STAMP) broker
	$(PY) tests/bench/run.py

clean:
	rm -rf $(VENV) $(CWT_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

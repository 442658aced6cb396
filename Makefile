# Lyra: two commands matter on a fresh machine, `make demo` and `make test`.
# Both run `make setup` first (idempotent: it only installs what is missing).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lyra-setup-done

.PHONY: setup test demo reproduce-nano clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	# CPU torch first: a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -e '.[dev,tts,web]'
	# openai-whisper's only other requirement is triton (GPU only): skip it.
	$(PIP) install -q --no-deps openai-whisper==20250625
	# A real 30 s two-speaker recording with a transcript, used by tests (never imported).
	$(PIP) install -q --no-deps pyannote.audio==4.0.7
	# Speech-instruction TTS (lyra/data/tts.py): the espeak-ng backend and sox come from Debian;
	# installed only when missing, and only as root (otherwise a note says how).
	@if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox; \
	  else \
	    echo "note: espeak-ng/sox missing; run 'sudo apt-get install espeak-ng sox' for the espeak-ng TTS backend and its tests"; \
	  fi; \
	fi
	# Web demo test (tests/test_web.py): Playwright drives Debian's chromium; same rule as above.
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "note: /usr/bin/chromium missing; run 'sudo apt-get install chromium' for tests/test_web.py"; \
	  fi; \
	fi
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) -m lyra.nano.demo

# The paper's ablations in miniature on the demo's nano model (trains it first if needed):
# writes docs/nano_results.md and outputs/nano/reproduce_nano.json.
reproduce-nano: setup
	$(PY) -m lyra.nano.reproduce

clean-venv:
	rm -rf $(VENV)

#!/usr/bin/env bash
# The test command: installs what the tests need (when missing), then runs the default suite.
#   bash tests/run.sh            # default suite (slow tests skipped)
#   bash tests/run.sh -m slow    # only the slow ones
set -euo pipefail
cd "$(dirname "$0")/.."
# openai: a test client; triton: kernels in the interpreter; pyarrow: the downloads' parquet files;
# transformers, tokenizers: the references for open models
python3 -c "import torch, numpy, tiktoken, regex, requests, sympy, safetensors, pytest, openai, triton, pyarrow, \
transformers, tokenizers" 2>/dev/null \
  || python3 -m pip install -q -r requirements.txt pytest openai triton transformers tokenizers
# the chat page's browser test drives headless Chromium through chromedriver (Debian's packages)
if ! command -v chromedriver >/dev/null || ! { command -v chromium || command -v chromium-browser; } >/dev/null; then
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null; }; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium chromium-driver
  else
    echo "cannot apt-get install chromium chromium-driver here: without them the browser test is skipped"
  fi
fi
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec python3 -m pytest -q --durations=10 "$@"  # the slowest tests: the suite must stay within ~8 minutes

#!/usr/bin/env bash
# The test command: installs what the tests need (when missing), then runs the default suite.
#   bash tests/run.sh            # default suite (slow tests skipped)
#   bash tests/run.sh -m slow    # only the slow ones
set -euo pipefail
cd "$(dirname "$0")/.."
# openai: a test client; triton: kernels in the interpreter; transformers, tokenizers: references for open models
python3 -c "import torch, numpy, tiktoken, regex, requests, sympy, safetensors, pytest, openai, triton, transformers, \
tokenizers" 2>/dev/null || python3 -m pip install -q -r requirements.txt pytest openai triton transformers tokenizers
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec python3 -m pytest -q "$@"

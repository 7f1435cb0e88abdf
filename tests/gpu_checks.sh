#!/usr/bin/env bash
# picochat's checks for a machine with a CUDA GPU, in one go: the Triton kernels compiled for the GPU against float64
# references, the test suite with every stage script on the GPU (they pick CUDA when it is there), and the training
# step's throughput at the gpu preset's depth 20.
#
#   bash tests/gpu_checks.sh [LOGDIR] [PARTS]     # PARTS: any of kernels,suite,bench,bench_kernels (default all)
#
# Each part runs under a time limit, writes LOGDIR/<part>.log and prints its tail; the exit status is 1 if any part
# failed. CI has no GPU: this is for a person (or session) who has one for a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${1:-/tmp/picochat-gpu}"
PARTS="${2:-kernels,suite,bench,bench_kernels}"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
status=0

part() {  # group (as PARTS names it), log name, seconds, command...
  local group=$1 name=$2 limit=$3
  shift 3
  [[ ",$PARTS," == *",$group,"* || ",$PARTS," == *",$name,"* ]] || return 0
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n "${TAIL:-6}" "$LOG/$name.log" | cut -c1-600
  [ $rc -eq 0 ] || { status=1; touch "$LOG/.failed"; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

part kernels kernels 240 python3 tests/check_gpu.py
# the suite with the GPU visible (the default suite hides it: tests/conftest.py); the two longest tests (whole pipelines) in a process of their own beside the rest, so that both finish in time;
# -v names every test as it ends: a part stopped at its limit still says which tests failed
# and a per-test limit well inside the part's, so that a hung test (an H200 run had one) still leaves the summary
SUITE=(env PICOCHAT_TEST_GPU=1 python3 -m pytest -v -rfE --tb=short -p no:cacheprovider -W ignore)
TAIL=3 part suite suite_long 360 "${SUITE[@]}" --timeout=300 -n 2 tests/test_pipeline.py tests/test_gpu_preset.py &
TAIL=3 part suite suite 360 "${SUITE[@]}" --timeout=120 -n 14 tests --ignore=tests/test_pipeline.py \
  --ignore=tests/test_gpu_preset.py
wait
[[ ",$PARTS," != *",suite,"* ]] || grep -h "FAILED\|ERROR" "$LOG"/suite*.log | sort -u | cut -c1-300
# the gpu preset's shape (depth 20, T 2048, 16 rows, vocab 65,536), one micro-batch per step: eager as the preset
# runs it, then compiled, then compiled with the Triton kernels
D20=(--device=cuda --depth=20 --head_dim=128 --max_seq_len=2048 --device_batch_size=16 --total_batch_size=32768
     --vocab_size=65536 --steps=3 --repeats=3)
TAIL=3 part bench bench_d20_eager 90 python3 tests/bench_pretrain.py "${D20[@]}" --compile=0
TAIL=3 part bench bench_d20_compiled 150 python3 tests/bench_pretrain.py "${D20[@]}" --compile=1
TAIL=3 part bench bench_d20_kernels 150 python3 tests/bench_pretrain.py "${D20[@]}" --compile=1 --kernels=1
TAIL=20 part bench_kernels bench_kernels 120 python3 tests/bench_kernels.py
[ ! -e "$LOG/.failed" ] || status=1  # a part run in the background sets it there
rm -f "$LOG/.failed"
exit $status

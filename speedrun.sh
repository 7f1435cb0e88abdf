#!/usr/bin/env bash
# The whole picochat pipeline in one command: tokenizer -> pretrain -> sft -> rl -> evaluate -> a sample chat.
#
#   bash speedrun.sh                      # CPU: the built-in data and a tiny model, about 15 minutes on 2 cores
#   PRESET=gpu bash speedrun.sh           # (the default when GPUs are present) real data, depth 20, all GPUs;
#                                         # downloads from $HF_ENDPOINT (default https://huggingface.co)
#   PRESET=smoke bash speedrun.sh         # tiny sizes, a couple of minutes: checks that every stage runs
#   DEPTH=6 bash speedrun.sh              # a knob of the cpu preset: a bigger model
#
# Everything goes to $PICOCHAT_DIR (default ~/.cache/picochat). Interrupted and run again, it resumes: a finished
# stage (its report/<stage>.seconds exists) is not redone, pretraining continues from its last checkpoint, and no
# half-written file is ever trusted (every write is temp + rename). The last line printed is a JSON summary.
set -euo pipefail
cd "$(dirname "$0")"
export PICOCHAT_DIR="${PICOCHAT_DIR:-$HOME/.cache/picochat}"
export PYTHONUNBUFFERED=1
mkdir -p "$PICOCHAT_DIR/report"
echo "picochat: artifacts in $PICOCHAT_DIR"

# ---- environment: install only what is missing, and count the GPUs (in one python start: torch takes seconds)
COUNT_GPUS="import torch, numpy, tiktoken, regex, requests, sympy; print(torch.cuda.device_count())"
NGPU=$(python3 -c "$COUNT_GPUS" 2>/dev/null) \
  || { python3 -m pip install -q -r requirements.txt; NGPU=$(python3 -c "$COUNT_GPUS"); }
PRESET="${PRESET:-$([ "$NGPU" -gt 0 ] && echo gpu || echo cpu)}"
echo "preset: $PRESET ($NGPU GPUs)"

# ---- presets: the knobs of each stage
case "$PRESET" in
  cpu)
    # sized for <= 15 minutes on 2 AVX2 cores in float32 (bf16 is emulated there, ~70x slower; fp32 gives the same
    # figures on every CPU): measured times are in README.md. What the stages are for:
    # - rl needs an sft model that already solves some problems (all-zero reward groups teach nothing): 150 sft
    #   steps gave pass@1 0.10 and rl gained nothing; 300 steps 0.42, and 20 rl steps took it to 0.64.
    # - sft: from one base model, lr_scale 0.5 beat 0.2 and 1.0 at 250 steps. Compute is what generalisation buys
    #   here (README.md's size sweep): 700 sft steps against 350 raised every held-out slice, while a deeper model,
    #   fewer pretraining steps or smaller batches at the same cost did not. 500 took the whole script to 14.6 min
    #   in a slow hour, so 450.
    #   rl at 15-45 steps lowered the held-out slices a little (README.md), so it gets no more of the budget
    # - sft mixes 10% pretraining text into its tokens (--text_mix) so the text model survives it, and rl adds the
    #   SFT loss on SFT chats to every step (--ptx_coef) so that math rewards do not turn every reply into math.
    DEPTH="${DEPTH:-4}"
    DTYPE="${DTYPE:-float32}"
    DATA=(python3 data/tinyworld.py)
    TOK=(--vocab_size=4096 --max_chars=20000000)
    PRE=(--depth="$DEPTH" --aspect_ratio=32 --head_dim=64 --max_seq_len=256 --device_batch_size=32
         --total_batch_size=8192 --num_iterations=250 --eval_every=125 --eval_tokens=16384 --save_every=50 --compile=1
         --dtype="$DTYPE")
    SFT=(--max_seq_len=256 --device_batch_size=32 --total_batch_size=8192 --num_iterations=450 --lr_scale=0.5
         --text_mix=0.1 --eval_every=125 --eval_rows=32 --compile=1 --dtype="$DTYPE")
    RL=(--num_steps=15 --eval_every=0 --ptx_coef=1 --ptx_rows=16 --dtype="$DTYPE")  # evaluate.py measures sft and rl
    EVAL=(--task=bpb,mc,math,chat --eval_tokens=16384 --max_new_tokens=128 --max_problems=50 --dtype="$DTYPE")
    LAUNCH=(python3)
    ;;
  smoke)
    DEPTH=1
    DTYPE=float32
    DATA=(python3 data/tinyworld.py --pretrain_mb=0.3 --num_chat=400 --num_math_train=400 --num_math_test=40
          --num_mc_train=100 --num_mc_test=40 --num_probe_train=50 --num_probe_test=30)
    TOK=(--vocab_size=400 --max_chars=300000)
    PRE=(--depth=1 --aspect_ratio=32 --head_dim=16 --max_seq_len=128 --device_batch_size=2 --total_batch_size=256
         --num_iterations=20 --eval_every=10 --eval_tokens=512 --save_every=10 --dtype=float32)
    SFT=(--max_seq_len=128 --device_batch_size=2 --total_batch_size=256 --num_iterations=10 --eval_every=5
         --eval_rows=8 --text_mix=0.1 --dtype=float32)
    RL=(--num_steps=2 --eval_every=1 --prompts_per_step=2 --num_samples=4 --max_new_tokens=24 --eval_problems=8
        --ptx_coef=1 --ptx_rows=2 --dtype=float32)
    EVAL=(--task=bpb,mc,math,chat --max_problems=8 --max_new_tokens=32 --eval_tokens=2048 --dtype=float32)
    LAUNCH=(python3)
    ;;
  gpu)
    # The real recipe on one node. Its sizes are these variables, each one overridable from the environment:
    # tests/test_gpu_preset.py runs this very branch on CPU at toy sizes (2 gloo processes, a loopback hub).
    DEPTH="${DEPTH:-20}"
    CORPUS="${CORPUS:-climbmix}"              # or fineweb-edu
    SHARDS="${SHARDS:-240}"                   # training shards of the corpus; its last shard is the validation one
    VOCAB_SIZE="${VOCAB_SIZE:-65536}"
    SEQ_LEN="${SEQ_LEN:-2048}"
    # torch.compile for pretraining and sft. Measured on an H200 (tests/gpu_checks.sh), a depth-20 step of 16 rows of
    # 2048 tokens: compiled, MFU 0.63 at 41.6 GiB peak; eager, MFU 0.33 at 85 GiB (the fp32 logits of a 65,536-token
    # vocabulary and their softcap, which the compiled graph fuses). The compile takes about 45 s.
    COMPILE="${COMPILE:-1}"
    # rows per process per micro-step: compiled, 16 fit an 80 GB H100; eager (COMPILE=0) needs 8 there
    DEVICE_BATCH="${DEVICE_BATCH:-$([ "$COMPILE" = 1 ] && echo 16 || echo 8)}"  # pretraining
    SFT_DEVICE_BATCH="${SFT_DEVICE_BATCH:-$DEVICE_BATCH}"
    TOTAL_BATCH="${TOTAL_BATCH:-524288}"      # tokens per optimisation step, pretraining and sft
    DATA_RATIO="${DATA_RATIO:-20}"            # pretraining tokens per parameter (Chinchilla)
    EVAL_TOKENS="${EVAL_TOKENS:-10485760}"    # held-out tokens per bits-per-byte evaluation
    SFT_EPOCHS="${SFT_EPOCHS:-1}"
    RL_STEPS="${RL_STEPS:-300}"
    RL_PROMPTS="${RL_PROMPTS:-16}"            # GSM8K problems per rl step, 8 answers sampled for each
    NEW_TOKENS="${NEW_TOKENS:-256}"           # the longest answer generated, in rl and evaluation
    NPROC="${NPROC:-$NGPU}"                   # processes under torchrun (one per GPU)
    python3 -c "import pyarrow" 2>/dev/null || python3 -m pip install -q pyarrow  # reads the downloads
    DATA=(python3 data/corpus.py --corpus="$CORPUS" -n "$SHARDS")
    TOK=(--vocab_size="$VOCAB_SIZE" --max_chars=2000000000)
    PRE=(--depth="$DEPTH" --max_seq_len="$SEQ_LEN" --device_batch_size="$DEVICE_BATCH" --total_batch_size="$TOTAL_BATCH"
         --target_param_data_ratio="$DATA_RATIO" --eval_every=250 --eval_tokens="$EVAL_TOKENS" --save_every=1000
         --compile="$COMPILE")
    SFT=(--max_seq_len="$SEQ_LEN" --device_batch_size="$SFT_DEVICE_BATCH" --total_batch_size="$TOTAL_BATCH"
         --num_epochs="$SFT_EPOCHS" --eval_every=100 --compile="$COMPILE")
    RL=(--dataset=gsm8k --num_steps="$RL_STEPS" --prompts_per_step="$RL_PROMPTS" --max_new_tokens="$NEW_TOKENS"
        --eval_every=50)
    EVAL=(--task=bpb,mc,math --dataset=arc_easy,arc_challenge,mmlu,hellaswag,gsm8k,math500
          --eval_tokens="$EVAL_TOKENS" --max_new_tokens="$NEW_TOKENS")
    LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC")
    # the chat data and the benchmarks of the real recipe
    for name in smoltalk gsm8k math500 arc mmlu hellaswag; do python3 "data/$name.py"; done
    ;;
  *) echo "unknown PRESET=$PRESET (cpu, gpu or smoke)"; exit 1 ;;
esac

# ---- run a stage unless it finished before; a stage has finished once its wall time is recorded, which happens
# only after it exits successfully
stage() {
  local name="$1"; shift
  if [ -f "$PICOCHAT_DIR/report/$name.seconds" ]; then
    echo "== $name: done before, skipping (delete $PICOCHAT_DIR/report/$name.seconds to redo it)"
    return
  fi
  echo "== $name"
  local t0=$SECONDS
  "$@"
  echo "$((SECONDS - t0))" > "$PICOCHAT_DIR/report/.$name.seconds.tmp"
  mv "$PICOCHAT_DIR/report/.$name.seconds.tmp" "$PICOCHAT_DIR/report/$name.seconds"
}

"${DATA[@]}"  # idempotent: keeps a complete data set made with the same settings
stage tokenizer python3 tokenizer.py "${TOK[@]}"
stage base "${LAUNCH[@]}" pretrain.py "${PRE[@]}" --resume=1
stage sft "${LAUNCH[@]}" sft.py "${SFT[@]}"
stage rl "${LAUNCH[@]}" rl.py "${RL[@]}"
stage eval python3 evaluate.py --source=all "${EVAL[@]}"
# the model people meet (chat.py serves the rl model): asked who it is, and a sum in words it was not trained on
python3 chat.py --prompt="Hi! Could you tell me a bit about what you are?" --max_new_tokens=48 ${DTYPE:+--dtype=$DTYPE}
python3 chat.py --prompt="How much is 17 multiplied by 6, plus 29?" --max_new_tokens=48 ${DTYPE:+--dtype=$DTYPE}
python3 evaluate.py --report=1

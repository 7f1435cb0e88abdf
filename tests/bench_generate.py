"""
Generation speed of model.py against the machine's memory bandwidth: KV-cache decoding at batch 1 and 32, eager and
compiled (generate's compile=True: a torch.compile'd GPT.decode_step on a static cache), prefill, and decoding
without the cache as a check.

    python tests/bench_generate.py                          # the CPU pipeline's model (d4) and a d12, fp32 and bf16
    python tests/bench_generate.py --models=d12 --dtypes=float32 --new_tokens=32

Decoding one token at batch 1 reads every weight of the blocks and the head once, so it cannot beat
    limit tok/s = copy bandwidth / weight bytes
where the bandwidth is a large tensor copy measured in the same run (read + write bytes per second) and the weight
bytes are the matmul weights in the dtype they are stored in. bf16 is measured as chat.py and evaluate.py generate:
the weights converted to bf16, no autocast. Batch-1 decode is reported as a fraction of that limit (target >= 0.5),
eager and compiled side by side. "compile_s" is the first compiled generation's time (tracing, code generation and
the C++ compiler; inductor's on-disk cache, /tmp/torchinductor_$USER, makes a later process's much shorter), and
"break_even_tokens" the batch-1 tokens after which compiling has paid for itself: compile_s over the time a compiled
step saves.
"cache_speedup" is the time of a step without the cache (the whole context again) over one with it, at a few
context lengths: the cache must win from 64 tokens on. A model whose weights fit in the last-level cache (d4's
5 MB) is not bound by memory bandwidth at all but by the per-operation overhead of eager PyTorch, so its fraction
measures that overhead.
Models: "d4" is speedrun.sh's cpu preset (depth 4, aspect 32, head_dim 64, T 256), "d12" depth 12, aspect 64,
head_dim 64, T 512 (pretrain.py's defaults at depth 12); both with a 4096-token vocabulary, random weights.
Every figure is the best of `repeats` timings (the machine may be shared: the load average is printed with them;
--threads=1 suffers far less from a crowded machine than 2 threads, whose every small operation waits for both).
The last line is one JSON object.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from model import GPT, KVCache, config_from_depth, generate  # noqa: E402

# -----------------------------------------------------------------------------
# Settings

models = "d4,d12"
dtypes = "auto"         # "auto": float32, plus bfloat16 where the CPU has native bf16 (AMX / AVX512-BF16)
vocab_size = 4096
prompt_len = 64         # prompt tokens before decoding
new_tokens = 64         # decoded tokens per timing
big_batch = 32
contexts = "16,64,128"  # context lengths of the cached / uncached step comparison
repeats = 3
step_repeats = 20      # timings of one cached / uncached step (short: more of them)
threads = 2
copy_mb = 256           # size of the tensor copied to measure the memory bandwidth
for arg in sys.argv[1:]:
    key, value = arg.removeprefix("--").split("=")
    if key not in globals() or key.startswith("_"):
        raise SystemExit(f"error: unknown setting --{key}")
    globals()[key] = type(globals()[key])(value)

SHAPES = {"d4": dict(depth=4, aspect_ratio=32, head_dim=64, sequence_len=256),
          "d12": dict(depth=12, aspect_ratio=64, head_dim=64, sequence_len=512)}

# -----------------------------------------------------------------------------
# Measurements


def best_time(fn, times=0):
    fn()  # warm-up: allocations, oneDNN primitive caches
    best = float("inf")
    for _ in range(times or repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth():
    """Bytes per second of a large tensor copy (read + write), far larger than the caches."""
    src = torch.ones(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src))


def weight_bytes(model):
    """Bytes of the weights one decoding step reads: the matmuls of the blocks and the head (the embedding is a
    lookup of one row)."""
    matrices = [p for p in model.transformer.h.parameters() if p.dim() == 2] + [model.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in matrices)


def random_prompts(batch):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=g).tolist()


def compile_seconds(model):
    """Seconds of the first compiled generation in this process: a batch-1 prompt and two tokens (one step)."""
    t0 = time.perf_counter()
    list(generate(model, random_prompts(1), 2, temperature=0.0, compile=True))
    return time.perf_counter() - t0


def decode_rate(model, batch, compile=False):
    """Tokens/s of generate()'s decoding steps (the prefill excluded) for `batch` distinct prompts of prompt_len."""
    prompts = random_prompts(batch)

    def run():
        steps = generate(model, prompts, new_tokens, temperature=0.0, compile=compile)
        next(steps)  # the prefill and the first token
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        return n * batch / (time.perf_counter() - t0)
    run()
    return max(run() for _ in range(repeats))


@torch.inference_mode()
def prefill_rate(model):
    """Tokens/s of a batch-1 prefill of sequence_len tokens into an empty cache."""
    T = model.config.sequence_len
    idx = torch.randint(0, vocab_size, (1, T))

    return T / best_time(lambda: model(idx, kv_cache=KVCache(1, T, model.config, "cpu")))


@torch.inference_mode()
def step_times(model, length):
    """Seconds of one batch-1 decoding step at `length` tokens of context: with the cache (one token in), and
    without it (the whole context in, the last position's logits out)."""
    idx = torch.randint(0, vocab_size, (1, length + 1))
    cache = KVCache(1, length + step_repeats + 1, model.config, "cpu")
    model(idx[:, :length], kv_cache=cache)
    cached = best_time(lambda: model(idx[:, length:], kv_cache=cache)[:, -1], step_repeats)  # the cache grows by 1
    uncached = best_time(lambda: model(idx)[:, -1], step_repeats)
    return cached, uncached


def nocache_rate(model):
    """Tokens/s of batch-1 greedy decoding without a cache (the whole sequence again at every step)."""
    idx = torch.randint(0, vocab_size, (1, prompt_len))

    @torch.inference_mode()
    def run():
        seq = idx
        for _ in range(new_tokens):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return new_tokens / best_time(run)


# -----------------------------------------------------------------------------
# Run


if __name__ == "__main__":
    torch.set_num_threads(threads)
    native_bf16 = common.cpu_has_fast_bf16()
    if dtypes == "auto":
        dtypes = "float32,bfloat16" if native_bf16 else "float32"  # emulated bf16 is ~70x slower: skipped
    print(f"cpu {common.cpu_name()} | native bf16 {native_bf16} | torch {torch.__version__} | {threads} threads | "
          f"load average {os.getloadavg()[0]:.1f}")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write of {copy_mb} MiB)")
    result = {"cpu": common.cpu_name(), "native_bf16": native_bf16, "threads": threads,
              "loadavg_before": round(os.getloadavg()[0], 1), "copy_gb_s": round(bandwidth / 1e9, 2)}
    for name in models.split(","):
        torch.manual_seed(0)
        shape = dict(SHAPES[name])
        model = GPT(config_from_depth(shape.pop("depth"), vocab_size, shape.pop("sequence_len"), **shape))
        model.init_weights()
        model.eval()
        for dtype_name in dtypes.split(","):
            model.to(getattr(torch, dtype_name))  # after float32: bf16 weights, as chat.py generates
            limit = bandwidth / weight_bytes(model)
            r = {"weight_mb": round(weight_bytes(model) / 1e6, 1), "limit_tok_s": round(limit, 1),
                 "compile_s": round(compile_seconds(model), 1)}
            for batch in (1, big_batch):  # eager and compiled one after the other: the same machine load
                r[f"decode_b{batch}_tok_s"] = round(decode_rate(model, batch), 1)
                r[f"decode_b{batch}_compiled_tok_s"] = round(decode_rate(model, batch, compile=True), 1)
            r.update(prefill_tok_s=round(prefill_rate(model), 1), nocache_b1_tok_s=round(nocache_rate(model), 1))
            r["b1_fraction_of_limit"] = round(r["decode_b1_tok_s"] / limit, 3)
            r["b1_compiled_fraction_of_limit"] = round(r["decode_b1_compiled_tok_s"] / limit, 3)
            saved = 1 / r["decode_b1_tok_s"] - 1 / r["decode_b1_compiled_tok_s"]  # seconds per batch-1 token
            r["break_even_tokens"] = round(r["compile_s"] / saved) if saved > 0 else None
            r["cache_speedup"] = {}
            for length in map(int, contexts.split(",")):
                cached, uncached = step_times(model, length)
                r["cache_speedup"][length] = round(uncached / cached, 2)
            r["loadavg"] = round(os.getloadavg()[0], 1)
            print(f"{name} {dtype_name}: {json.dumps(r)}", flush=True)
            result[f"{name}_{dtype_name}"] = r
    result["loadavg_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))

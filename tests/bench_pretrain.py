"""
Training-step throughput of model.py against the machine's matmul peak (fp32 and bf16).

    python tests/bench_pretrain.py                      # depth 6, head_dim 64, T 512, batch 8, vocab 4096
    python tests/bench_pretrain.py --steps=10 --threads=2 --compile=1
    python tests/bench_pretrain.py --compile=1 --profile=1 --gemm_bound=1   # where the time goes, and the ceiling
    python tests/bench_pretrain.py --device=cuda --depth=20 --max_seq_len=2048 --device_batch_size=16 \
        --total_batch_size=32768 --vocab_size=65536 --compile=1 --kernels=1   # a GPU: bf16 only, against its peak

One step = forward + backward over total_batch_size / (device_batch_size * max_seq_len) micro-batches, then AdamW +
Muon, as pretrain.py runs it (its default total_batch_size 8192 = 2 micro-batches of 8 x 512; pass
--total_batch_size=4096 for the worst case of an optimiser step per micro-batch).
The last line is one JSON object: tok_s_bf16, tok_s_fp32, peak_gflops_*, mfu_* (flops/token x tok/s / peak).
Timings on a shared machine are noisy: every figure is the best of `repeats` timed windows; the median is printed.
On a GPU the peak is an 8192^3 matmul (fp32 as torch runs it by default, i.e. without TF32), timings synchronise
the device, and dtypes "auto" is bf16 alone (autocast, as pretrain.py trains there).
"""
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.profiler import record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import kernels as triton_kernels  # noqa: E402
from model import GPT, config_from_depth  # noqa: E402

# -----------------------------------------------------------------------------
# Settings

depth, head_dim, max_seq_len, device_batch_size, vocab_size = 6, 64, 512, 8, 4096
total_batch_size = 8192
steps = 1           # timed optimisation steps per window (after 1 warm-up step)
repeats = 3         # timed windows; best and median reported
threads = 2
compile = 0         # torch.compile the model (inductor, CPU C++ codegen)
dtypes = "auto"      # "auto": float32, plus bfloat16 where the CPU has native bf16 (AMX / AVX512-BF16); cuda: bf16
device = "cpu"       # or cuda
kernels = 0          # the Triton kernels of kernels/ (pretrain.py --kernels=1; CUDA only)
profile = 0          # 1: after the timings, where one step's time goes (torch.profiler), per phase and per kind of op
gemm_bound = 0       # 1: the MFU this shape allows at best: its matmuls timed alone, everything else free
for arg in sys.argv[1:]:
    key, value = arg.removeprefix("--").split("=")
    if key not in globals() or key.startswith("_"):
        raise SystemExit(f"error: unknown setting --{key}")
    globals()[key] = type(globals()[key])(value)

# -----------------------------------------------------------------------------
# Matmul peak: large square matmuls, the best a GEMM gets out of these cores


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, reps):
    """Best wall time of fn() over reps calls, after one warm-up call."""
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(dtype, n=2048, reps=3):
    if device == "cuda":
        n, reps = 8192, 10
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    if dtype == torch.bfloat16 and not common.cpu_has_fast_bf16():
        n = 512  # emulated bf16 (no AMX / AVX512-BF16) runs at a few GFLOP/s: a smaller size measures the same
        a, b = a[:n, :n].contiguous(), b[:n, :n].contiguous()
    return 2 * n ** 3 / best_seconds(lambda: a @ b, reps) / 1e9

# -----------------------------------------------------------------------------
# Training step


def train_throughput(dtype):
    torch.manual_seed(0)
    triton_kernels.enable(kernels)  # impl="auto" in the model then picks Triton on CUDA, as in pretrain.py
    model = GPT(config_from_depth(depth, vocab_size, max_seq_len, head_dim=head_dim, use_kernels=bool(kernels)))
    model = model.to(device)
    model.init_weights()
    adamw, muon = model.setup_optimizers()
    train_model = torch.compile(model, dynamic=False) if compile else model
    ctx = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    if total_batch_size % (device_batch_size * max_seq_len):
        raise SystemExit("error: total_batch_size must be a multiple of device_batch_size * max_seq_len")
    grad_accum = total_batch_size // (device_batch_size * max_seq_len)
    data = torch.randint(0, vocab_size, (grad_accum, device_batch_size, max_seq_len + 1), device=device)

    def step():
        for micro in data:
            with ctx, record_function("phase: forward"):
                loss = train_model(micro[:, :-1], micro[:, 1:]) / grad_accum
            with record_function("phase: backward"):
                loss.backward()
        with record_function("phase: adamw"):
            adamw.step()
        with record_function("phase: muon"):
            muon.step()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0  # includes compilation when compile=1
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(steps * total_batch_size / (time.perf_counter() - t0))
    if profile:
        print_profile(step, dtype)
    return max(rates), statistics.median(rates), first, model.estimate_flops()


# a step's operators by kind: what a profile of it is read for (compiled steps show inductor's fused kernels as
# "Torch-Compiled Region" / "graph_..." entries, counted with the element-wise work)
OP_KINDS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int", "mkldnn"),
            "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention")}


def print_profile(step, dtype):
    """One step under torch.profiler: wall time per phase, and the self time of its operators by kind."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        sync()
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total for e in events if e.key.startswith("phase: ")}
    kinds = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    for e in events:
        if e.key.startswith("phase: "):
            continue
        kind = next((k for k, names in OP_KINDS.items() if any(n in e.key for n in names)), "other")
        kinds[kind] += e.self_cpu_time_total
    total = sum(kinds.values())
    print(f"profile {str(dtype)[6:]}: " + ", ".join(f"{k[7:]} {v / 1e3:.0f} ms" for k, v in phases.items()))
    print(f"profile {str(dtype)[6:]}: self time by kind: "
          + ", ".join(f"{k} {v / total:.0%}" for k, v in kinds.items()))
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        if not e.key.startswith("phase: "):
            print(f"    {e.key[:60]:<60} {e.self_cpu_time_total / total:6.1%}  x{e.count}")

# -----------------------------------------------------------------------------
# The matmul-only bound: a step's GEMMs (every Linear's forward and its two backward products, and attention's
# QK^T and AV over the full context with their backward products, as estimate_flops counts them), each timed
# alone at its own shape. Their summed time is the least a step can take if norms, softmax, the loss, the optimiser
# and every copy were free; the model's FLOPs over it, against the 2048^2 peak, is the MFU no fusion can beat.


def time_gemm(m, k, n, dtype, batch=1, reps=5):
    """Best seconds of a (batch, m, k) @ (batch, k, n) product."""
    a = torch.randn(batch, m, k, dtype=dtype, device=device)
    b = torch.randn(batch, k, n, dtype=dtype, device=device)
    return best_seconds(lambda: torch.bmm(a, b), reps)


def gemm_bound_mfu(dtype, peak_gflops):
    """(MFU bound, share of the GEMM time in attention's products) of one micro-batch of this shape."""
    model = GPT(config_from_depth(depth, vocab_size, max_seq_len, head_dim=head_dim))
    c, rows = model.config, device_batch_size * max_seq_len
    shapes = {}  # (batch, m, k, n) -> how many times a micro-batch runs it
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n_in, n_out = module.in_features, module.out_features
            for shape in ((1, rows, n_in, n_out), (1, rows, n_out, n_in), (1, n_in, rows, n_out)):  # fwd, dX, dW
                shapes[shape] = shapes.get(shape, 0) + 1
    heads, T = device_batch_size * c.n_head, max_seq_len
    # QK^T (T, D)(D, T) and AV (T, T)(T, D), and each one's two backward products: 2 of each kind per product
    attention = {(heads, T, c.head_dim, T): 3 * c.n_layer, (heads, T, T, c.head_dim): 3 * c.n_layer}
    seconds = {shape: count * time_gemm(*shape[1:], dtype, batch=shape[0]) for shape, count in
               {**shapes, **attention}.items()}
    total = sum(seconds.values())
    flops = model.estimate_flops() * rows
    return flops / total / (peak_gflops * 1e9), sum(seconds[s] for s in attention) / total

# -----------------------------------------------------------------------------
# Run


if __name__ == "__main__":
    torch.set_num_threads(threads)
    if device == "cuda":
        print(f"gpu {torch.cuda.get_device_name()} | torch {torch.__version__} | cuda "
              f"{torch.version.cuda} | compile {compile} | kernels {kernels}")
    print(f"cpu {common.cpu_name()} | native bf16 {common.cpu_has_fast_bf16()} | torch {torch.__version__} | "
          f"{threads} threads | cpu capability {torch.backends.cpu.get_cpu_capability()} | compile {compile} | "
          f"load average {os.getloadavg()[0]:.1f}")
    result, peaks = {"cpu": common.cpu_name(), "native_bf16": common.cpu_has_fast_bf16(),
                     "loadavg_before": round(os.getloadavg()[0], 1)}, {}
    if device == "cuda":
        result.update(gpu=torch.cuda.get_device_name(), compile=compile, kernels=kernels, depth=depth)
    for name in ("float32", "bfloat16"):
        peaks[name] = matmul_peak(getattr(torch, name))
        print(f"matmul peak {name}: {peaks[name]:.1f} GFLOP/s")
    tok_s = {}
    if dtypes == "auto":
        # without native bf16, oneDNN emulates bf16 GEMMs (~1-4 GFLOP/s on a 2-core AVX2 EPYC): one bf16 step
        # would take many minutes, so it is skipped (null in the JSON) unless asked for with --dtypes
        dtypes = "bfloat16" if device == "cuda" else "float32,bfloat16" if common.cpu_has_fast_bf16() else "float32"
        print(f"dtypes: {dtypes}")
    for name in ("float32", "bfloat16"):
        if name not in dtypes.split(","):
            tok_s[name] = None
            continue
        best, median, first, flops = train_throughput(getattr(torch, name))
        tok_s[name] = best
        print(f"train step {name}: best {best:.0f} tok/s, median {median:.0f} tok/s, first step {first:.1f} s, "
              f"{flops / 1e6:.1f} MFLOP/token -> {flops * best / 1e9:.1f} GFLOP/s")
        if device == "cuda":
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            print(f"peak GPU memory: {result['peak_memory_gib']} GiB")
        if gemm_bound:
            bound, attention_share = gemm_bound_mfu(getattr(torch, name), peaks[name])
            result[f"gemm_bound_mfu_{name}"] = round(bound, 4)
            print(f"gemm bound {name}: MFU <= {bound:.2f} if everything but the matmuls were free "
                  f"(attention's products {attention_share:.0%} of the matmul time)")
    flops = GPT(config_from_depth(depth, vocab_size, max_seq_len, head_dim=head_dim)).estimate_flops()
    names = {"bf16": "bfloat16", "fp32": "float32"}
    for short, name in names.items():
        result[f"tok_s_{short}"] = None if tok_s[name] is None else round(tok_s[name], 1)
    for short, name in names.items():
        result[f"peak_gflops_{short}"] = round(peaks[name], 1)
    for short, name in names.items():
        result[f"mfu_{short}"] = None if tok_s[name] is None else round(flops * tok_s[name] / (peaks[name] * 1e9), 4)
    result["loadavg_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))

"""
Per-rank peak memory and step time of each --zero level (common.parallelize), on 2 gloo ranks on the CPU.

    python tests/bench_zero.py                       # depth 6 (n_embd 384), vocab 16384, T 128, 2 x 2 micro-batches
    python tests/bench_zero.py --depth=8 --levels=0,3
    python tests/bench_zero.py --computed=1          # only the computed table: d20 and Qwen3-0.6B on 8 GPUs

Each level runs in its own torchrun launch of this file. Per rank:
- peak_mb: the process's peak resident memory (the kernel's high-water mark) over what it held before the model
  was built, every engine already imported. The ranks run with MALLOC_MMAP_THRESHOLD_=65536, so that every tensor
  but the smallest is its own mapping and is given back when freed: the peak is then that of live tensors (with
  the few MB of gloo's buffers), the CPU's counterpart of CUDA's max_memory_allocated. (torch.profiler's memory
  events miss the frees of gloo's threads: they overstated level 2.)
- weights_mb, state_mb: what it holds of the weights (a slice at level 3) and of the optimiser states;
- step_s: the median time of the timed steps (fp32, one thread per rank).
The last line is one JSON object: {"level_<z>": {"step_s": [per rank], "peak_mb": [...], ...}, "cpu": ...}.
Timings on a shared machine are noisy: compare the levels of one run, as ratios.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict  # noqa: F401  (imported before the baseline is taken: see rss_bytes)
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.optim  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from model import GPT, GPTConfig, config_from_depth, deal_matrices, is_dtensor  # noqa: E402

# -----------------------------------------------------------------------------
# Settings

depth, aspect_ratio, head_dim, vocab_size, max_seq_len = 6, 64, 64, 16384, 128
device_batch_size, grad_accum = 1, 2  # per rank: 2 ranks x 2 micro-batches of 1 x 128 tokens per step
warmup, steps = 1, 3
levels = "0,1,2,3"
level = -1          # set by the launcher for the ranks
computed = 0        # 1: print only the computed per-rank bytes of d20 and Qwen3-0.6B on `gpus` ranks
gpus = 8
for arg in sys.argv[1:]:
    key, value = arg.removeprefix("--").split("=")
    if key not in globals() or key.startswith("_"):
        raise SystemExit(f"error: unknown setting --{key}")
    globals()[key] = type(globals()[key])(value)

MB = 2 ** 20

# -----------------------------------------------------------------------------
# One rank: a level's training steps, timed


def local_bytes(tensors):
    return sum((t.to_local() if is_dtensor(t) else t).nbytes for t in tensors)


def rss_bytes():
    """Resident memory now. The engines are imported at the top, before it is first read: the levels that use
    them would otherwise count their code (tens of MB) as training memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rank_main():
    _, rank, _, world_size, _ = common.setup_device("cpu")
    rss_start = rss_bytes()
    torch.manual_seed(0)
    model = GPT(config_from_depth(depth, vocab_size, max_seq_len, aspect_ratio=aspect_ratio, head_dim=head_dim))
    model.init_weights()
    optimizers = common.parallelize(model, level)
    data = torch.Generator().manual_seed(rank)

    def train_step():
        for _ in range(grad_accum):
            x = torch.randint(0, vocab_size, (device_batch_size, max_seq_len + 1), generator=data)  # (B, T+1)
            (model(x[:, :-1], x[:, 1:]) / grad_accum).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        train_step()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    mine = {"step_s": statistics.median(times),
            "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start) / MB,
            "weights_mb": local_bytes(model.parameters()) / MB,
            "state_mb": common.optimizer_state_bytes(optimizers) / MB}
    ranks = [None] * world_size
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        print("RESULT " + json.dumps({name: [r[name] for r in ranks] for name in mine}), flush=True)
    common.teardown()


# -----------------------------------------------------------------------------
# Computed: what the fullest rank holds at each level, from the parameters' shapes and the rules of model.py's
# Optimisers: weights and gradients fp32 (bf16 autocast computes from fp32 weights), AdamW two fp32 moments, Muon
# one fp32 momentum per whole matrix it owns (deal_matrices, at every level), ZeRO's partition of AdamW's tensors
# (torch's: per param group, the largest first, onto the least loaded rank), FSDP2's dim-0 slices (ceil(rows / N)).

COMPUTED_MODELS = {
    "d20": config_from_depth(20, 32768, 2048, head_dim=64),  # pretrain.py --depth=20, tokenizer.py's vocabulary
    # as config_from_hf reads Qwen3-0.6B's config.json: the head tied to the embedding
    "Qwen3-0.6B": GPTConfig(sequence_len=4096, vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024,
                            head_dim=128, mlp="swiglu", mlp_hidden=3072, norm_weight=True, norm_eps=1e-6,
                            rope_theta=1e6, softcap=0.0, embed_norm=False, tie_embeddings=True),
}


def zero_partition(groups, world_size):
    """torch's ZeroRedundancyOptimizer partition: per param group, the largest tensor first, onto the least loaded
    rank. Returns the elements each rank holds."""
    load = [0] * world_size
    for group in groups:
        for numel in sorted(group, reverse=True):
            load[load.index(min(load))] += numel
    return load


def computed_bytes(config, world_size):
    """{level: (weights, grads, optimiser states) bytes on the fullest rank}, and the number of parameters."""
    with torch.device("meta"):
        model = GPT(config)
        adamw, muon = model.setup_optimizers()  # which tensors each optimiser steps
    adam = [group["params"] for group in adamw.param_groups]
    matrices = [p for group in muon.param_groups for p in group["params"]]
    _, owner = deal_matrices(matrices, world_size)
    muon = [sum(p.numel() for p in matrices if owner[p] == r) for r in range(world_size)]
    zero = zero_partition([[p.numel() for p in group] for group in adam], world_size)
    sliced = sum(-(-p.shape[0] // world_size) * p[0].numel() for p in model.parameters())  # FSDP2, per rank
    sliced_adam = sum(-(-p.shape[0] // world_size) * p[0].numel() for group in adam for p in group)
    total, total_adam = model.num_params(), sum(p.numel() for group in adam for p in group)
    per_rank = {  # rank -> (weights, grads, AdamW + Muon states) in elements x bytes
        0: [(4 * total, 4 * total, 8 * total_adam + 4 * muon[r]) for r in range(world_size)],
        1: [(4 * total, 4 * total, 8 * zero[r] + 4 * muon[r]) for r in range(world_size)],
        2: [(4 * total, 4 * (zero[r] + muon[r]), 8 * zero[r] + 4 * muon[r]) for r in range(world_size)],
        3: [(4 * sliced, 4 * sliced, 8 * sliced_adam + 4 * muon[r]) for r in range(world_size)],
    }
    # level 3's whole units, besides: the root's (the head, tied or not) from forward to backward, one other at a time
    root = model.lm_head.weight.numel()
    unit = max([sum(p.numel() for p in block.parameters()) for block in model.transformer.h]
               + ([] if config.tie_embeddings else [model.transformer.wte.weight.numel()]))
    return {z: max(ranks, key=sum) for z, ranks in per_rank.items()}, total, root, unit


def computed_table(world_size):
    lines = []
    for name, config in COMPUTED_MODELS.items():
        levels, total, root, unit = computed_bytes(config, world_size)
        lines += [f"{name}: {total / 1e6:.0f}M parameters, {world_size} ranks; the fullest rank, in bytes per parameter "
                  f"of the model (GB):", "",
                  "| --zero | weights | gradients | optimiser states | total | vs level 0 |", "|---|---|---|---|---|---|"]
        for z, parts in levels.items():
            cells = [f"{b / total:.2f} ({b / 1e9:.2f})" for b in (*parts, sum(parts))]
            lines.append(f"| {z} | " + " | ".join(cells) + f" | {sum(parts) / sum(levels[0]):.2f} |")
        lines += ["", f"Not counted: activations (every level); at level 3, the whole weights and gradients of the "
                  f"root's head from the start of forward to the end of backward ({8 * root / 1e9:.2f} GB) and of "
                  f"one other unit at a time (at most {8 * unit / 1e9:.2f} GB).", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The launcher: one torchrun per level, then the table and the JSON line


def main():
    print(computed_table(gpus))
    if computed:
        return
    settings = [f"--{k}={globals()[k]}" for k in ("depth", "aspect_ratio", "head_dim", "vocab_size", "max_seq_len",
                                                   "device_batch_size", "grad_accum", "warmup", "steps")]
    model = GPT(config_from_depth(depth, vocab_size, max_seq_len, aspect_ratio=aspect_ratio, head_dim=head_dim))
    print(f"model: depth {depth}, n_embd {model.config.n_embd}, vocab {vocab_size}: {model.num_params() / 1e6:.1f}M "
          f"parameters; 2 ranks x {grad_accum} micro-batches of {device_batch_size} x {max_seq_len} tokens per step")
    cpu = common.environment()[0].removeprefix("- CPU: ")
    results = {}
    for z in [int(z) for z in levels.split(",")]:
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            os.path.abspath(__file__), f"--level={z}"] + settings,
                           capture_output=True, text=True, env=env, timeout=1800)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            raise SystemExit(f"error: level {z} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        results[f"level_{z}"] = json.loads(line[len("RESULT "):])
    base = results.get("level_0")
    print("per rank, the larger of the 2 ranks:")
    print(f"{'level':>5} | {'step s':>7} | {'x level 0':>9} | {'peak MB':>8} | {'weights MB':>10} | {'state MB':>9}")
    for name, r in results.items():
        ratio = f"{max(r['step_s']) / max(base['step_s']):.2f}" if base else "-"
        print(f"{name[-1]:>5} | {max(r['step_s']):7.3f} | {ratio:>9} | {max(r['peak_mb']):8.1f} | "
              f"{max(r['weights_mb']):10.1f} | {max(r['state_mb']):9.1f}")
    print(json.dumps({**results, "cpu": cpu, "threads_per_rank": 1}))


if __name__ == "__main__":
    rank_main() if level >= 0 else main()

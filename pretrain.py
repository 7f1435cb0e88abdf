"""
Pretrain the base model: next-token prediction on plain documents.

    python pretrain.py                                   # CPU: a tiny model on the built-in data
    python pretrain.py --depth=12 --num_iterations=2000  # bigger, for longer
    python pretrain.py --data=corpus.txt                 # your own text (.txt, .jsonl "text", .parquet, or a folder)
    torchrun --nproc_per_node=8 pretrain.py --depth=20 --device_batch_size=32 --max_seq_len=2048 \
        --total_batch_size=524288                        # one 8-GPU node, the real recipe
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 pretrain.py ...   # several nodes
    torchrun --nproc_per_node=8 pretrain.py --zero=2     # shard optimiser states and gradients (3: weights too)
    python pretrain.py --resume=1                        # continue the latest checkpoint exactly

Reads the tokenizer and pretraining data from $PICOCHAT_DIR (default ~/.cache/picochat) and writes checkpoints to
$PICOCHAT_DIR/checkpoints/base/d<depth>/.
"""

import json
import os
import time
from dataclasses import asdict

import torch

import common
import kernels as triton_kernels  # the package; the setting `kernels` below switches it on
from common import print0
from data import pretrain_files
from data.loader import TokenRows, evaluate_bpb
from model import GPT, config_from_depth, generate
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
# model
depth = 4                   # the one knob: width = depth * aspect_ratio
aspect_ratio = 64
head_dim = 64
n_kv_head = 0               # 0: as many kv heads as query heads (no GQA)
max_seq_len = 512
# data
data = ""                   # a file or folder of documents; default: downloaded FineWeb-Edu, else the built-in data
# horizon: exactly one of these decides the number of steps (in this order of precedence)
num_iterations = -1         # explicit number of optimisation steps
target_param_data_ratio = 20.0  # tokens = ratio * parameters (Chinchilla), when num_iterations is -1
# batch
device_batch_size = 8       # rows per forward/backward per process
total_batch_size = 8192     # tokens per optimisation step, over all processes and accumulation steps
# optimisation
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
weight_decay = 0.0
warmup_ratio = 0.0
warmdown_ratio = 0.2
final_lr_frac = 0.0
# evaluation, checkpoints, logging
eval_every = 100            # val bits per byte and a few samples every this many steps (and at the end)
eval_tokens = 65536         # tokens of validation data per evaluation
save_every = 0              # checkpoint every this many steps (0: only at the end)
resume = False              # continue from the latest checkpoint of this model_tag
model_tag = ""              # checkpoint folder name; default d<depth>
# system
device = ""                 # cuda|mps|cpu, default: the best available
dtype = ""                  # bfloat16 (autocast) | float32 | "": bfloat16 on CUDA and AMX CPUs, else float32
compile = False             # torch.compile the model
zero = 0                    # data parallelism: 0 replicated, 1 optimiser states sharded, 2 + gradients, 3 + weights
kernels = False             # use the Triton kernels of kernels/ (CUDA only; a no-op elsewhere)
peak_flops = 0.0            # for MFU; 0: look it up (GPU) or measure it (CPU)
seed = 42

# -----------------------------------------------------------------------------
# Helpers the loop uses


def lr_multiplier(step, num_steps):
    """Warmup, constant, then a linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Muon momentum warms up from 0.85 to 0.95 over the first 300 steps (as nanochat)."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def measure_peak_flops(device, dtype_name):
    """Peak matmul FLOP/s: a table for known GPUs, a quick measurement otherwise (for MFU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12)):
            if key in name:
                return flops if dtype_name == "bfloat16" else flops / 2
    dt = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    n = 1024  # smaller matmuls under-use the cores and understate the peak (MFU came out above 100% with 512)
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = common.configure(globals())
    common.check_settings(config, positive=("embedding_lr", "unembedding_lr", "matrix_lr", "target_param_data_ratio"),
                          non_negative=("weight_decay",), fraction=("warmup_ratio", "warmdown_ratio", "final_lr_frac"))
    # the same seed on every rank: the same initial weights; ranks differ by the data they read
    rank, world_size, device, dtype, autocast_ctx = common.start_stage(device, dtype, seed)
    model_tag = model_tag or f"d{depth}"
    ckpt_dir = common.checkpoint_dir("base", model_tag)

    # ---- tokenizer and data
    try:
        tokenizer = load_tokenizer()
        train_files, val_files = pretrain_files("train", data), pretrain_files("val", data)
    except (FileNotFoundError, ValueError) as e:  # no tokenizer yet, a wrong --data path: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    print0(f"data: {len(train_files)} train and {len(val_files)} val files, from {os.path.dirname(train_files[0])}")
    token_bytes = torch.tensor(tokenizer.token_bytes, dtype=torch.long, device=device)

    # ---- model
    try:
        model_config = config_from_depth(depth, tokenizer.vocab_size, max_seq_len, aspect_ratio=aspect_ratio,
                                         head_dim=head_dim, n_kv_head=n_kv_head, use_kernels=kernels)
    except ValueError as e:  # a bad depth/head setting: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    common.check_model_fits(model_config, device)
    triton_kernels.enable(kernels)  # impl="auto" inside the model then picks Triton on CUDA
    model = GPT(model_config).to(device)
    model.init_weights()
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"model: {json.dumps(asdict(model_config))}")
    print0(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:.3e}")

    # ---- batch geometry and horizon
    grad_accum_steps = common.grad_accum_steps(total_batch_size, device_batch_size, max_seq_len, world_size)
    if num_iterations > 0:
        num_steps = num_iterations
    else:
        num_steps = max(1, round(target_param_data_ratio * num_params / total_batch_size))
    print0(f"{num_steps} steps of {total_batch_size:,} tokens ({grad_accum_steps} accumulation steps), "
           f"{num_steps * total_batch_size:,} tokens, {num_steps * total_batch_size / num_params:.1f} tokens/param")

    # ---- data parallelism and optimisers (learning rates scale with width inside setup_optimizers)
    optimizers = common.parallelize(model, zero, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                    matrix_lr=matrix_lr, weight_decay=weight_decay)
    adamw, muon = optimizers
    train_model = torch.compile(model, dynamic=False) if compile else model
    my_slots = range(rank * grad_accum_steps, (rank + 1) * grad_accum_steps)
    train_rows = TokenRows(tokenizer, train_files, device_batch_size, max_seq_len, my_slots,
                           grad_accum_steps * world_size)

    # ---- resume; history: (step, value) pairs for the report's charts
    # (on any number of ranks: the data position is kept per micro-batch slot, which the ranks share out)
    step, history, rank_states = common.resume_stage(resume, ckpt_dir, model, optimizers, rank, device, {
        "model_config": json.loads(json.dumps(asdict(model_config))), "total_batch_size": total_batch_size},
        history={"loss": [], "val_bpb": []})
    if rank_states is not None:
        try:
            train_rows.load_state([state["loader"] for state in rank_states])
        except ValueError as e:
            raise SystemExit(f"error: cannot resume from {ckpt_dir}: {e}") from None

    def val_batches():
        rows = TokenRows(tokenizer, val_files, device_batch_size, max_seq_len, [rank], world_size, loop=False)
        for _ in range(max(1, eval_tokens // (device_batch_size * max_seq_len * world_size))):
            batch = rows.next_batch(rank, device)
            if batch is None:
                break
            yield batch

    def save(step, metrics):
        common.save_stage(ckpt_dir, step, model, optimizers, rank, {
            "config": config, "metrics": metrics, "history": history, "tokenizer_hash": tokenizer.hash,
            "total_batch_size": total_batch_size}, rank_state={"loader": train_rows.state()})

    # ---- the training loop
    peak = peak_flops or measure_peak_flops(device, dtype)
    sample_prompts = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in ("Once upon a time", "The answer is")]
    val_bpb, t_start, train_time = None, time.time(), 0.0
    metrics = {}
    while True:
        last = step == num_steps
        if eval_every > 0 and (step % eval_every == 0 or last):
            model.eval()
            with common.unsharded(model):  # ranks may read different numbers of val batches; rank 0 alone samples
                val_bpb = evaluate_bpb(model, val_batches(), token_bytes, autocast_ctx)
                history["val_bpb"].append((step, val_bpb))
                print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
                if rank == 0:  # a look at what it writes: greedy continuations of the sample prompts
                    with autocast_ctx:
                        steps = list(generate(model, sample_prompts, 24, temperature=0.0,
                                              stop_tokens=(tokenizer.bos_id,)))
                    for i, prompt in enumerate(sample_prompts):
                        continuation = [entries[i][0] for entries in steps if entries[i] is not None]
                        print0(f"  sample: {tokenizer.decode(prompt[1:] + continuation)!r}")
            model.train()
        if last:
            break

        # one optimisation step: gradient accumulation over micro-batches
        t0 = time.time()
        lrm = lr_multiplier(step, num_steps)
        common.set_lr(optimizers, lrm)
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        loss_sum = torch.zeros((), device=device)  # on the device: all_sum below is the step's one host read
        for slot in my_slots:
            x, y = train_rows.next_batch(slot, device)
            with autocast_ctx:
                loss = train_model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
        # a diverged step stops the run before its update: the gradients here are this rank's own, and the sums
        # over ranks are inf or nan when any rank's is
        totals = common.all_sum({"loss": loss_sum / grad_accum_steps, "gradient": common.largest_grad(model)}, device)
        common.check_finite(step + 1, totals, "--matrix_lr, --embedding_lr, --unembedding_lr")
        for opt in optimizers:
            opt.step()  # the optimisers average gradients over ranks themselves (see model.py)
        model.zero_grad(set_to_none=True)
        step += 1
        loss_value = totals["loss"] / world_size
        dt = time.time() - t0
        if step > 1:  # the first step pays for warm-up (and compilation)
            train_time += dt
        history["loss"].append((step, loss_value))
        tok_s = total_batch_size / dt
        mfu = flops_per_token * tok_s / (peak * world_size)
        eta = (num_steps - step) * (train_time / max(1, step - 1) if step > 1 else dt)
        print0(f"step {step:05d}/{num_steps:05d} | loss {loss_value:.6f} | lr x{lrm:.3f} | "
               f"tok/s {tok_s:,.0f} | mfu {100 * mfu:.1f}% | eta {eta / 60:.1f} min")
        metrics = {"loss": loss_value, "val_bpb": val_bpb, "tok_s": tok_s, "mfu": mfu}
        if save_every > 0 and step % save_every == 0 and step < num_steps:
            save(step, metrics)

    # ---- the end: final checkpoint and report section
    metrics.update(val_bpb=val_bpb, train_minutes=train_time / 60, wall_minutes=(time.time() - t_start) / 60,
                   num_params=num_params, tokens=num_steps * total_batch_size)
    save(step, metrics)
    common.finish_stage("base", {"stage": "pretrain", "config": config, "metrics": metrics, "history": history,
                                 "checkpoint": ckpt_dir}, rank)

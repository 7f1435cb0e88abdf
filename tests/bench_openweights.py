"""
CPU cost of an open model of Qwen3-0.6B's shape (randomly initialised): generation and SFT time per token, and the
peak memory of an SFT step and of loading the weights.

    python tests/bench_openweights.py                       # every mode, each in a fresh process
    python tests/bench_openweights.py --modes=fp32 --sft_steps=1 --gen_tokens=8

Modes: "fp32" (fp32 weights and compute), "bf16" (fp32 weights, bf16 autocast: how picochat's stages run on a CPU
with native bf16), "bf16_weights" (the weights themselves bf16, as GPT.from_pretrained(dtype=torch.bfloat16); AdamW
in bf16 too), "load" (writes a random bf16 model.safetensors of that shape, then times GPT.from_pretrained into
fp32). An SFT step is forward + backward + AdamW over every parameter on one row of seq_len tokens; generation
decodes gen_tokens after a gen_prompt-token prompt (batch 1, KV cache). Peak memory is the process's peak RSS.
The last line is one JSON object: {mode: {...}, "cpu": ...}.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, AdamW, config_from_hf, generate  # noqa: E402

# -----------------------------------------------------------------------------
# Settings

# Qwen3-0.6B(-Base)'s config.json (its shape; the weights here are random)
QWEN3_06B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
             "tie_word_embeddings": True, "hidden_act": "silu"}
modes = "fp32,bf16,bf16_weights,load"
seq_len = 512       # SFT row length (batch 1)
sft_steps = 2       # timed SFT steps, after one warm-up step; 0: generation only
gen_prompt = 128    # prompt tokens before generation
gen_tokens = 32     # decoded tokens timed
threads = 2
child = ""          # internal: the mode a child process measures


def configure():
    for arg in sys.argv[1:]:
        key, value = arg.removeprefix("--").split("=")
        if key not in globals() or key.startswith("_") or key.isupper():
            raise SystemExit(f"error: unknown setting --{key}")
        globals()[key] = type(globals()[key])(value)

# -----------------------------------------------------------------------------
# One mode, measured in its own process (peak RSS is per process)


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def random_model(dtype):
    """Qwen3-0.6B's shape, built on the meta device and allocated once (as from_pretrained), random weights."""
    with torch.device("meta"):
        model = GPT(config_from_hf(QWEN3_06B, sequence_len=seq_len)).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    with torch.no_grad():  # nanochat's zero output projections would make the blocks trivial: not a real model
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.transformer.wte.weight.normal_(0, 0.02)
    return model


def measure(mode):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if mode == "load":
        return measure_load()
    model = random_model(torch.bfloat16 if mode == "bf16_weights" else torch.float32)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else nullcontext()
    out = {"params": model.num_params(), "rss_model_gib": round(peak_rss_gib(), 2)}
    # ---- generation: prefill, then one token at a time from the KV cache
    model.eval()
    prompt = torch.randint(0, 151000, (gen_prompt,)).tolist()
    with ctx:
        t0 = time.perf_counter()
        steps = generate(model, [prompt], max_new_tokens=gen_tokens + 1, temperature=0.0)
        next(steps)  # the prefill and the first token
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        t2 = time.perf_counter()
    out["prefill_ms_per_token"] = round(1000 * (t1 - t0) / gen_prompt, 2)
    out["decode_ms_per_token"] = round(1000 * (t2 - t1) / n, 1)
    if sft_steps == 0:
        return out
    # ---- SFT steps: forward + backward + AdamW on 1 x seq_len tokens, the first quarter masked (the prompt)
    model.train()
    optimizer = AdamW([dict(params=list(model.parameters()), lr=1e-5)], betas=(0.9, 0.95), eps=1e-8,
                      weight_decay=0.0)
    idx = torch.randint(0, 151000, (1, seq_len + 1))
    inputs, targets = idx[:, :-1], idx[:, 1:].clone()
    targets[:, :seq_len // 4] = -1
    times = []
    for step in range(sft_steps + 1):
        t0 = time.perf_counter()
        with ctx:
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"{mode}: SFT step {step}: {times[-1]:.1f}s, loss {loss.item():.3f}", file=sys.stderr, flush=True)
    step_s = min(times[1:])
    out["sft_step_s"] = round(step_s, 2)
    out["sft_ms_per_token"] = round(1000 * step_s / seq_len, 1)
    out["sft_tokens_per_s"] = round(seq_len / step_s, 1)
    out["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return out


def measure_load():
    """Write a random bf16 model.safetensors of the shape (as the hub has it), then load it into fp32."""
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory(prefix="bench_openweights_") as directory:
        c = QWEN3_06B
        shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (1024,)}
        q, kv, d, ff = c["num_attention_heads"] * 128, c["num_key_value_heads"] * 128, 1024, c["intermediate_size"]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                           p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                           p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                           p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                           p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                           p + "mlp.down_proj.weight": (d, ff)})
        save_file({k: torch.randn(s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()},
                  os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(QWEN3_06B, f)
        before = peak_rss_gib()  # the writer's tensors are freed, but its peak stays: reported beside
        t0 = time.perf_counter()
        model = GPT.from_pretrained(directory, dtype=torch.float32, sequence_len=seq_len)
        load_s = time.perf_counter() - t0
        rss_now = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {"params": model.num_params(), "load_s": round(load_s, 1), "rss_after_load_gib": round(rss_now, 2),
            "fp32_weights_gib": round(model.num_params() * 4 / 2**30, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
            "peak_rss_while_writing_gib": round(before, 2)}

# -----------------------------------------------------------------------------
# The parent: one child process per mode


def cpu_name():
    """The CPU's model name, cores, and the bf16 features that decide its speed."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    return cpu + f", {os.cpu_count()} cores" + (", AMX" if "amx_bf16" in flags else "") + \
        (", AVX512-BF16" if "avx512_bf16" in flags else "")


if __name__ == "__main__":
    configure()  # here, not at import: tests/bench_quant.py imports this file's Qwen3 shape and random_model
    if child:
        print(json.dumps(measure(child)))
        sys.exit(0)
    # the machine may be shared: its load average says how much of the cores this run had
    results = {"cpu": cpu_name(), "threads": threads, "seq_len": seq_len, "gen_prompt": gen_prompt,
               "loadavg_before": round(os.getloadavg()[0], 1)}
    for mode in modes.split(","):
        r = subprocess.run([sys.executable, __file__, f"--child={mode}"] + sys.argv[1:], capture_output=True,
                           text=True)
        sys.stderr.write(r.stderr)
        if r.returncode != 0:
            raise SystemExit(f"error: mode {mode} failed ({r.returncode})")
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]}", flush=True)
    results["loadavg_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(results))

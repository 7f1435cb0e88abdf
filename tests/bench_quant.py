"""
Weight-only quantisation side by side (model.py's quantize_model): the weights' memory, decoding speed, and what
it costs in quality, for fp32 weights, bf16 weights, int8 and int4 (groups of 32, 64, 128 inputs), on two models:
- pipeline: the CPU pipeline's chat model, $PICOCHAT_DIR's sft checkpoint (when there is none, tests/bench_rl.py's
  small pipeline is built first in a temporary folder: ~35 minutes on 2 busy cores). Quality: bits per byte on the
  held-out text and greedy pass@1 on the built-in math test problems, as evaluate.py measures them.
- qwen3: a random model of Qwen3-0.6B's shape (tests/bench_openweights.py's). Random weights have no bpb to speak
  of, so quality is fidelity to the fp32 model on random tokens: the logits' relative error, how often the top
  token agrees, and the mean KL(fp32 || mode) of the next-token distributions.

    python tests/bench_quant.py
    PICOCHAT_DIR=/tmp/pc python tests/bench_quant.py --models=pipeline --rounds=5

Decoding: batch 1, a gen_prompt-token prompt, then gen_tokens tokens greedy from the KV cache (the prefill is not
timed). The CPU may be shared with other work: the modes take turns, round after round, so any load falls on all
of them alike; a mode's tokens/s is its median over rounds, and its speed-up the median over rounds of its tokens/s
over fp32's in the same round. One thread by default: on a loaded machine threads mostly wait on each other.
The last line is one JSON object: {"cpu", "threads", "loadavg_before", "loadavg_after", "pipeline": {mode: {...}},
"qwen3": {mode: {...}}, "targets": {...}} with the issue's targets (int8 loses <= 0.01 bpb, int4 <= 0.05, int8
decodes >= 1.3x fp32) checked on what was measured.
"""

import atexit
import contextlib
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
from bench_openweights import QWEN3_06B, cpu_name, random_model  # noqa: E402
from bench_rl import PIPELINE, run  # noqa: E402
from model import Engine, generate, quantize_model, weight_bytes  # noqa: E402

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
models = "pipeline,qwen3"
modes = "fp32,bf16,int8,int4_g32,int4_g64,int4_g128"
rounds = 3                  # decoding turns of every mode
gen_prompt = 32             # prompt tokens before the timed decoding
gen_tokens = 16             # decoded tokens timed per turn
eval_tokens = 65536         # pipeline: held-out tokens for bpb (evaluate.py's default)
math_problems = 200         # pipeline: the first built-in math test problems, greedy
max_new_tokens = 128        # pipeline: longest answer
fidelity_tokens = 64        # qwen3: random tokens its fidelity is measured on
threads = 1

# -----------------------------------------------------------------------------
# Modes and measures


def build(fp32_model, mode):
    """The model in `mode`: fp32 as given; bf16 weights; int8 / int4_g<group> quantized (a copy each)."""
    if mode == "fp32":
        return fp32_model
    model = copy.deepcopy(fp32_model)
    if mode == "bf16":
        return model.to(torch.bfloat16)
    fmt, _, group = mode.partition("_g")
    return quantize_model(model, fmt, int(group or 64))


def decode_tokens_per_s(model, prompt):
    steps = generate(model, [prompt], max_new_tokens=gen_tokens + 1, temperature=0.0)
    next(steps)  # the prefill and the first token
    t0 = time.perf_counter()
    n = sum(1 for _ in steps)
    return n / (time.perf_counter() - t0)


def speeds(built, vocab_size):
    """Decoding tokens/s per mode, the modes taking turns: (median tokens/s, median speed-up over fp32) per mode."""
    prompt = torch.randint(0, vocab_size, (gen_prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    per_round = []
    for r in range(rounds):
        per_round.append({mode: decode_tokens_per_s(model, prompt) for mode, model in built.items()})
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{m} {v:.1f}" for m, v in per_round[-1].items()) +
              " tokens/s", flush=True)
    return {mode: (statistics.median(r[mode] for r in per_round),
                   statistics.median(r[mode] / r["fp32"] for r in per_round)) for mode in built}


def pipeline_quality(model, tokenizer):
    """bpb on held-out text, greedy math pass@1 (evaluate.py's measures)."""
    bpb = evaluate.eval_bpb(model, tokenizer, "cpu", contextlib.nullcontext(), eval_tokens)["bpb"]
    problems = data.load_math("tinyworld", "test")[:math_problems]
    prompts, _ = evaluate.math_prompts(tokenizer, "tinyworld", problems, "chat",
                                       model.config.sequence_len - max_new_tokens)
    math = evaluate.eval_math(Engine(model, tokenizer), problems, prompts, chat=True, max_new_tokens=max_new_tokens,
                              label="  math")
    return {"bpb": bpb, "pass1": math["pass@1"]}


def fidelity(model, reference_logits, idx):
    """The logits' relative error, top-1 agreement and mean KL(reference || model) on idx (1, T)."""
    with torch.inference_mode():
        logits = model(idx)[0].float()  # (T, V)
    ref = reference_logits
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"logit_rel_err": ((logits - ref).norm() / ref.norm()).item(),
            "top1_agree": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "kl": kl.sum(-1).mean().item()}


def measure(name, fp32_model, quality):
    """Every mode of one model: weights' memory, decoding speed and quality. Returns {mode: {...}}."""
    print(f"== {name}: {fp32_model.num_params():,} parameters", flush=True)
    built, results = {}, {}
    for mode in modes.split(","):
        t0 = time.time()
        built[mode] = build(fp32_model, mode)
        results[mode] = {"weights_mib": round(weight_bytes(built[mode]) / 2**20, 1)}
        results[mode].update({k: round(v, 4) for k, v in quality(built[mode]).items()})
        print(f"  {mode}: {results[mode]} ({time.time() - t0:.0f}s)", flush=True)
    for mode, (tokens_s, speedup) in speeds(built, fp32_model.config.vocab_size).items():
        results[mode].update(tokens_s=round(tokens_s, 2), speedup_vs_fp32=round(speedup, 2))
    fp32 = results["fp32"]
    for r in results.values():
        r["weights_vs_fp32"] = round(r["weights_mib"] / fp32["weights_mib"], 3)
        if "bpb" in r:
            r["dbpb_vs_fp32"] = round(r["bpb"] - fp32["bpb"], 4)
            r["dpass1_vs_fp32"] = round(r["pass1"] - fp32["pass1"], 4)
    columns = list(results["fp32"])
    print(common.markdown_table("mode", columns, list(results), lambda m, c: str(results[m].get(c, "-"))), flush=True)
    return results


def pipeline_model():
    """$PICOCHAT_DIR's sft model and its tokenizer; builds tests/bench_rl.py's pipeline in a temporary folder when
    there is none."""
    sft_dir = os.path.join(common.get_base_dir(), "checkpoints", "sft")
    if not (os.path.isdir(sft_dir) and any(common.last_step(os.path.join(sft_dir, t)) is not None
                                           for t in os.listdir(sft_dir))):
        base = tempfile.mkdtemp(prefix="bench_quant_")
        print(f"no sft checkpoint in {common.get_base_dir()}: building the small pipeline in {base}", flush=True)
        os.environ["PICOCHAT_DIR"] = base
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        for args in PIPELINE:
            run(args)
    model, tokenizer, _ = common.load_model("sft", "cpu")
    return model, tokenizer


if __name__ == "__main__":
    common.configure(globals())
    torch.set_num_threads(threads)
    results = {"cpu": cpu_name(), "threads": threads, "loadavg_before": round(os.getloadavg()[0], 1)}
    for name in models.split(","):
        torch.manual_seed(0)
        if name == "pipeline":
            model, tokenizer = pipeline_model()
            results[name] = measure(name, model, lambda m: pipeline_quality(m, tokenizer))
        elif name == "qwen3":
            model = random_model(torch.float32).eval()
            idx = torch.randint(0, QWEN3_06B["vocab_size"], (1, fidelity_tokens),
                                generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                reference = model(idx)[0].float()  # (T, V)
            results[name] = measure(name, model, lambda m: fidelity(m, reference, idx))
        else:
            raise SystemExit(f"error: unknown model {name!r} (pipeline, qwen3)")
        del model
    results["loadavg_after"] = round(os.getloadavg()[0], 1)
    targets = {}
    pipe, qwen = results.get("pipeline", {}), results.get("qwen3", {})
    if "int8" in pipe:
        targets["int8_dbpb<=0.01"] = pipe["int8"]["dbpb_vs_fp32"] <= 0.01
    targets.update({f"{m}_dbpb<=0.05": pipe[m]["dbpb_vs_fp32"] <= 0.05 for m in pipe if m.startswith("int4")})
    targets.update({f"int8_decode>=1.3x_{name}": r["int8"]["speedup_vs_fp32"] >= 1.3
                    for name, r in (("pipeline", pipe), ("qwen3", qwen)) if "int8" in r})
    results["targets"] = targets
    print(json.dumps(results))

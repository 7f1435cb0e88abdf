"""
Benchmark: math evaluation throughput, batched generation with the KV cache (evaluate.eval_math: generate, decode,
grade), in problems per second, greedy and with 8 samples per problem (the 8 samples of a problem share its
prefill).

    python tests/bench_evaluate.py                   # the sft model in $PICOCHAT_DIR, else a random depth-4 GPT
    PICOCHAT_DIR=/tmp/pc python tests/bench_evaluate.py
    OMP_NUM_THREADS=1 python tests/bench_evaluate.py # a busy CPU: threads waiting on each other can cost 10x

A random model (almost) never writes its stop token, so every answer is max_new_tokens long and numbers from
random models compare; a trained model stops early and is faster. Without an sft checkpoint the model is a
random depth-4 GPT (width 256, context 512) with the tokenizer in $PICOCHAT_DIR, or, when there is none, a
2048-token one trained on a small built-in set in a temporary folder (about a minute; removed at the end). The
problems are the first built-in test problems. The last line is one JSON object:
{"greedy_problems_s", "sampled8_problems_s"}.
"""

import atexit
import glob
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

MAX_NEW_TOKENS = 64
GREEDY_PROBLEMS = 64
SAMPLED_PROBLEMS = 32  # x 8 samples
BATCH_SIZE = 16  # problems per generation batch (evaluate.py's default)


def random_model(device):
    """A random depth-4 GPT with this $PICOCHAT_DIR's tokenizer, first training one (in a temporary $PICOCHAT_DIR)
    when there is none."""
    import data
    import tokenizer as tok_module
    from model import GPT, config_from_depth
    if not os.path.exists(os.path.join(common.get_base_dir(), "tokenizer", "tokenizer.json")):
        os.environ["PICOCHAT_DIR"] = tempfile.mkdtemp(prefix="bench_evaluate.")
        atexit.register(shutil.rmtree, os.environ["PICOCHAT_DIR"], ignore_errors=True)
        print(f"no tokenizer: training one in {common.get_base_dir()}", flush=True)
        data.ensure_tinyworld(pretrain_mb=0.5)
        texts = tok_module.iter_documents(data.pretrain_files("train"), 2_000_000, 10_000)
        tok_module.save_tokenizer(tok_module.train_bpe(texts, 2048))
    tokenizer = tok_module.load_tokenizer()
    common.seed_everything(0)
    model = GPT(config_from_depth(4, tokenizer.vocab_size, 512, head_dim=64)).to(device)
    model.init_weights()
    return model.eval(), tokenizer


def bench(engine, problems, prompts, autocast_ctx, **settings):
    import evaluate
    with autocast_ctx:
        t0 = time.perf_counter()
        metrics = evaluate.eval_math(engine, problems, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                     batch_size=BATCH_SIZE, **settings)
        return len(problems) / (time.perf_counter() - t0), metrics


if __name__ == "__main__":
    import data
    from model import Engine
    _, _, _, _, device = common.setup_device()
    autocast_ctx = common.autocast(device, "bfloat16" if device.type == "cuda" else "float32")
    if glob.glob(os.path.join(common.get_base_dir(), "checkpoints", "sft", "*", "meta_*.json")):
        model, tokenizer, _ = common.load_model("sft", device)
        what = "the sft checkpoint"
    else:
        model, tokenizer = random_model(device)
        what = "a random depth-4 GPT"
    problems = data.load_math("tinyworld", "test")[:GREEDY_PROBLEMS]
    prompts = [tokenizer.render_for_completion([{"role": "user", "content": p["question"]}]) for p in problems]
    engine = Engine(model, tokenizer)
    print(f"model: {what}, {model.num_params():,} parameters; {MAX_NEW_TOKENS} new tokens at most", flush=True)
    bench(engine, problems[:4], prompts[:4], autocast_ctx)  # warm-up
    greedy, m1 = bench(engine, problems, prompts, autocast_ctx)
    n = SAMPLED_PROBLEMS
    sampled, m8 = bench(engine, problems[:n], prompts[:n], autocast_ctx, num_samples=8, temperature=1.0, seed=0)
    print(f"greedy: {greedy:.2f} problems/s ({len(problems)} problems, pass@1 {m1['pass@1']:.3f})")
    print(f"8 samples: {sampled:.2f} problems/s = {8 * sampled:.1f} answers/s ({n} problems, pass@8 "
          f"{m8['pass@8']:.3f})")
    print(json.dumps({"greedy_problems_s": round(greedy, 3), "sampled8_problems_s": round(sampled, 3)}))

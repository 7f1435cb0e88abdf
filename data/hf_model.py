"""
Download an open model's weights and tokenizer (Hugging Face layout) into $PICOCHAT_DIR/models/<org>__<name>/.

    python data/hf_model.py --model=Qwen/Qwen3-0.6B-Base
    python data/hf_model.py --model=openai-community/gpt2
    HF_ENDPOINT=https://your-mirror python data/hf_model.py --model=Qwen/Qwen3-0.6B   # another hub or a mirror

Fetches config.json, tokenizer.json (+ tokenizer_config.json, generation_config.json when present) and the
safetensors weights, resuming interrupted files on a rerun. The folder then loads with
model.GPT.from_pretrained(folder) and tokenizer.load_tokenizer(folder). Supported families: Qwen3, GPT-2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

model = "Qwen/Qwen3-0.6B-Base"  # <org>/<name> on the hub
revision = "main"  # a branch, tag or commit of the repository

if __name__ == "__main__":
    import json

    import common
    from data.download import download_hf_model
    from model import config_from_hf
    common.configure(globals())
    try:
        directory = download_hf_model(model, revision)
    except (ValueError, RuntimeError, OSError) as e:  # a bad name, a missing file, the network: one line
        raise SystemExit(f"error: {e}") from None
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        try:  # say now, not at the first stage, when picochat cannot run this model
            c = config_from_hf(json.load(f))
        except ValueError as e:
            raise SystemExit(f"error: {model} is downloaded to {directory}, but picochat cannot load it: {e}")
    print(f"{model}: {c.n_layer} layers, width {c.n_embd}, vocab {c.vocab_size}, in {directory}", flush=True)

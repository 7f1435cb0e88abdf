"""An open model through every stage, offline: a tiny random Qwen3 written by transformers (save_pretrained) with a
byte-level BPE trained here (test_openweights.py's helpers) sits where data/hf_model.py puts downloads, and goes
sft.py -> rl.py -> evaluate.py -> chat.py as --source=hf:org/tiny-qwen3. Its head is wider than its tokenizer, as
Qwen3-0.6B's (151,936 rows for 151,669 tokens). And the Engine on the real tokenizers: the calculator in Qwen3's
tool convention (through the OpenAI API too), none for GPT-2."""
import json
import os
import re
import threading

import pytest
import torch

import chat
import common
from conftest import run_main
from model import GPT, Engine
from test_chat import Steered
from test_openweights import train_hf_tokenizer, transformers
from tokenizer import load_tokenizer

REPO_ID = "org/tiny-qwen3"
PADDING = 37  # head rows beyond the tokenizer's ids


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models, one thread


@pytest.fixture
def qwen3(world):
    """The tiny Qwen3's folder under $PICOCHAT_DIR/models/, its tokenizer trained on the built-in chats."""
    folder = common.hf_model_dir(REPO_ID)
    with open(os.path.join(world, "data", "tinyworld", "chat_train.jsonl"), encoding="utf-8") as f:
        texts = f.read().splitlines()
    hf_tokenizer = train_hf_tokenizer("qwen3", folder, texts[:300])
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=len(hf_tokenizer) + PADDING, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)  # its config.json replaces the tokenizer's
    return folder


def calculator_reply(tok):
    """(prompt, reply, mask): a question, and the answer that calls the calculator, as Qwen3's template renders them
    (the reply up to its last <|im_end|>; mask 0 on the tool turn the engine forces in)."""
    conversation = [{"role": "user", "content": "What is 6*7?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute."},
                                                      {"type": "python", "text": "6*7"},
                                                      {"type": "python_output", "text": "42"},
                                                      {"type": "text", "text": "It is 42."}]}]
    ids, mask = tok.render_conversation(conversation)
    prompt = tok.render_for_completion(conversation[:1])
    assert ids[:len(prompt)] == prompt and ids[-2] == tok.special("<|im_end|>")
    return prompt, ids[len(prompt):-1], mask[len(prompt):-1]


def test_engine_qwen3_calculator_and_padded_vocabulary(qwen3):
    model, tok = GPT.from_pretrained(qwen3), load_tokenizer(qwen3)
    assert model.config.vocab_size == tok.vocab_size + PADDING
    prompt, reply, reply_mask = calculator_reply(tok)
    forced = [t for t, m in zip(reply, reply_mask) if m == 0]
    assert forced == tok.tool_output("42") and tok.special("<|im_end|>") in forced  # a forced end of turn
    # steered to write the reply: the engine forces the tool turn in, and only the sampled <|im_end|> stops the row
    engine = Engine(Steered(model, reply), tok)
    [[(tokens, mask)]] = engine.generate_batch([prompt], max_new_tokens=len(reply) + 8, temperature=1.0, seed=0)
    assert tokens == reply and mask == reply_mask
    engine.model.calls = 0
    shown = chat.Reply(engine, prompt, max_new_tokens=len(reply) + 8, temperature=0.0, top_k=0)
    assert "".join(shown) == shown.text == "Let me compute.\n<<6*7=42>><think>\n\n</think>\n\nIt is 42."
    assert shown.finish_reason == "stop" and chat.message_parts(shown.text) == shown.parts
    # the OpenAI API answers through the same engine, the calculator shown inline
    openai = pytest.importorskip("openai")
    engine.model.calls = 0
    server = chat.ChatServer(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x",
                               max_retries=0, timeout=30)
        question = [{"role": "user", "content": "What is 6*7?"}]
        completion = client.chat.completions.create(model="tiny", messages=question, max_tokens=len(reply) + 8,
                                                    temperature=0)
        assert completion.choices[0].message.content == shown.text
        assert completion.usage.completion_tokens == len(reply)
    finally:
        server.shutdown()
        server.server_close()
    # ids the head has but the tokenizer does not are never sampled, even when the model prefers them
    padded = Engine(Steered(model, [tok.vocab_size + 3]), tok)
    for temperature in (0.0, 1.0):
        [[(tokens, _)]] = padded.generate_batch([prompt], max_new_tokens=6, temperature=temperature, seed=0)
        assert len(tokens) == 6 and max(tokens) < tok.vocab_size


def test_engine_gpt2_has_no_calculator(tmp_path):
    hf_tok = train_hf_tokenizer("gpt2", str(tmp_path), ["Hello there. What is 6*7? It is 42, <<6*7=42>>."] * 20)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(hf_tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model, tok = GPT.from_pretrained(str(tmp_path)), load_tokenizer(str(tmp_path))
    prompt = tok.render_for_completion([{"role": "user", "content": "What is 6*7?"}])
    reply = tok.encode(" It is <<6*7=") + [tok.bos_id]  # a GPT-2 writes its calculations as text
    engine = Engine(Steered(model, reply), tok)
    assert engine.python_start is None and engine.output_start is None
    [[(tokens, mask)]] = engine.generate_batch([prompt], max_new_tokens=20, temperature=0.0)
    assert tokens == reply and all(mask)  # nothing forced in, and the sampled <|endoftext|> ends the turn


def test_open_model_through_sft_rl_evaluate_chat(qwen3, world, monkeypatch, capsys):
    source = f"--source=hf:{REPO_ID}"

    def run(script, *args):  # the script in this process (a subprocess would spend seconds importing); its stdout
        run_main(monkeypatch, script, *args)
        return capsys.readouterr().out

    tag = "org__tiny-qwen3"  # the folder's name
    # ---- sft: AdamW by default (here at a tiny random model's learning rate), the masked loss goes down
    out = run("sft.py", source, "--max_seq_len=128", "--device_batch_size=4", "--total_batch_size=1024",
              "--num_iterations=6", "--eval_every=6", "--eval_rows=8", "--lr=3e-3", "--dtype=float32")
    assert "optimizer: AdamW at lr 0.003" in out
    val = [float(v) for v in re.findall(r"val loss ([\d.]+)", out)]
    assert len(val) == 2 and val[1] < val[0] - 0.5
    pretrained = GPT.from_pretrained(qwen3)
    model, tok, meta = common.load_model("sft")
    assert meta["open_model"] == {"source": f"hf:{REPO_ID}", "folder": qwen3}
    assert tok.hash == load_tokenizer(qwen3).hash and type(tok.chat).__name__ == "Qwen3Chat"
    assert model.config == pretrained.config and model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.transformer.wte.weight, pretrained.transformer.wte.weight)  # it trained
    _, rank_states, _ = common.load_checkpoint(common.checkpoint_dir("sft", tag))
    assert len(rank_states[0]["optimizers"]) == 1  # one AdamW, no Muon

    # ---- rl from the sft checkpoint: still the open model's, still AdamW
    out = run("rl.py", "--num_steps=2", "--prompts_per_step=2", "--num_samples=2", "--max_new_tokens=12",
              "--eval_every=2", "--eval_problems=4", "--eval_samples=2", "--device_batch_size=4", "--dtype=float32")
    assert "optimizer: AdamW at lr 1e-05" in out and "saved checkpoint step 2" in out
    _, tok, meta = common.load_model("rl")
    assert meta["open_model"]["source"] == f"hf:{REPO_ID}" and tok.hash == load_tokenizer(qwen3).hash

    # ---- evaluate the rl model (bpb, multiple choice, math), then the open model itself as a base model
    run("evaluate.py", "--source=rl", "--max_problems=4", "--max_new_tokens=8", "--eval_tokens=1024",
        "--batch_size=4")
    with open(os.path.join(world, "report", "eval_rl.json"), encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    assert 0 < metrics["bpb"] < 2 * metrics["unigram_bpb"] and 0 <= metrics["mc/tinyworld/acc"] <= 1
    assert 0 <= metrics["math/tinyworld/pass@1"] <= 1
    out = run("evaluate.py", source, "--task=math", "--prompt_style=boxed", "--num_samples=2", "--vote=1",
              "--max_problems=3", "--max_new_tokens=8", "--dtype=bfloat16")
    assert "loaded open model" in out
    with open(os.path.join(world, "report", f"eval_{tag}.json"), encoding="utf-8") as f:
        result = json.load(f)["results"]["math/tinyworld"]
    assert {"pass@1", "pass@2", "maj@2"} <= set(result) and result["n"] == 3 * 6  # --max_problems: per slice, 6
    assert result["settings"]["prompt"] == "boxed" and result["settings"]["dtype"] == "torch.bfloat16"

    # ---- chat: the rl model answers a prompt; the open model itself chats in the terminal
    out = run("chat.py", "--source=rl", "--prompt=What is 6*7?", "--max_new_tokens=6")
    assert "loaded rl model" in out
    lines = iter(["What is 6*7?", "and 7*8?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = run("chat.py", source, "--max_new_tokens=6")
    assert "loaded open model" in out and out.count("Assistant: ") == 2

    # ---- a checkpoint refuses a tokenizer that changed since it was trained
    with open(os.path.join(qwen3, "tokenizer.json"), "a", encoding="utf-8") as f:
        f.write("\n")
    with pytest.raises(SystemExit, match="another tokenizer"):
        common.load_model("rl")

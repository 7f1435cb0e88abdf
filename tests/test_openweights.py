"""Open models: Qwen3 and GPT-2 weights and tokenizers in picochat's GPT and Tokenizer, checked against transformers
and tokenizers as independent references (tiny random models written with save_pretrained; tokenizers trained
here), and their download from a hub on 127.0.0.1."""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import shared_data
from data import download
from model import GPT, KVCache, generate
from tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: OpenMP threads only add sync overhead on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 101


def hf_model(kind, tie=True):
    """A tiny random transformers model: every weight perturbed, so that a swapped or transposed tensor shows."""
    torch.manual_seed(0)
    if kind == "qwen3":
        config = transformers.Qwen3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_theta=1e6, tie_word_embeddings=tie)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=48,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("kind,tie,shard", [("qwen3", True, False), ("qwen3", False, True), ("gpt2", True, False)])
def test_logits_equal_transformers(kind, tie, shard, tmp_path):
    ref = hf_model(kind, tie)
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "1GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == shard
    model = GPT.from_pretrained(str(tmp_path))
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    assert model.num_params() == sum(p.numel() for p in ref.parameters())
    idx = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        want = ref(idx).logits  # (B, T, V)
    assert torch.allclose(model(idx), want, atol=2e-5, rtol=1e-4)
    # the KV cache: rows prefilled at different lengths, then decoded one token at a time
    cache = KVCache(3, 40, model.config, "cpu")
    starts = [5, 9, 17]
    for b, n in enumerate(starts):
        single = KVCache(1, n, model.config, "cpu")
        got = model(idx[b:b + 1, :n], kv_cache=single)[0]
        assert torch.allclose(got, want[b, :n], atol=2e-5, rtol=1e-4)
        cache.copy_rows([b], single)
    for t in range(6):
        step = model(torch.stack([idx[b, n + t] for b, n in enumerate(starts)])[:, None], kv_cache=cache)[:, -1]
        for b, n in enumerate(starts):
            assert torch.allclose(step[b], want[b, n + t], atol=2e-5, rtol=1e-4), (t, b)
    # greedy generation through model.generate picks transformers' argmax at every step
    prompt = idx[0, :7].tolist()
    tokens = [s[0][0] for s in generate(model, [prompt], max_new_tokens=8, temperature=0.0)]
    with torch.no_grad():
        full = ref(torch.tensor([prompt + tokens])).logits[0]
    assert tokens == full[len(prompt) - 1:-1].argmax(-1).tolist()


def test_bf16_load_and_training_step(tmp_path):
    ref = hf_model("qwen3")
    ref.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        want = ref(idx).logits
    assert (model(idx) - want).abs().max() < 0.1 * want.abs().max()
    # the loaded model trains: tied head and embedding get one gradient, the optimisers take it
    model = GPT.from_pretrained(str(tmp_path)).train()
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    for opt in model.setup_optimizers():
        opt.step()
    assert model(idx[:, :-1], idx[:, 1:]) < loss


def test_weight_key_errors(tmp_path):
    hf_model("qwen3", tie=False).save_pretrained(tmp_path)
    weights = safetensors_torch.load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.mlp.extra.weight"] = weights.pop("model.layers.1.self_attn.k_norm.weight")
    safetensors_torch.save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.self_attn\.k_norm\.weight; "
                                         r"unexpected keys: model\.layers\.0\.mlp\.extra\.weight"):
        GPT.from_pretrained(str(tmp_path))
    weights["model.layers.1.self_attn.k_norm.weight"] = torch.ones(8)
    del weights["model.layers.0.mlp.extra.weight"]
    safetensors_torch.save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape \(8,\).*\(16,\)"):
        GPT.from_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        GPT.from_pretrained(str(tmp_path))

def test_picochat_defaults_keep_their_parameters():
    """The open models' switches add nothing to picochat's own model: checkpoints keep loading."""
    from model import config_from_depth
    for extra, norms in [({}, []), ({"norm_weight": True}, ["norm_in", "norm_f"])]:
        model = GPT(config_from_depth(2, 64, 32, aspect_ratio=16, head_dim=8, **extra))
        block = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        if norms:
            block = ["norm_1", *block[:4], "attn.q_norm", "attn.k_norm", "norm_2", *block[4:]]
        want = ["transformer.wte.weight"] + [f"transformer.{n}.weight" for n in norms[:1]]
        want += [f"transformer.h.{i}.{name}.weight" for i in range(2) for name in block]
        want += [f"transformer.{n}.weight" for n in norms[1:]] + ["lm_head.weight"]
        assert list(model.state_dict()) == want

# -----------------------------------------------------------------------------
# Tokenizers: a byte-level BPE trained here with `tokenizers`, in Qwen's and GPT-2's layouts

# Qwen2/Qwen3's pre-tokenizer split regex, as in their tokenizer.json
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen3's chat template (tokenizer_config.json of the Qwen3 models, e.g. Qwen3-0.6B)
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

BUILT_IN_TEXT = """The quick brown fox jumps over the lazy dog. It's 12:30; we'll pay $1,234.56 (or 7%) -- ok?
    Indented code:\tx = f(a, b)  # comment\r\n\n\nnaïve café, Ærøskøbing, 日本語のテキスト, emoji 🤗🤗,
Cafe\u0301 (NFD)
I'VE SEEN 'EM ALL... she'd've won 1000000 times!!  \n  trailing spaces   \nend"""


def train_hf_tokenizer(kind, directory, texts):
    """A byte-level BPE (tokenizers' trainer) saved as `kind`'s tokenizer.json, with its added tokens, a
    config.json naming the family and (Qwen3) its chat template. Returns the transformers tokenizer."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    if kind == "qwen3":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if kind == "qwen3":
        tok.add_special_tokens(QWEN_SPECIAL)
        tok.add_tokens(QWEN_ADDED)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                    pad_token="<|endoftext|>", chat_template=QWEN3_CHAT_TEMPLATE)
    else:
        tok.add_special_tokens(["<|endoftext|>"])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    if not os.path.exists(os.path.join(directory, "config.json")):  # beside a model's, the model's says it
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"model_type": kind}, f)
    return fast


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    texts = [BUILT_IN_TEXT] * 3 + ["Hello world. What is 12*34? Let me compute. It is 408. Thanks, you're welcome!"]
    out = {}
    for kind in ("qwen3", "gpt2"):
        directory = tmp_path_factory.mktemp(kind)
        out[kind] = (train_hf_tokenizer(kind, str(directory), texts), load_tokenizer(str(directory)))
    return out


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_tiktoken_build_encodes_as_tokenizers(kind, hf_tokenizers, tmp_path):
    ref, tok = hf_tokenizers[kind]
    assert tok.vocab_size == len(ref)
    for text in [BUILT_IN_TEXT, BUILT_IN_TEXT[::-1], "", " ", "\n\n\n", "a  b   c", "x\u0301\u0302y"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    ids = tok.encode(BUILT_IN_TEXT)
    assert tok.decode(ids) == ref.decode(ids) and tok.token_bytes[ids].sum() == len(tok.decode(ids).encode())
    # plain text never yields added tokens, unlike the Hugging Face tokenizer (which matches them anywhere)
    assert tok.encode("<|endoftext|><think>") == tok.encode("<|endoftext|>") + tok.encode("<think>")
    assert tok.special("<|bos|>") == ref.convert_tokens_to_ids("<|endoftext|>") == tok.bos_id
    # real text, with a tokenizer trained on it (tinyshakespeare; skipped when absent)
    with open(shared_data("tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    directory = tmp_path / "shakespeare"
    lines = text.splitlines(keepends=True)
    ref = train_hf_tokenizer(kind, str(directory), ["".join(lines[i:i + 200]) for i in range(0, len(lines), 200)])
    tok = load_tokenizer(str(directory))
    chunks = ["".join(lines[i:i + 400]) for i in range(0, len(lines), 400)]
    assert tok.encode(chunks) == [e.ids for e in ref.backend_tokenizer.encode_batch(chunks, add_special_tokens=False)]


def qwen_conversations():
    """(picochat messages, the same conversation as Qwen3's template takes it)."""
    def calc(expr):
        return {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expr}}}
    return [
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12*34?"},
          {"role": "assistant", "content": "<think>\nIt is 408.\n</think>\n\n408"},
          {"role": "user", "content": "And  twice that?\n"},
          {"role": "assistant", "content": "<think>Double: 816.</think>816, naïve café 🤗"}], None),
        ([{"role": "user", "content": "What is 12*34?"},
          {"role": "assistant", "content": [{"type": "text", "text": "Let me compute."},
                                            {"type": "python", "text": "12*34"},
                                            {"type": "python_output", "text": "408"},
                                            {"type": "text", "text": "It is 408."}]}],
         [{"role": "user", "content": "What is 12*34?"},
          {"role": "assistant", "content": "Let me compute.", "tool_calls": [calc("12*34")]},
          {"role": "tool", "content": "408"},
          {"role": "assistant", "content": "It is 408."}]),
        ([{"role": "user", "content": "2+2 then 3+3?"},
          {"role": "assistant", "content": [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"},
                                            {"type": "python", "text": "3+3"}, {"type": "python_output", "text": "6"},
                                            {"type": "text", "text": "4 and 6"}]}],
         [{"role": "user", "content": "2+2 then 3+3?"},
          {"role": "assistant", "content": "", "tool_calls": [calc("2+2")]}, {"role": "tool", "content": "4"},
          {"role": "assistant", "content": "", "tool_calls": [calc("3+3")]}, {"role": "tool", "content": "6"},
          {"role": "assistant", "content": "4 and 6"}]),
    ]


def test_qwen3_chat_renders_as_its_template(hf_tokenizers):
    ref, tok = hf_tokenizers["qwen3"]
    template = lambda messages, **kw: ref.apply_chat_template(messages, tokenize=False, **kw)  # noqa: E731
    end = tok.special("<|assistant_end|>")
    assert end == ref.convert_tokens_to_ids("<|im_end|>")
    written = []
    for ours, theirs in qwen_conversations():
        text = template(theirs or ours)  # None: our messages are the template's too
        ids, mask = tok.render_conversation(ours)
        assert tok.decode(ids) == text
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
        # the prompt is a prefix of the whole; the model writes from there on, up to its last <|im_end|>
        prompt = tok.render_for_completion(ours)
        theirs = theirs or ours
        last_user = max(i for i, m in enumerate(theirs) if m["role"] == "user")
        assert tok.decode(prompt) == template(theirs[:last_user + 1], add_generation_prompt=True)
        assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1:len(prompt) + 1] == [0, 1]
        assert ids[-2:] == [end, tok.encode("\n")[0]] and mask[-2:] == [1, 0]
        written.append(tok.decode([t for t, m in zip(ids, mask) if m]))
    # thinking: the last answer's (empty) block is written by the model; an earlier turn's reasoning is dropped
    assert written[0] == "<think>\n\n</think>\n\nHello!<|im_end|>"
    assert written[1] == "408<|im_end|><think>\nDouble: 816.\n</think>\n\n816, naïve café 🤗<|im_end|>"
    # the calculator: a call is the model's, the engine forces the result and the next assistant turn
    ours, _ = qwen_conversations()[2]
    ids, mask = tok.render_conversation(ours)
    call_end = ids.index(tok.special("<|python_end|>"))
    forced = ids[call_end + 1:mask.index(1, call_end + 1)]
    call = tok.decode(ids[ids.index(tok.special("<|python_start|>")) + 1:call_end])
    assert tok.tool_call(call) == "12*34" and tok.tool_output("408") == forced
    assert not any(mask[call_end + 1:call_end + 1 + len(forced)])
    assert tok.tool_call('\n{"name": "search", "arguments": {"q": "x"}}\n') is None and tok.tool_call("12*34") is None


def test_gpt2_chat_format(hf_tokenizers):
    _, tok = hf_tokenizers["gpt2"]
    eot = tok.special("<|bos|>")
    assert tok.special("<|assistant_end|>") == eot and tok.special("<|python_start|>") is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12*34?"},
                {"role": "assistant", "content": [{"type": "text", "text": "It is "},
                                                  {"type": "python", "text": "12*34"},
                                                  {"type": "python_output", "text": "408"},
                                                  {"type": "text", "text": "."}]},
                {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome"}]
    ids, mask = tok.render_conversation(messages)
    assert tok.decode(ids) == ("<|endoftext|>System: Be brief.\nUser: What is 12*34?\nAssistant: It is <<12*34=408>>."
                               "<|endoftext|>\nUser: Thanks\nAssistant: Welcome<|endoftext|>\n")
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == " It is <<12*34=408>>.<|endoftext|> Welcome<|endoftext|>"
    for end in (2, 4):  # each prompt is a prefix of the whole, and the model writes right after it
        prompt = tok.render_for_completion(messages[:end])
        assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1:len(prompt) + 1] == [0, 1]
    assert tok.decode(prompt).endswith("User: Thanks\nAssistant:")

# -----------------------------------------------------------------------------
# Download from a hub on 127.0.0.1


class Hub(BaseHTTPRequestHandler):
    """Serves Hub.files {"/<repo>/resolve/main/<name>": bytes} to GET (with Range) and HEAD; Hub.cut: paths whose
    next GET sends half the bytes and closes."""
    files, cut, log = {}, set(), []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body):
        Hub.log.append((self.command, self.path, self.headers.get("Range")))
        body = Hub.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if send_body:
            cut = self.command == "GET" and self.path in Hub.cut
            Hub.cut.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2] if cut else body[start:])
        self.close_connection = True


@pytest.fixture
def hub(monkeypatch):
    Hub.files, Hub.cut, Hub.log = {}, set(), []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}/")
    monkeypatch.setattr(download, "BACKOFF", 0.01)
    monkeypatch.setattr(download, "CHUNK", 4096)  # small reads, so a cut leaves a part to resume from
    yield Hub
    httpd.shutdown()
    httpd.server_close()


def serve(hub, repo, directory):
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            hub.files[f"/{repo}/resolve/main/{name}"] = f.read()


@pytest.mark.parametrize("shard", [False, True])
def test_download_then_load(hub, tmp_path, tmp_base_dir, shard):
    ref = hf_model("qwen3")
    source = tmp_path / "source"
    ref.save_pretrained(source, max_shard_size="20KB" if shard else "1GB")
    train_hf_tokenizer("qwen3", str(source), [BUILT_IN_TEXT])
    serve(hub, "org/tiny-qwen", source)
    shards = sorted(name for name in os.listdir(source) if name.endswith(".safetensors"))
    assert (len(shards) > 1) == shard
    weights = f"/org/tiny-qwen/resolve/main/{shards[-1]}"
    hub.cut.add(weights)  # the first try is cut off half-way: the download resumes it
    directory = download.download_hf_model("org/tiny-qwen")
    assert directory == os.path.join(tmp_base_dir, "models", "org__tiny-qwen")
    assert sorted(os.listdir(directory)) == sorted(os.listdir(source))  # every file, no .part left
    assert any(method == "GET" and path == weights and rng for method, path, rng in hub.log)
    model, tok = GPT.from_pretrained(directory), load_tokenizer(directory)
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(idx), ref(idx).logits, atol=2e-5, rtol=1e-4)
    opening = [tok.special("<|im_start|>")] + tok.encode("assistant\n")
    assert tok.render_for_completion([{"role": "user", "content": "Hi"}])[-len(opening):] == opening


def test_download_errors(hub, tmp_base_dir):
    with pytest.raises(ValueError, match="<org>/<name>"):
        download.download_hf_model("not-a-repo")
    hub.files["/org/broken/resolve/main/config.json"] = b"{}"
    with pytest.raises(RuntimeError, match="tokenizer.json: HTTP 404"):  # missing files: one clear error
        download.download_hf_model("org/broken")
    directory = os.path.join(tmp_base_dir, "models", "org__broken")
    assert os.listdir(directory) == ["config.json"]  # what came whole; no half-written file

"""LoRA, QLoRA and weight-only quantisation (model.py's last section): full-rank LoRA's first step is full
fine-tuning's, merging keeps the logits, only adapters train, QLoRA learns, quantisation stays within its format's
bound and its kernels agree with de-quantize + matmul; sft.py/rl.py/dpo.py with --lora_rank (resume, the reference
with adapters off, DDP), and a quantized model served through the OpenAI API."""
import contextlib
import copy
import dataclasses
import json
import os
import threading

import pytest
import torch
import torch.nn as nn

import chat
import common
import evaluate
from conftest import gloo_ranks, run_main
from model import (GPT, AdamW, KVCache, LoRALinear, QuantLinear, _packed_kernel_ok, add_lora, config_from_depth,
                   lora_disabled, lora_state_dict, merge_lora, pack_int4, quantize_int4, quantize_int8,
                   quantize_model, unpack_int4, weight_bytes)
from test_chat import tiny_chat_model  # noqa: F401  (a fixture)
from test_rl import rl_weights, run_rl, sft_model  # noqa: F401  (sft_model: a fixture)


@pytest.fixture(autouse=True)
def tiny_models_one_thread(one_thread):
    """conftest's one_thread for every test here: the models are tiny."""


def tiny(depth=1, width=64, vocab=96, seed=0):
    """A random GPT whose output projections and head are not (near) zero (nanochat's init would make every block
    the identity);
    width 64: int4 needs layers of multiples of 64 outputs."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(depth, vocab, 32, aspect_ratio=width // depth, head_dim=32))
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.2)  # not nanochat's near-zero head: a frozen one must still say something
    return model


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)

# -----------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_full_rank_lora_first_step_is_full_finetunings(optimizer):
    """W' = W + s B A, B = 0: dL/dB = s G A^T and dL/dA = s B^T G = 0, G = dL/dW. One step moves B alone, and the
    merged update is s dB A. SGD: s dB A = -lr s^2 G A^T A = -lr G whenever s^2 A^T A = I, i.e. A with orthonormal
    columns over s, which needs rank >= the layer's input width ("full width"). AdamW: its first step is
    -lr g / (|g| + eps) elementwise, so with A = [I; 0] / s, dB = -lr [G / (|G| + eps), 0] and s dB A is full
    AdamW's first step exactly (up to eps, 1e-10 here). Full fine-tuning trains the same matrices, nothing else."""
    model = tiny()
    x, y = torch.randint(0, 96, (2, 2, 24)).unbind(0)
    lr = 0.01 if optimizer == "adamw" else 30.0  # SGD's step is lr * G, and these gradients are ~1e-4
    rank = 256  # >= every input width: 64, and 256 for the MLP's down projection
    full = copy.deepcopy(model).requires_grad_(False)
    targets = [m.weight for m in full.transformer.h.modules() if isinstance(m, nn.Linear)]
    lora = copy.deepcopy(model)
    add_lora(lora, rank, alpha=2.0 * rank)  # s = 2
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers_of(lora):
            n = layer.in_features
            if optimizer == "adamw":
                A = torch.eye(rank, n)
            else:
                A = torch.linalg.qr(torch.randn(rank, n, generator=gen))[0]  # (rank, n), A^T A = I
            layer.lora_A.copy_(A / layer.scaling)
    for p in targets:
        p.requires_grad_(True)
    if optimizer == "adamw":
        opt_full = AdamW([dict(params=targets, lr=lr)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
        [opt_lora] = lora.setup_optimizers(lora_lr=lr * (64 / 768) ** 0.5)  # undo the width scaling: lr
    else:
        opt_full = torch.optim.SGD(targets, lr=lr)
        opt_lora = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=lr)
    for m, opt in ((full, opt_full), (lora, opt_lora)):
        m(x, y).backward()
        opt.step()
    merge_lora(lora)
    start, want, got = model.state_dict(), full.state_dict(), lora.state_dict()
    assert want.keys() == got.keys()
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    assert moved > 1e-3  # the step did move the weights ...
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-3 * moved  # ... and both the same way


def lora_layers_of(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@pytest.mark.parametrize("quantize", ["", "int8", "int4"])
def test_merged_adapters_give_the_same_logits(quantize):
    model = tiny()
    add_lora(model, 4, alpha=8.0, quantize=quantize, group_size=32)
    randomize_adapters(model)
    idx = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        unmerged = model(idx)
        with lora_disabled(model):
            base = model(idx)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapters do something
    merge_lora(model)
    layers = [m for b in model.transformer.h for m in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.c_proj,
                                                         b.mlp.c_fc, b.mlp.c_proj)]
    assert model.lora is None and all(type(m) is nn.Linear for m in layers)  # a plain GPT (de-quantized if it was)
    assert model.state_dict().keys() == GPT(model.config).state_dict().keys()  # and saves as one
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point())
    with torch.no_grad():
        assert torch.allclose(model(idx), unmerged, atol=1e-4)


def test_only_adapters_change_and_the_optimiser_holds_only_them():
    for quantize in ("", "int4"):
        model = tiny()
        add_lora(model, 4, alpha=8.0, targets="q,v,down", quantize=quantize, group_size=32)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        [opt] = model.setup_optimizers()
        adapters = {id(p) for name, p in model.named_parameters() if ".lora_" in name}
        assert {id(p) for g in opt.param_groups for p in g["params"]} == adapters and len(adapters) == 2 * 3
        idx = torch.randint(0, 96, (2, 25))
        for _ in range(3):
            model(idx[:, :-1], idx[:, 1:]).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {k for k in before if k.endswith((".lora_A", ".lora_B"))}, (quantize, changed)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_qlora_loss_decreases(quantize):
    model = tiny(depth=2)
    add_lora(model, 8, alpha=16.0, quantize=quantize, group_size=32)
    assert isinstance(model.transformer.h[0].attn.c_q.base, QuantLinear)
    [opt] = model.setup_optimizers(lora_lr=0.01)
    idx = torch.randint(0, 96, (4, 25), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(25):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_lora_settings():
    model = tiny()
    for kwargs, message in [(dict(rank=0), "rank >= 1"), (dict(rank=2, targets="q,x"), "targets"),
                            (dict(rank=2, dropout=1.0), "dropout"), (dict(rank=2, alpha=0.0), "alpha"),
                            (dict(rank=2, quantize="int3"), "quantize")]:
        with pytest.raises(ValueError, match=message):
            add_lora(copy.deepcopy(model), **kwargs)
    add_lora(model, 2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, 2)

# -----------------------------------------------------------------------------
# Weight-only quantisation


def test_quantize_dequantize_within_the_formats_bound():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=gen) * 0.05
    w[3, 7] = 2.0  # an outlier: its row's (int8) or group's (int4) scale grows, nobody else's
    w[5] = 0.0  # an all-zero row
    w[6] = 1.0  # a constant row: min == max in every group
    # int8: |w - q scale| <= scale / 2 per row, codes in [-127, 127], and the outlier itself is exact-ish
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (w - q.float() * scale.float()[:, None]).abs()
    assert (err <= scale.float()[:, None] / 2 + 1e-7).all()
    assert err[5].max() == 0 and err[0].max() < 0.05 * 2 * 3 / 127  # a row of N(0, .05^2): scale ~ max|w| / 127
    # int4: |w - ((q - 8) scale + zero)| <= scale / 2 per group
    for group in (32, 64, 128):
        packed, sz = quantize_int4(w, group)
        assert packed.shape == (128, 128) and packed.dtype == torch.uint8 and sz.shape == (256 // group, 128, 2)
        codes = unpack_int4(packed).float().view(128, 256 // group, group)
        scale, zero = sz.float().permute(2, 1, 0)  # (N, G) each
        deq = ((codes - 8) * scale[..., None] + zero[..., None]).view(128, 256)
        err = (w - deq).abs().view(128, 256 // group, group)
        assert (err <= scale[..., None] / 2 + 1e-6).all(), group
        layer = QuantLinear(nn.Linear(256, 128, bias=False), "int4", group)
        layer.weight, layer.scale = packed, sz
        assert torch.equal(layer.dequantize(torch.float32), deq)
    # the int4 layout is torch's CPU kernel's, and unpack inverts it
    codes = torch.randint(0, 16, (192, 64), generator=gen)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        assert torch.equal(pack_int4(codes), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quant_linear_kernel_dequantize_and_gradient_agree(fmt):
    torch.manual_seed(0)
    linear = nn.Linear(128, 192, bias=True)
    layer = QuantLinear(linear, fmt, 64)
    w = layer.dequantize(torch.float32)  # (N, K)
    x = torch.randn(3, 5, 128, requires_grad=True)
    want = torch.nn.functional.linear(x, w, linear.bias)
    # many rows: de-quantize + matmul, differentiable in x (the backward de-quantizes again)
    xs = x.repeat(1, 10, 1)  # 150 rows
    got = layer(xs)
    assert torch.allclose(got[:, :5], want, atol=1e-5)
    got[:, :5].sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, 5, 128), atol=1e-4)
    # a few rows (decoding): torch's packed kernel where it works here, with bf16 activations
    with torch.no_grad():
        few = layer(x[:, :2])
    scale = want.abs().max().item()
    tolerance = 0.02 * scale if _packed_kernel_ok("cpu", fmt) else 1e-5
    assert torch.allclose(few, want[:, :2].detach(), atol=tolerance)


def test_quantized_model_is_the_float_model_of_its_dequantized_weights():
    model = tiny(depth=2, vocab=200)
    model.config.tie_embeddings = True  # a tied model: the head's int8 table also serves the lookups
    model.tie_weights()
    fp32 = weight_bytes(model)
    idx = torch.randint(0, 200, (8, 12))  # 96 rows: de-quantize + matmul; 12 rows: the kernels (bf16 activations)
    for fmt, ratio in (("int8", 0.27), ("int4", 0.21)):
        q = quantize_model(copy.deepcopy(model), fmt, 32)
        assert q.transformer.wte.weight is q.lm_head.weight and weight_bytes(q) < ratio * fp32, fmt  # one table
        # the independent reference: the float GPT with the de-quantized weights
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for mine, theirs in zip(q.modules(), reference.modules()):
                if isinstance(mine, QuantLinear):
                    theirs.weight.copy_(mine.dequantize(torch.float32))
            want = reference(idx)
            assert torch.allclose(q(idx), want, atol=1e-4), fmt
            scale = want.abs().max()
            assert (q(idx[:1]) - want[:1]).abs().max() < 0.05 * scale, fmt
            # cached decoding (a few rows a step: the kernels) continues the full forward (de-quantized)
            prompt, more = [1, 2, 3, 4], [7, 8, 9]
            cache = KVCache(1, 7, q.config, "cpu")
            q(torch.tensor([prompt]), kv_cache=cache)
            stepped = torch.stack([q(torch.tensor([[t]]), kv_cache=cache)[0, -1] for t in more])  # (3, V)
            full = reference(torch.tensor([prompt + more]))[0, 4:]  # (3, V)
            assert (stepped - full).abs().max() < 0.05 * scale, fmt
    with pytest.raises(ValueError, match="multiples of 64"):
        quantize_model(tiny(width=32), "int4")


def test_quantized_model_serves_through_the_openai_api(tiny_chat_model, monkeypatch, capsys):  # noqa: F811
    openai = pytest.importorskip("openai")
    model, tok = tiny_chat_model
    quantized = quantize_model(copy.deepcopy(model), "int4")
    server = chat.ChatServer(chat.Engine(quantized, tok), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x",
                               max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "What is 6*7?"}]
        completion = client.chat.completions.create(model="picochat", messages=messages, max_tokens=6, temperature=0)
        assert 1 <= completion.usage.completion_tokens <= 6
        chunks = list(client.chat.completions.create(model="picochat", messages=messages, max_tokens=6,
                                                     temperature=0, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == completion.choices[0].message.content  # greedy: the same reply both ways
    finally:
        server.shutdown()
        server.server_close()
    # the command line: chat.py --quantize loads the checkpoint and quantizes it; a bad format is one line
    run_main(monkeypatch, "chat.py", "--device=cpu", "--source=sft", "--quantize=int8", "--prompt=What is 6*7?",
             "--max_new_tokens=4", "--temperature=0")
    assert "loaded sft model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--quantize must be int8 or int4"):
        run_main(monkeypatch, "chat.py", "--quantize=int3")

def test_evaluate_quantize_measures_the_quantized_model_beside_the_float_one(world, monkeypatch, capsys):
    """evaluate.py --quantize=int4: the section goes beside the float model's (eval_sft_int4.json, not instead of
    eval_sft.json), names the format, and its bpb is the quantized model's, not the float one's."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer()
    model = tiny(width=64, vocab=tok.vocab_size)  # int4 needs outputs in multiples of 64
    model.config = config_from_depth(1, tok.vocab_size, 64, aspect_ratio=64, head_dim=32)
    meta = {"step": 1, "model_config": dataclasses.asdict(model.config), "tokenizer_hash": tok.hash}
    common.save_checkpoint(common.checkpoint_dir("sft", "tiny"), 1, model.state_dict(), None, meta)
    sections = {}
    for fmt in ("", "int4"):
        run_main(monkeypatch, "evaluate.py", "--device=cpu", "--source=sft", "--task=bpb", "--eval_tokens=2048",
                 "--dtype=float32", f"--quantize={fmt}")
        name = "eval_sft" + (f"_{fmt}" if fmt else "")
        with open(os.path.join(world, "report", f"{name}.json")) as f:
            sections[fmt] = json.load(f)
    assert "int4 weights" in capsys.readouterr().out
    assert sections["int4"]["checkpoint"]["quantize"] == "int4" and "quantize" not in sections[""]["checkpoint"]
    quantized = quantize_model(common.load_model("sft", "cpu")[0], "int4")
    want = evaluate.eval_bpb(quantized, tok, "cpu", contextlib.nullcontext(), 2048)["bpb"]
    got, float_bpb = sections["int4"]["metrics"]["bpb"], sections[""]["metrics"]["bpb"]
    assert got == pytest.approx(want, rel=1e-6) and 0 < abs(got - float_bpb) < 0.05 * float_bpb


# -----------------------------------------------------------------------------
# The stages with --lora_rank


def run_sft(monkeypatch, *args):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # setup_device leaves the thread count alone
    run_main(monkeypatch, "sft.py", "--device=cpu", *args)


def test_sft_qlora_saves_adapters_resumes_exactly_and_loads_merged(world, monkeypatch, capsys):
    from tokenizer import load_tokenizer
    tok = load_tokenizer()
    config = config_from_depth(1, tok.vocab_size, 64, aspect_ratio=64, head_dim=32)
    base = tiny(width=64, vocab=tok.vocab_size)  # a random base (sft needs no trained one to be tested)
    base.config = config
    meta = {"step": 1, "model_config": dataclasses.asdict(config), "tokenizer_hash": tok.hash}
    common.save_checkpoint(common.checkpoint_dir("base", "tiny"), 1, base.state_dict(), None, meta)
    args = ["--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256", "--dtype=float32",
            "--eval_every=0", "--num_iterations=4", "--save_every=2", "--lora_rank=4", "--quantize=int4"]
    run_sft(monkeypatch, *args)
    assert "over an int4 base (QLoRA)" in capsys.readouterr().out
    ckpt = common.checkpoint_dir("sft", "tiny")
    state, _, meta = common.load_checkpoint(ckpt, 4, load_rank_state=False)
    assert set(state) == {f"transformer.h.0.{p}.lora_{ab}" for p in ("attn.c_q", "attn.c_k", "attn.c_v",
                                                                       "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                          for ab in "AB"}
    assert meta["lora"]["base"] == {"stage": "base", "model_tag": "tiny", "step": 1}
    assert torch.load(os.path.join(ckpt, "model_000004.pt"), weights_only=True).keys() == state.keys()
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith("lora_B"))  # trained
    # resume: drop step 4 (its meta first, as a crash between files would leave it), go on from step 2
    os.remove(os.path.join(ckpt, "meta_000004.json"))
    run_sft(monkeypatch, *args, "--resume=1")
    assert "resumed from" in capsys.readouterr().out
    again, _, _ = common.load_checkpoint(ckpt, 4, load_rank_state=False)
    assert all(torch.equal(again[k], state[k]) for k in state)  # bit-exact
    # load_model merges the adapters into the base they name, int4 as trained (the function trained, de-quantized)
    merged, _, _ = common.load_model("sft")
    plain, _, _ = common.load_model("base")
    unrounded = copy.deepcopy(plain)
    for model, quantize in ((plain, "int4"), (unrounded, "")):
        add_lora(model, 4, meta["lora"]["alpha"], quantize=quantize)
    with torch.no_grad():
        for model in (plain, unrounded):
            for name, p in model.named_parameters():
                if name in state:
                    p.copy_(state[name])
        idx = torch.randint(0, config.vocab_size, (2, 24))  # 48 rows: de-quantize + matmul, not the bf16 kernels
        assert torch.allclose(merged(idx), plain(idx), atol=1e-4)
        assert not torch.allclose(merged(idx), unrounded(idx), atol=1e-3)  # not the adapters on the unrounded base
    # resuming adapters without LoRA is one clear line
    with pytest.raises(SystemExit, match="holds LoRA adapters"):
        common.resume_checkpoint(ckpt, common.load_model("base")[0], [], 0, "cpu", {})


def test_rl_and_dpo_with_lora_use_the_base_as_reference_without_a_copy(sft_model, monkeypatch):  # noqa: F811
    real_deepcopy = copy.deepcopy

    def no_model_copies(obj, *args):
        assert not isinstance(obj, GPT), "a second copy of the model"
        return real_deepcopy(obj, *args)
    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    report = run_rl(monkeypatch, "--lora_rank=4", "--num_steps=2", "--eval_every=0", "--kl_coef=0.5",
                    "--lr_scale=1.0")
    kl = [v for _, v in report["history"]["kl"]]
    assert kl[0] == 0.0 and kl[1] > 0  # the first step's policy is the base (B = 0); then it moves away from it
    adapters = rl_weights(2)
    assert all(".lora_" in k for k in adapters)
    merged, _, _ = common.load_model("rl")
    assert any(not torch.equal(merged.state_dict()[k], sft_model[k]) for k in sft_model)
    report = run_rl(monkeypatch, "--lora_rank=4", "--dpo_problems=4", "--num_steps=1", "--eval_every=0",
                    script="dpo.py")
    assert report["history"]["loss"][0][1] == pytest.approx(0.6931, abs=1e-4)  # log 2: the policy is the reference


# -----------------------------------------------------------------------------
# DDP: two gloo ranks training adapters end bit-identical, and equal to one process on the mean gradient


def _lora_ddp_worker(rank, out):
    model = _lora_ddp_steps(rank)
    torch.save(lora_state_dict(model), os.path.join(out, f"rank{rank}.pt"))


def _lora_ddp_steps(rank):
    """Two AdamW steps of the adapters; rank None: one process on both ranks' data."""
    model = tiny()
    add_lora(model, 4, alpha=8.0, seed=3)
    [opt] = model.setup_optimizers()
    for step in range(2):
        idx = torch.randint(0, 96, (2, 2, 17), generator=torch.Generator().manual_seed(step))
        rows = [rank] if rank is not None else [0, 1]
        (sum(model(idx[r][:, :-1], idx[r][:, 1:]) for r in rows) / len(rows)).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model


def test_lora_ddp_two_ranks_match_one_process(tmp_path):
    gloo_ranks(tmp_path, _lora_ddp_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    single = lora_state_dict(_lora_ddp_steps(None))
    assert all(torch.allclose(single[k], r0[k], atol=1e-6) for k in r0)

"""model.py: the forward pass against a reference written from the formulas (complex-number RoPE, softcap, ReLU^2
and SwiGLU by hand), KV-cache decoding == full forward, generation (forcing, sampling filters), the optimisers (loss
falls, Muon's update orthogonal, DDP split over 2 gloo ranks), variants, FLOP count and bad input."""
import os

import pytest
import torch

from conftest import gloo_ranks
from model import (GPT, GPTConfig, KVCache, Muon, RMSNorm, _compiled_decode_step, apply_rotary, config_from_depth,
                   generate, orthogonalize, param_floor, sample_next)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: OpenMP threads only add sync overhead (20x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kwargs):
    args = dict(depth=2, vocab_size=64, sequence_len=32, aspect_ratio=16, head_dim=8)
    args.update(kwargs)
    torch.manual_seed(0)
    model = GPT(config_from_depth(**args))
    model.init_weights()
    # zero-initialised output projections would make every block the identity: randomise for meaningful checks
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def test_config_from_depth_sizes_and_shapes():
    c = config_from_depth(6, 4096, 512, head_dim=64)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (384, 6, 6, 64)
    c = config_from_depth(3, 100, 16, aspect_ratio=10, head_dim=16, n_kv_head=1)  # 30 rounds up to 32
    assert (c.n_embd, c.n_head, c.n_kv_head) == (32, 2, 1)
    model = tiny(n_kv_head=1)
    idx = torch.randint(0, 64, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 64) and logits.dtype == torch.float32
    targets = idx.clone()
    targets[0, :5] = -1
    loss = model(idx, targets)
    per_token = model(idx, targets, loss_reduction="none")
    assert loss.dim() == 0 and per_token.shape == (3, 20) and (per_token[0, :5] == 0).all()
    assert torch.allclose(per_token.sum() / (targets != -1).sum(), loss, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(mlp="swiglu"), dict(norm_weight=True), dict(mlp="swiglu", norm_weight=True,
                                                                                        mlp_hidden=24)])
def test_variants_forward_and_train(variant):
    model = tiny(**variant)
    idx = torch.randint(0, 64, (2, 12))
    assert model(idx).shape == (2, 12, 64)
    model(idx, idx).backward()
    assert all(p.grad is not None for p in model.parameters())
    if variant.get("norm_weight"):
        assert sum(p.dim() == 1 for p in model.parameters()) == 2 * 4 + 2  # 4 norms per block, in and final
    adamw, muon = model.setup_optimizers()
    for opt in (adamw, muon):
        opt.step()

# -----------------------------------------------------------------------------
# The forward pass against a reference written from the formulas, not from model.py's code


def reference_logits(model, idx):
    """GPT logits from the papers' formulas: RoPE as multiplication of each pair (x_j, x_{j+D/2}) by the complex
    number e^(i pos theta_j), theta_j = rope_theta^(-2j/D); attention as an explicit causal softmax with each kv
    head repeated for its query heads; ReLU^2 or SwiGLU = (gate sigmoid(gate)) * up; the tanh softcap."""
    c, (B, T), D = model.config, idx.shape, model.config.head_dim
    theta = c.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)  # (T, D/2)
    w = lambda p: None if p is None else p.detach().double()  # noqa: E731

    def norm(x, gain):
        y = x / (x.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
        return y if gain is None else y * w(gain)

    def rope(x):  # (B, T, H, D)
        z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * rotation[:, None]  # (B, T, H, D/2)
        return torch.cat([z.real, z.imag], dim=-1)

    x = norm(w(model.transformer.wte.weight)[idx], model.transformer.norm_in.weight)  # (B, T, C)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, T) True above the diagonal
    for block in model.transformer.h:
        a = block.attn
        h = norm(x, block.norm_1.weight)
        q = rope(norm((h @ w(a.c_q.weight).T).view(B, T, c.n_head, D), a.q_norm.weight))
        k = rope(norm((h @ w(a.c_k.weight).T).view(B, T, c.n_kv_head, D), a.k_norm.weight))
        v = (h @ w(a.c_v.weight).T).view(B, T, c.n_kv_head, D)
        k, v = (t.repeat_interleave(c.n_head // c.n_kv_head, dim=2) for t in (k, v))  # (B, T, H, D)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5  # (B, H, T, T)
        attention = scores.masked_fill(future, float("-inf")).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", attention, v).reshape(B, T, c.n_head * D)
        x = x + y @ w(a.c_proj.weight).T
        h = norm(x, block.norm_2.weight) @ w(block.mlp.c_fc.weight).T
        if c.mlp == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = gate * torch.sigmoid(gate) * up
        else:
            h = torch.relu(h) ** 2
        x = x + h @ w(block.mlp.c_proj.weight).T
    logits = norm(x, model.transformer.norm_f.weight) @ w(model.lm_head.weight).T  # (B, T, V)
    return c.softcap * torch.tanh(logits / c.softcap)


@pytest.mark.parametrize("variant", [dict(n_kv_head=1), dict(mlp="swiglu", norm_weight=True, mlp_hidden=24)])
def test_forward_matches_the_reference_formulas(variant):
    model = tiny(**variant)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # learnable norm gains: away from 1, so that they count
                p.uniform_(0.5, 1.5)
    idx = torch.randint(0, 64, (2, 20))
    assert torch.allclose(model(idx).double(), reference_logits(model, idx), atol=1e-4)


def test_rope_rotates_each_pair_by_its_complex_phase():
    model = tiny()
    T, D = 20, model.config.head_dim
    x = torch.randn(2, T, 3, D)  # (B, T, H, D)
    ours = model_rotary(model, x)
    theta = 10000.0 ** (-torch.arange(0, D, 2) / D)  # (D/2,)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones(T, D // 2),
                                                                       torch.arange(T)[:, None] * theta)[:, None]
    assert torch.allclose(ours, torch.cat([z.real, z.imag], dim=-1), atol=1e-5)
    # what that means: a query-key score depends only on the distance between the two positions
    q, k = torch.randn(D), torch.randn(D)
    at = lambda v, pos: model_rotary(model, v.expand(1, T, 1, D))[0, pos, 0]  # noqa: E731
    assert torch.allclose(at(q, 7) @ at(k, 3), at(q, 15) @ at(k, 11), atol=1e-4)


def model_rotary(model, x):
    """model.py's RoPE on x (B, T, H, D) at positions 0..T-1, with the model's own cos/sin tables."""
    T = x.size(1)
    return apply_rotary(x, model.cos[None, :T, None], model.sin[None, :T, None])


def test_softcap_bounds_logits_that_would_exceed_it():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # raw logits well past the cap of 15
    uncapped = GPT(GPTConfig(**{**model.config.__dict__, "softcap": 0.0}))
    uncapped.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (2, 12))
    raw, capped = uncapped(idx), model(idx)
    assert raw.abs().max() > 30 and capped.abs().max() < 15
    assert torch.allclose(capped, 15 * torch.tanh(raw / 15), atol=1e-4)


def test_rms_norm_matches_torch_and_its_backward_is_exact():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(16, weight=False)
    assert torch.allclose(norm(x), torch.nn.functional.rms_norm(x, (16,)))
    assert torch.autograd.gradcheck(norm, (x,))


def test_cached_decoding_equals_full_forward_with_different_lengths():
    model = tiny(n_kv_head=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    steps = list(generate(model, prompts, max_new_tokens=6, temperature=0.0))
    assert len(steps) == 6
    for b, prompt in enumerate(prompts):
        tokens = prompt + [s[b][0] for s in steps]
        full = model(torch.tensor([tokens]))[0]  # (T, V)
        # greedy decoding from the cache picked the argmax of the full forward's logits at every step
        assert [s[b][0] for s in steps] == full[len(prompt) - 1:-1].argmax(-1).tolist()
    # and the cached logits themselves match: prefill two rows at different lengths, then decode 3 tokens
    cache = KVCache(2, 16, model.config, "cpu")
    single = [KVCache(1, len(p), model.config, "cpu") for p in prompts[:2]]
    for b, p in enumerate(prompts[:2]):
        model(torch.tensor([p]), kv_cache=single[b])
        cache.copy_rows([b], single[b])
    seqs = [list(p) for p in prompts[:2]]
    for t in range(3):
        new = [[20 + t], [30 + t]]
        step_logits = model(torch.tensor(new), kv_cache=cache)[:, -1]  # (2, V)
        for b in range(2):
            seqs[b] += new[b]
            full = model(torch.tensor([seqs[b]]))[0, -1]
            assert torch.allclose(step_logits[b], full, atol=1e-4), (t, b)
    # a multi-token chunk appended to a non-empty cache, rows at different lengths
    chunk = model(torch.tensor([[40, 41], [42, 43]]), kv_cache=cache)  # (2, 2, V)
    for b, new in enumerate([[40, 41], [42, 43]]):
        full = model(torch.tensor([seqs[b] + new]))[0, -2:]
        assert torch.allclose(chunk[b], full, atol=1e-4)


def test_cached_decoding_of_aligned_rows_equals_full_forward():
    # rows at one length take the cache's unmasked path: a slice of RoPE positions, and a single new token that
    # must see every cached key (SDPA's is_causal alone would show it only the first)
    model = tiny(n_kv_head=1)
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    cache = KVCache(2, 16, model.config, "cpu")
    model(torch.tensor(seqs), kv_cache=cache)
    assert cache.aligned and cache.attn_mask(1) is None
    for new in ([[20], [30]], [[21], [31]], [[22, 23], [32, 33]]):  # then a chunk of 2: causal within it
        step_logits = model(torch.tensor(new), kv_cache=cache)  # (2, T, V)
        for b in range(2):
            seqs[b] += new[b]
            full = model(torch.tensor([seqs[b]]))[0, -len(new[b]):]  # (T, V)
            assert torch.allclose(step_logits[b], full, atol=1e-4), (new, b)


def test_inference_normalises_and_rotates_q_and_k_together_with_the_same_result():
    # without gradients attention norms and rotates q and k as one tensor (fewer ops per decoded token)
    model = tiny(n_kv_head=1)
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        together = model(idx)
    assert torch.allclose(together, model(idx), rtol=0, atol=1e-6)


def prefilled(model, prompts, max_len, static):
    """A cache of len(prompts) rows prefilled as generate does (one batch-1 prefill per row, copied in)."""
    cache = KVCache(len(prompts), max_len, model.config, "cpu", static=static)
    for b, p in enumerate(prompts):
        single = KVCache(1, len(p), model.config, "cpu")
        model(torch.tensor([p]), kv_cache=single)
        cache.copy_rows([b], single)
    return cache


@pytest.mark.parametrize("variant", [dict(n_kv_head=1), dict(positions="learned", norm="layernorm", norm_eps=1e-5,
                                                                 qk_norm=False, bias=True, mlp="gelu_tanh")])
def test_static_cache_decode_step_equals_the_cached_forward(variant):
    # GPT.decode_step (what generate(compile=True) compiles) writes at each row's position and attends over the
    # whole static cache under a mask: the same logits as the growing cache's forward, up to float32 rounding
    model = tiny(**variant)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    dynamic, static = prefilled(model, prompts, 12, False), prefilled(model, prompts, 12, True)
    for t in range(5):  # up to the last position of the longest row
        new = torch.tensor([[20 + t], [30 + t], [40 + t]])  # (3, 1)
        expected = model(new, kv_cache=dynamic)[:, -1]  # (3, V)
        model.check_room(static, 1)
        logits = model.decode_step(new, static)
        static.advance(1)
        assert torch.allclose(logits, expected, rtol=0, atol=1e-5), t
    with pytest.raises(ValueError, match="cannot take 1 more"):
        model.check_room(static, 1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_generate_gives_the_eager_tokens_and_logits(dtype, atol):
    # bf16: the compiled graph rounds its intermediates to bf16 as eager does (emulate_precision_casts); without it
    # fused kernels keep them in fp32 and a greedy token of this random model changed
    model = tiny(depth=1, n_kv_head=1).to(dtype)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [6, 7]]
    run = lambda compile: [[e[0] for e in s] for s in generate(model, prompts, 8, temperature=0.0,  # noqa: E731
                                                                 compile=compile)]
    assert run(True) == run(False)
    static = prefilled(model, prompts, 9, True)
    new = torch.tensor([[20], [30], [40]])
    with torch.inference_mode():
        compiled = _compiled_decode_step()(model, new, static)  # (3, V); the cache is not advanced: the eager step
        assert torch.allclose(compiled, model.decode_step(new, static), rtol=0, atol=atol)  # writes the same keys


def test_samples_share_one_prefill_and_seed_reproduces(monkeypatch):
    model = tiny()
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, **kw: calls.append(tuple(idx.shape)) or forward(idx, **kw))
    prompts = [[1, 2, 3]] * 4 + [[5, 6]] * 4
    run = lambda: [[e[0] for e in s] for s in generate(model, prompts, 5, temperature=1.0, seed=3)]  # noqa: E731
    first = run()
    assert calls[:2] == [(1, 3), (1, 2)] and all(shape == (8, 1) for shape in calls[2:])  # 2 prefills, batch decode
    assert run() == first
    assert len({tuple(s[i] for s in first) for i in range(4)}) > 1  # the samples differ


def test_generate_with_forced_tokens_and_stop():
    model = tiny()
    stop = 63

    def force(row, generated):  # after the first token of row 0, force [7, 8, stop]
        return [7, 8, stop] if row == 0 and len(generated) == 1 else None

    steps = list(generate(model, [[1, 2], [3, 4, 5]], max_new_tokens=8, temperature=0.0, stop_tokens=[stop],
                          force=force))
    row0 = [s[0] for s in steps]
    assert [e[1] for e in row0[:4]] == [False, True, True, True]
    assert [e[0] for e in row0[1:4]] == [7, 8, stop]
    # a forced stop token does not end the row (Qwen3's tool result is forced in with its end of turn)
    assert all(e is not None and not e[1] and e[0] != stop for e in row0[4:])
    row1 = [s[1] for s in steps]
    assert len(steps) == 8 and all(e is not None and not e[1] for e in row1)
    # a sampled one does, right after it
    assert list(generate(model, [[3, 4, 5]], 8, temperature=0.0, stop_tokens=[row1[0][0]])) == [[(row1[0][0], False)]]
    # the forced tokens were really fed in: row 0's next logits follow from the prompt plus them
    greedy = list(generate(model, [[1, 2, row0[0][0], 7, 8]], 1, temperature=0.0))
    assert greedy[0][0][0] == model(torch.tensor([[1, 2, row0[0][0], 7, 8]]))[0, -1].argmax().item()


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    top2 = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...: top_p 0.8 keeps {0, 1}, 0.9 keeps {0, 1, 2}
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=gen).tolist()) == {0, 1, 2}
    assert probs[:2].sum() < 0.9 < probs[:3].sum()
    assert (sample_next(logits, 0.0) == 0).all()


def test_param_floor_bounds_the_count_without_building():
    variants = [{}, dict(mlp="swiglu"), dict(norm_weight=True, n_kv_head=1), dict(
        mlp="gelu_tanh", bias=True, positions="learned", tie_embeddings=True, norm="layernorm", norm_eps=1e-5,
        qk_norm=False)]
    counts = [(param_floor(tiny(**kw).config), tiny(**kw).num_params()) for kw in variants]
    assert counts[0][0] == counts[0][1]  # exact for nanochat's architecture
    assert all(0.7 * n < floor <= n for floor, n in counts)


def test_sampling_is_numerically_safe_for_every_value_the_api_accepts():
    # temperatures and top_p that round to 0 in float32 once gave NaN probabilities (and HTTP 500): they act
    # as greedy sampling now, and a temperature just above the cut still samples from finite probabilities
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 100, generator=gen) * 5  # (B, V)
    greedy = logits.argmax(dim=-1)
    for temperature, top_k, top_p in [(1e-40, 0, 1.0), (5e-324, 50, 1.0), (1e-6, 0, 0.5), (1.0, 0, 1e-46),
                                      (2.0, 5, 5e-324), (1e-40, 0, 1e-46)]:
        assert torch.equal(sample_next(logits, temperature, top_k, top_p, generator=gen), greedy)
    assert (sample_next(logits, 2e-5, 0, 1.0, generator=gen) >= 0).all()
    model = tiny()
    model.init_weights()
    steps = list(generate(model, [[1, 2, 3]], 4, temperature=5e-324, top_p=1e-46, seed=0))
    assert len(steps) == 4


def test_orthogonalize_singular_values_near_one():
    torch.manual_seed(0)
    for shape in [(64, 64), (96, 32), (32, 96)]:
        # a spectrum spanning 1 .. 3e-3 (relative), the range Polar Express is documented to map into [0.86, 1.14]
        n = min(shape)
        U, _ = torch.linalg.qr(torch.randn(shape[0], n))
        V, _ = torch.linalg.qr(torch.randn(shape[1], n))
        G = 5.0 * U @ torch.diag(torch.logspace(0, -2.5, n)) @ V.T
        O = orthogonalize(G[None].repeat(2, 1, 1))  # batched, as Muon stacks same-shape matrices
        s = torch.linalg.svdvals(O[1])
        assert O.shape == (2, *shape) and s.min() > 0.85 and s.max() < 1.15, (shape, s.min(), s.max())
        # and it is the polar factor U V^T, up to that band
        assert torch.allclose(O[0], U @ V.T, atol=0.15)


def test_muon_update_is_the_orthogonalised_gradient():
    """One step from zero on a gradient whose singular values span 500x: the update (divided by lr and the
    aspect scale sqrt(rows / cols)) is the polar factor U V^T, its singular values where Polar Express puts them."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(48, 16))
    V, _ = torch.linalg.qr(torch.randn(16, 16))
    p = torch.nn.Parameter(torch.zeros(48, 16))
    p.grad = 5.0 * U @ torch.diag(torch.logspace(0, -2.7, 16)) @ V.T
    Muon([p], lr=0.1, momentum=0.95).step()
    update = -p.detach() / (0.1 * 3 ** 0.5)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.85 and s.max() < 1.15, s
    assert torch.allclose(update, U @ V.T, atol=0.15)


def test_loss_falls_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, 64, 32, aspect_ratio=32, head_dim=16))
    model.init_weights()
    adamw, muon = model.setup_optimizers()
    assert all("initial_lr" in g for opt in (adamw, muon) for g in opt.param_groups)
    assert isinstance(muon, Muon) and {id(p) for g in muon.param_groups for p in g["params"]} == {
        id(p) for b in model.transformer.h for p in b.parameters() if p.dim() == 2}
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, y)
        loss.backward()
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_kernels_hook_matches_the_pytorch_path():
    pytest.importorskip("kernels")
    model = tiny()
    hooked = GPT(GPTConfig(**{**model.config.__dict__, "use_kernels": True}))
    hooked.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (2, 12))
    assert torch.allclose(hooked(idx, idx), model(idx, idx), atol=1e-5)  # the fused head + cross-entropy
    assert torch.allclose(hooked(idx), model(idx), atol=1e-5)  # kernels.attention


def test_estimate_flops_hand_count():
    model = GPT(GPTConfig(sequence_len=8, vocab_size=10, n_layer=1, n_head=2, n_kv_head=1, n_embd=4, head_dim=2))
    # matmul weights: q 4x4, k 4x2, v 4x2, proj 4x4, fc 4x16, mlp proj 16x4, head 4x10
    n = 16 + 8 + 8 + 16 + 64 + 64 + 40
    assert model.estimate_flops() == 6 * n + 12 * 1 * 2 * 2 * 8
    assert model.num_params() == n + 10 * 4  # + embedding


def test_bad_input_errors():
    with pytest.raises(ValueError, match="depth"):
        config_from_depth(0, 64, 32)
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        config_from_depth(2, 64, 32, aspect_ratio=48, head_dim=32, n_kv_head=2)  # 3 heads, 2 kv heads
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(mlp="gelu")
    model = GPT(config_from_depth(1, 16, 4, aspect_ratio=16, head_dim=8))
    model.init_weights()
    model(torch.zeros(1, 40, dtype=torch.long))  # 10x sequence_len is allowed
    with pytest.raises(ValueError, match="rotary cache"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt"):
        next(generate(model, [[1], []], 3))

# -----------------------------------------------------------------------------
# DDP: two gloo ranks with different data end bit-identical, and equal to one process on the mean grad.


def _ddp_worker(rank, out):
    model = _ddp_model()
    adamw, muon = model.setup_optimizers()
    for step in range(2):
        idx = torch.randint(0, 64, (2, 2, 17), generator=torch.Generator().manual_seed(step))[rank]
        model(idx[:, :-1], idx[:, 1:]).backward()
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


def _ddp_model():
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, 64, 16, aspect_ratio=16, head_dim=8))
    model.init_weights()
    return model


def test_ddp_two_ranks_match_one_process(tmp_path):
    gloo_ranks(tmp_path, _ddp_worker, str(tmp_path))  # both have exited (an error or a signal fails the test)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    model = _ddp_model()
    adamw, muon = model.setup_optimizers()
    for step in range(2):
        idx = torch.randint(0, 64, (2, 2, 17), generator=torch.Generator().manual_seed(step))
        (sum(model(idx[r][:, :-1], idx[r][:, 1:]) for r in range(2)) / 2).backward()
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, r0[k], atol=1e-5), k

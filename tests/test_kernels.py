"""
The Triton kernels of kernels/ checked on CPU through Triton's interpreter, against PyTorch references.

    python -m pytest tests/test_kernels.py -q

TRITON_INTERPRET=1 must be set before triton (and kernels) are imported, hence at the very top; outside this
module's tests it is unset again, so that other tests (and their subprocesses) do not inherit it. Small odd
shapes: the interpreter runs every program in Python. fp32 and fp16 only: the interpreter's bf16 is broken.
"""
import os

_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import kernels  # noqa: E402
import model  # noqa: E402
from kernels import flash_attention, fused_adamw, fused_cross_entropy, fused_norm_rope, newton_schulz  # noqa: E402,E501

if _INTERPRET_BEFORE is None:  # triton decides interpreter vs compiler when a kernel is defined: all done above
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch):
    """Set again while each test here runs: triton's launcher still reads it (lazily imported modules)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

# -----------------------------------------------------------------------------
# Flash attention


def _attention_grads(fn, q, k, v, do, dtype, causal):
    """Output and (dq, dk, dv) of fn on copies of q, k, v cast to dtype."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(dtype)))


@pytest.mark.parametrize("B, H, Hkv, Tq, Tk, D, causal, dtype, layout", [
    (1, 4, 2, 77, 77, 64, True, torch.float32, "bthd"),  # GQA, the model's (B, T, H, D)-strided views
    (1, 2, 1, 77, 77, 64, True, torch.float16, "bhtd"),  # fp16 (the interpreter has no working bf16)
    (1, 2, 2, 45, 45, 128, False, torch.float32, "bhtd"),  # head_dim 128, not causal
    (1, 2, 2, 77, 77, 128, True, torch.float16, "bhtd"),  # head_dim 128, fp16
    (1, 2, 1, 29, 77, 64, True, torch.float32, "bhtd"),  # Tq < Tk: the KV-cache (bottom-right) causal mask
])
def test_attention_matches_sdpa_error(B, H, Hkv, Tq, Tk, D, causal, dtype, layout):
    """FlashAttention's rule: err(kernel vs fp64) <= 2 * err(SDPA in the same dtype vs fp64) + a small floor,
    for the output and all three gradients."""
    torch.manual_seed(0)

    def make(h, t):
        if layout == "bthd":
            return torch.randn(B, t, h, D, dtype=torch.float64).transpose(1, 2)  # (B, h, t, D), strided
        return torch.randn(B, h, t, D, dtype=torch.float64)

    q, k, v, do = make(H, Tq), make(Hkv, Tk), make(Hkv, Tk), make(H, Tq)
    triton_fn = lambda q, k, v, c: kernels.attention(q, k, v, causal=c, impl="triton")  # noqa: E731
    torch_fn = lambda q, k, v, c: kernels.attention(q, k, v, causal=c, impl="torch")  # noqa: E731
    ref = _attention_grads(torch_fn, q, k, v, do, torch.float64, causal)
    sdpa = _attention_grads(torch_fn, q, k, v, do, dtype, causal)
    ours = _attention_grads(triton_fn, q, k, v, do, dtype, causal)
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    for name, r, s, o in zip(("out", "dq", "dk", "dv"), ref, sdpa, ours):
        assert o.shape == r.shape and o.dtype == dtype
        err_ours = (o.double() - r).abs().max().item()
        err_sdpa = (s.double() - r).abs().max().item()
        assert err_ours <= 2 * err_sdpa + floor, f"{name}: kernel err {err_ours:.3g} vs SDPA err {err_sdpa:.3g}"


def test_attention_dispatch(monkeypatch):
    """impl="auto" follows enable(); "torch" is SDPA itself; bad impl names and unsupported inputs are errors."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16)
    calls = []
    real = flash_attention.attention_triton
    monkeypatch.setattr(flash_attention, "attention_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "_enabled", False)
    kernels.attention(q, k, v)
    assert not calls and not kernels.enabled()
    kernels.enable(True)
    assert kernels.enabled() and kernels.available()  # the interpreter counts as available
    torch.testing.assert_close(kernels.attention(q, k, v), kernels.attention(q, k, v, impl="torch"))
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.float16):  # mixed-dtype inputs are cast, as SDPA does
        y = kernels.attention(q, k.half(), v, impl="triton")
        assert y.dtype == torch.float16
        torch.testing.assert_close(y, kernels.attention(q, k, v, impl="torch"), rtol=0, atol=2e-3)
    with pytest.raises(ValueError):
        kernels.attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError):  # 2 query heads cannot share 3 kv heads
        kernels.attention(q, torch.randn(1, 3, 9, 16), torch.randn(1, 3, 9, 16))
    with pytest.raises(ValueError):  # head_dim 24 is not a kernel tile size
        kernels.attention(torch.randn(1, 2, 9, 24), torch.randn(1, 1, 9, 24), torch.randn(1, 1, 9, 24), impl="triton")


def test_import_without_triton(monkeypatch):
    """kernels imports and falls back to PyTorch on a machine without triton."""
    for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    bare = importlib.import_module("kernels")
    assert not bare.HAS_TRITON and not bare.available()
    bare.enable(True)
    q = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(bare.attention(q, q, q), bare.attention_torch(q, q, q))
    with pytest.raises(RuntimeError):
        bare.attention(q, q, q, impl="triton")

# -----------------------------------------------------------------------------
# Fused AdamW

SIZES = [(1,), (300,), (37, 53), (513,)]  # none a multiple of the interpreter's 256-element block


def test_adamw_matches_torch_optim():
    """fp32: kernel and fallback both within 1e-6 of torch.optim.AdamW over several steps."""
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SIZES]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    ours = {impl: ([p.clone() for p in params], [torch.zeros(s) for s in SIZES], [torch.zeros(s) for s in SIZES])
            for impl in ("triton", "torch")}
    for step in range(1, 5):
        grads = [torch.randn(s) for s in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        for impl, (ps, ms, vs) in ours.items():
            kernels.adamw_step(ps, grads, ms, vs, step, 1e-2, 0.8, 0.95, 1e-8, 0.1, impl=impl)
    for impl, (ps, ms, vs) in ours.items():
        for i, p in enumerate(ref):
            state = opt.state[p]
            for mine, theirs in ((ps[i], p.detach()), (ms[i], state["exp_avg"]), (vs[i], state["exp_avg_sq"])):
                assert (mine - theirs).abs().max().item() <= 1e-6, impl


def test_adamw_low_precision_params():
    """fp16 params and grads with fp32 moments (the bf16 code path; the interpreter cannot run bf16), and a
    mixed list: one launch per dtype group, same result as the fp32-math fallback."""
    torch.manual_seed(0)
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32]
    params = [torch.randn(s).to(dt) for s, dt in zip(SIZES, dtypes)]
    state = {impl: ([p.clone() for p in params], [torch.zeros(s) for s in SIZES], [torch.zeros(s) for s in SIZES])
             for impl in ("triton", "torch")}
    for step in range(1, 4):
        grads = [torch.randn(s).to(dt) for s, dt in zip(SIZES, dtypes)]
        for impl, (ps, ms, vs) in state.items():
            kernels.adamw_step(ps, grads, ms, vs, step, 1e-2, 0.9, 0.95, 1e-8, 0.1, impl=impl)
    for a, b in zip(state["triton"], state["torch"]):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=1e-3 if x.dtype == torch.float16 else 0, atol=1e-6)

# -----------------------------------------------------------------------------
# Muon's orthogonalisation


def test_syrk_symmetric_kernel():
    """Upper-triangle tiles mirrored = the full product, on ragged batched shapes, strided input, with C."""
    torch.manual_seed(0)
    X = torch.randn(2, 37, 77)
    A = newton_schulz.syrk(X)
    torch.testing.assert_close(A, X @ X.mT, rtol=1e-5, atol=1e-4)
    B = newton_schulz.syrk(A, alpha=0.5, C=A, beta=-2.0)
    torch.testing.assert_close(B, 0.5 * A @ A - 2.0 * A, rtol=1e-5, atol=1e-2)
    Xt = torch.randn(1, 45, 37).mT  # (1, 37, 45) column-major view
    torch.testing.assert_close(newton_schulz.syrk(Xt), Xt @ Xt.mT, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(37, 53), (2, 45, 20)])  # wide; batched and tall (iterated transposed)
def test_orthogonalize_matches_model(shape, monkeypatch):
    """Within 1e-4 relative of model.py's own iteration in fp32 (the drop-in Muon calls)."""
    monkeypatch.setattr(model, "_fast_bf16", lambda device: False)  # reference in fp32, as the interpreter runs
    torch.manual_seed(0)
    G = torch.randn(*shape)
    ours = kernels.orthogonalize(G, steps=5, impl="triton")
    ref = kernels.orthogonalize(G, steps=5, impl="torch")
    assert ours.shape == G.shape and ours.dtype == G.dtype
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-4

# -----------------------------------------------------------------------------
# Fused LM head + cross-entropy


@pytest.mark.parametrize("softcap, reduction", [(15.0, "mean"), (0.0, "sum")])
def test_linear_cross_entropy_matches_torch(softcap, reduction):
    """Loss and gradients as model.py's logits -> softcap -> F.cross_entropy, with ignored targets, over
    several chunks (the last one ragged) and vocabulary blocks; and loss only under no_grad."""
    torch.manual_seed(0)
    N, C, V = 37, 32, 301  # 3 vocabulary blocks of the interpreter
    x = torch.randn(N, C, requires_grad=True)
    w = (0.3 * torch.randn(V, C)).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[::5] = -1
    ours = kernels.linear_cross_entropy(x, w, targets, softcap, reduction=reduction, impl="triton", chunk_size=16)
    ref = kernels.linear_cross_entropy(x, w, targets, softcap, reduction=reduction, impl="torch")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(1.7 * ours, (x, w)), torch.autograd.grad(1.7 * ref, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # dW sums 37 rows in another order
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear_cross_entropy(x, w, targets, softcap, reduction=reduction,
                                                                impl="triton"), ref.detach(), rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# Fused RMSNorm + RoPE


@pytest.mark.parametrize("B, cos_batch, D, with_weight", [(2, 1, 32, False), (2, 2, 64, True)])
def test_rmsnorm_rope_matches_model(B, cos_batch, D, with_weight):
    """Output and gradients (x, and the gain when present) as model.py's apply_rotary(rms_norm(x)); cos/sin
    shared over the batch (training) or per row (KV-cache decoding)."""
    torch.manual_seed(0)
    T, H = 13, 3
    x = torch.randn(B, T, H, D, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(D)).requires_grad_() if with_weight else None
    angles = torch.randn(cos_batch, T, 1, D // 2)
    cos, sin = angles.cos(), angles.sin()
    inputs = [x] + ([weight] if with_weight else [])
    ours = kernels.rmsnorm_rope(x, cos, sin, weight, impl="triton")
    ref = kernels.rmsnorm_rope(x, cos, sin, weight, impl="torch")  # model.apply_rotary(rms_norm(x))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# End to end: a tiny GPT trains identically with the kernels on and off


def test_training_same_losses_with_kernels(monkeypatch):
    """3 fp32 steps of a tiny GQA model: every kernel that model.py routes through kernels/ (at least attention)
    runs in the interpreter, and the losses match the pure-PyTorch run."""
    monkeypatch.setattr(model, "_fast_bf16", lambda device: False)
    used = set()
    for owner, name in ((flash_attention, "attention_triton"), (fused_adamw, "adamw_step_triton"),
                        (newton_schulz, "orthogonalize_triton"), (fused_cross_entropy.LinearCrossEntropy, "forward"),
                        (fused_norm_rope.NormRope, "forward")):
        real = getattr(owner, name)
        spy = lambda *a, _label=f"{owner.__name__}.{name}", _real=real: used.add(_label) or _real(*a)  # noqa: E731
        monkeypatch.setattr(owner, name, staticmethod(spy) if isinstance(owner, type) else spy)
    monkeypatch.setattr(kernels, "_enabled", True)
    torch.manual_seed(0)
    idx = torch.randint(0, 96, (2, 25))
    losses = {}
    for use_kernels in (False, True):
        torch.manual_seed(0)
        config = model.GPTConfig(sequence_len=24, vocab_size=96, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                                 head_dim=16, use_kernels=use_kernels)
        gpt = model.GPT(config)
        gpt.init_weights()
        optimizers = gpt.setup_optimizers()
        losses[use_kernels] = []
        for _ in range(3):
            loss = gpt(idx[:, :-1], idx[:, 1:])
            loss.backward()
            for opt in optimizers:
                opt.step()
            gpt.zero_grad(set_to_none=True)
            losses[use_kernels].append(loss.item())
    assert "kernels.flash_attention.attention_triton" in used, used
    assert losses[True][-1] < losses[True][0]  # it trains
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) <= 1e-5 * abs(a), (losses, used)

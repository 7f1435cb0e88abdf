"""
Optional hand-written Triton kernels, each with a pure-PyTorch fallback chosen automatically.

    import kernels
    kernels.enable(True)                                   # what --kernels=1 does in the stage scripts
    y = kernels.attention(q, k, v, causal=True)            # flash attention fwd+bwd, GQA
    kernels.adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)
    O = kernels.orthogonalize(G, steps=5)                  # Muon's Newton-Schulz with a symmetric X X^T kernel
    loss = kernels.linear_cross_entropy(x, lm_head.weight, targets, softcap=15.0)   # no (N, V) logits
    q = kernels.rmsnorm_rope(q, cos, sin, weight=None)     # apply_rotary(rms_norm(q)) in one pass

Every entry point takes impl="auto" | "triton" | "torch". "auto" uses the Triton kernel only when the kernels are
enabled, triton is importable and the tensors are on a CUDA device; otherwise the PyTorch fallback.
"triton" forces the kernel. With TRITON_INTERPRET=1 set before triton and this package are imported, the kernels
run on CPU tensors through Triton's interpreter (both for "triton" and, once enabled, for "auto"): that is how
tests/test_kernels.py checks them without a GPU.
This package imports fine without triton; the kernel modules are imported on first use.
"""

import os

import torch

try:
    import triton  # noqa: F401  (only probing that it is importable)
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
# triton reads TRITON_INTERPRET when a kernel is defined, so it counts only if set before this import
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_enabled = False

# -----------------------------------------------------------------------------
# Switches


def available():
    """True when the Triton kernels can run here: triton importable, and a CUDA device (or the interpreter)."""
    return HAS_TRITON and (torch.cuda.is_available() or INTERPRET)


def enable(flag=True):
    """Turn the kernels on or off for impl="auto" (the stage scripts' --kernels=1)."""
    global _enabled
    _enabled = bool(flag)


def enabled():
    return _enabled


def _use_triton(impl, tensor, supported=True):
    """Resolve impl for one call: True -> Triton kernel, False -> PyTorch fallback."""
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' needs the triton package")
        if not tensor.is_cuda and not INTERPRET:
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing triton")
        if not supported:
            raise ValueError("these inputs are not supported by the Triton kernel; use impl='torch'")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return _enabled and available() and (tensor.is_cuda or INTERPRET) and supported

# -----------------------------------------------------------------------------
# Attention


def attention_torch(q, k, v, causal=True):
    """Reference attention through PyTorch's SDPA. Causal with Tq < Tk is bottom-right aligned (KV cache)."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if causal and Tq != Tk:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)  # (Tq, Tk)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def attention(q, k, v, causal=True, impl="auto"):
    """Scaled dot-product attention, scale 1/sqrt(D).
    q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D) with H % Hkv == 0 (GQA) -> (B, H, Tq, D). Differentiable.
    The Triton kernel takes D in {16, 32, 64, 128, 256} and fp16/bf16/fp32."""
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.dim() != 4 or k.size(0) != B or k.size(3) != D or H % k.size(1):
        raise ValueError(f"q {tuple(q.shape)} needs k, v of shape (B, Hkv, Tk, D) with H % Hkv == 0, got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and Tq > k.size(2):
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={k.size(2)}")
    if torch.is_autocast_enabled(q.device.type):
        # as SDPA does under autocast: compute in the autocast dtype, whatever mix of dtypes q, k, v arrive in
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    supported = (D in (16, 32, 64, 128, 256) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
                 and q.dtype == k.dtype == v.dtype)
    if _use_triton(impl, q, supported):
        from kernels.flash_attention import attention_triton
        return attention_triton(q, k, v, causal)
    return attention_torch(q, k, v, causal)

# -----------------------------------------------------------------------------
# AdamW


@torch.no_grad()
def adamw_step_torch(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's single-tensor update, op for op, in fp32 (low-precision params are upcast and rounded
    back once); exp_avgs/exp_avg_sqs are fp32."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32, g32 = p.float(), g.float()  # no copy when already fp32
        p32.mul_(1 - lr * weight_decay)
        m.lerp_(g32, 1 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p32.addcdiv_(m, denom, value=-lr / bias_correction1)
        if p32 is not p:
            p.copy_(p32)


@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, impl="auto"):
    """One AdamW step, in place, over lists of tensors. step counts from 1 (after the increment), like
    torch.optim.AdamW. Params and grads fp32/bf16/fp16; the moments exp_avgs, exp_avg_sqs fp32."""
    if not params:
        return
    supported = all(x.is_contiguous() for x in (*params, *grads, *exp_avgs, *exp_avg_sqs))
    if _use_triton(impl, params[0], supported):
        from kernels.fused_adamw import adamw_step_triton
        adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)
    else:
        adamw_step_torch(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)

# -----------------------------------------------------------------------------
# Muon's orthogonalisation


def orthogonalize(G, steps=5, impl="auto"):
    """Approximate polar factor U V^T of G = U S V^T, G: (..., rows, cols) -> same shape and dtype.
    Exactly model.py's `orthogonalize` (Polar Express quintic iterations, bf16 where fast); the Triton path
    computes the two symmetric Gram products per iteration with a kernel that does only the upper triangle."""
    import model  # the iteration lives in model.py (one piece of code per idea); imported late: model imports us
    if _use_triton(impl, G):
        from kernels.newton_schulz import orthogonalize_triton
        # model.py's dtype choice is bf16 on CUDA; the interpreter (CPU) cannot do bf16, so it runs fp32
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
        return orthogonalize_triton(G, steps, model.POLAR_EXPRESS, dtype)
    return model.orthogonalize(G, steps)

# -----------------------------------------------------------------------------
# LM head + cross-entropy


def linear_cross_entropy_torch(x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    """model.py's loss: fp32 logits x W^T, tanh softcap, cross-entropy (targets == ignore_index ignored)."""
    logits = torch.nn.functional.linear(x, weight).float()  # (N, V)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean", impl="auto",
                         chunk_size=None):
    """Cross-entropy of the softcapped logits x W^T without materialising them: x (N, C), weight (V, C),
    targets (N,) int64 -> scalar loss ("mean" over non-ignored rows, or "sum"). Differentiable in x and weight.
    The Triton path works through chunk_size rows at a time (default: ~256 MiB of logits) and takes reductions
    "mean" and "sum"; "none" always runs the PyTorch path. With every target ignored, "mean" is 0 (not nan)."""
    supported = reduction in ("mean", "sum") and x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16,
                                                                              torch.float32)
    if _use_triton(impl, x, supported):
        from kernels.fused_cross_entropy import LinearCrossEntropy
        need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return LinearCrossEntropy.apply(x, weight, targets.contiguous(), softcap, ignore_index, reduction,
                                        chunk_size, need_grad)
    return linear_cross_entropy_torch(x, weight, targets, softcap, ignore_index, reduction)

# -----------------------------------------------------------------------------
# RMSNorm + RoPE


def rmsnorm_rope_torch(x, cos, sin, weight=None, eps=None):
    """model.py's apply_rotary(rms_norm(x, weight), cos, sin), "rotate_half" layout."""
    import model  # RoPE's layout is defined once, in model.py
    return model.apply_rotary(torch.nn.functional.rms_norm(x, (x.size(-1),), weight, eps), cos, sin)


def rmsnorm_rope(x, cos, sin, weight=None, eps=None, impl="auto"):
    """Fused RMSNorm (optional gain `weight` (D,)) + rotary embedding of x (B, T, H, D) with cos/sin
    (B or 1, T, 1, D/2) -> (B, T, H, D). eps None is rms_norm's default, torch.finfo(x.dtype).eps.
    Differentiable in x and weight. The Triton kernel takes D in {16, 32, 64, 128, 256}."""
    B, T, H, D = x.shape
    if cos.shape != sin.shape or cos.dim() != 4 or cos.size(0) not in (1, B) or cos.shape[1:] != (T, 1, D // 2):
        raise ValueError(f"x {tuple(x.shape)} needs cos, sin of shape (B or 1, T, 1, D/2), got {tuple(cos.shape)}")
    supported = D in (16, 32, 64, 128, 256) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if _use_triton(impl, x, supported):
        from kernels.fused_norm_rope import NormRope
        return NormRope.apply(x, cos, sin, weight, torch.finfo(x.dtype).eps if eps is None else eps)
    return rmsnorm_rope_torch(x, cos, sin, weight, eps)

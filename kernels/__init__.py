"""
Optional hand-written Triton kernels, each with a pure-PyTorch fallback chosen automatically.

    import kernels
    kernels.enable(True)                                   # what --kernels=1 does in the stage scripts
    y = kernels.attention(q, k, v, causal=True)            # flash attention fwd+bwd, GQA
    kernels.adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)
    O = kernels.orthogonalize(G, steps=5)                  # Muon's Newton-Schulz with a symmetric X X^T kernel

Every entry point takes impl="auto" | "triton" | "torch". "auto" uses the Triton kernel only when the kernels are
enabled, CUDA and triton are available and the tensors are on the GPU; otherwise the PyTorch fallback.
"triton" forces the kernel: on CPU tensors that needs TRITON_INTERPRET=1 set before triton and this package are
imported (that is how tests/test_kernels.py checks the kernels without a GPU).
This package imports fine without triton; the kernel modules are imported on first use.
"""

import math
import os

import torch

try:
    import triton  # noqa: F401  (only probing that it is importable)
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

_enabled = False

# -----------------------------------------------------------------------------
# Switches


def available():
    """True when the kernels can run natively: a CUDA device and an importable triton."""
    return HAS_TRITON and torch.cuda.is_available()


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
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing triton")
        if not supported:
            raise ValueError("these inputs are not supported by the Triton kernel; use impl='torch'")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return _enabled and available() and tensor.is_cuda and supported

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
    assert k.shape == v.shape and k.size(0) == B and k.size(3) == D, "k, v must be (B, Hkv, Tk, D)"
    assert H % k.size(1) == 0, "the number of query heads must be a multiple of the number of kv heads"
    assert not causal or Tq <= k.size(2), "causal attention needs Tq <= Tk"
    supported = (D in (16, 32, 64, 128, 256) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
                 and q.dtype == k.dtype == v.dtype)
    if _use_triton(impl, q, supported):
        from kernels.flash_attention import attention_triton
        return attention_triton(q, k, v, causal)
    return attention_torch(q, k, v, causal)

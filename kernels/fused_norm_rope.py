"""
Fused RMSNorm + rotary embedding (RoPE) for the queries and keys, forward and backward.

model.py applies apply_rotary(rms_norm(x, weight), cos, sin) to q and k: in PyTorch that is ~10 elementwise
kernels, each reading and writing the whole (B, T, H, D) tensor. Here one program normalises and rotates a block
of rows in registers: one read of x, one write of y. The backward uses that the rotation is orthogonal (its
gradient is the inverse rotation) and RMSNorm's gradient dx = rstd * (g - xhat * mean(g * xhat)), g = dn * w,
recomputing rstd rather than storing anything but it. Layout as model.py's "rotate_half": pairs (i, i + D/2).
"""

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# Kernels


@triton.jit
def _norm_rope_fwd(X, Y, W, COS, SIN, RSTD, n_rows, T, H, scb, sct, eps,
                   HAS_W: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of the (B*T*H, D) view
    rmask = rows[:, None] < n_rows
    d = tl.arange(0, HALF)
    base = rows.to(tl.int64)[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(X + base, mask=rmask, other=0.0).to(tl.float32)  # (BLOCK_R, HALF) first halves
    x2 = tl.load(X + base + HALF, mask=rmask, other=0.0).to(tl.float32)  # second halves
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)  # (BLOCK_R,)
    n1 = x1 * rstd[:, None]
    n2 = x2 * rstd[:, None]
    if HAS_W:
        n1 *= tl.load(W + d).to(tl.float32)[None, :]
        n2 *= tl.load(W + HALF + d).to(tl.float32)[None, :]
    b = rows // (T * H)
    t = (rows // H) % T
    cs = b[:, None] * scb + t[:, None] * sct + d[None, :]  # cos/sin are (B or 1, T, 1, HALF)
    c = tl.load(COS + cs, mask=rmask, other=0.0).to(tl.float32)
    s = tl.load(SIN + cs, mask=rmask, other=0.0).to(tl.float32)
    tl.store(Y + base, (n1 * c - n2 * s).to(Y.dtype.element_ty), mask=rmask)
    tl.store(Y + base + HALF, (n2 * c + n1 * s).to(Y.dtype.element_ty), mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _norm_rope_bwd(DY, X, W, COS, SIN, RSTD, DX, DW_PARTIAL, n_rows, T, H, scb, sct,
                   HAS_W: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows[:, None] < n_rows
    d = tl.arange(0, HALF)
    base = rows.to(tl.int64)[:, None] * (2 * HALF) + d[None, :]
    dy1 = tl.load(DY + base, mask=rmask, other=0.0).to(tl.float32)
    dy2 = tl.load(DY + base + HALF, mask=rmask, other=0.0).to(tl.float32)
    b = rows // (T * H)
    t = (rows // H) % T
    cs = b[:, None] * scb + t[:, None] * sct + d[None, :]
    c = tl.load(COS + cs, mask=rmask, other=0.0).to(tl.float32)
    s = tl.load(SIN + cs, mask=rmask, other=0.0).to(tl.float32)
    dn1 = dy1 * c + dy2 * s  # the inverse rotation: R^T dy
    dn2 = dy2 * c - dy1 * s
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    xh1 = tl.load(X + base, mask=rmask, other=0.0).to(tl.float32) * rstd[:, None]  # xhat = x * rstd
    xh2 = tl.load(X + base + HALF, mask=rmask, other=0.0).to(tl.float32) * rstd[:, None]
    if HAS_W:  # this block's share of dW; the launcher sums the shares (no atomics: deterministic)
        tl.store(DW_PARTIAL + pid * (2 * HALF) + d, tl.sum(dn1 * xh1, 0))
        tl.store(DW_PARTIAL + pid * (2 * HALF) + HALF + d, tl.sum(dn2 * xh2, 0))
        dn1 *= tl.load(W + d).to(tl.float32)[None, :]
        dn2 *= tl.load(W + HALF + d).to(tl.float32)[None, :]
    proj = (tl.sum(dn1 * xh1, 1) + tl.sum(dn2 * xh2, 1)) / (2 * HALF)  # (BLOCK_R,) mean(g * xhat)
    tl.store(DX + base, ((dn1 - xh1 * proj[:, None]) * rstd[:, None]).to(DX.dtype.element_ty), mask=rmask)
    tl.store(DX + base + HALF, ((dn2 - xh2 * proj[:, None]) * rstd[:, None]).to(DX.dtype.element_ty), mask=rmask)

# -----------------------------------------------------------------------------
# The autograd Function


def _launch_args(x, cos):
    B, T, H, D = x.shape
    n_rows = B * T * H
    block_r = 16 if x.is_cuda else 8  # interpreter: small blocks so test shapes span several, ragged
    cos_b_stride = cos.stride(0) if cos.size(0) > 1 else 0  # (1, T, 1, D/2) broadcasts over the batch
    return n_rows, T, H, D, block_r, triton.cdiv(n_rows, block_r), cos_b_stride


class NormRope(torch.autograd.Function):
    """y = rope(rms_norm(x) * weight): x (B, T, H, D), cos/sin (B or 1, T, 1, D/2), weight (D,) or None."""

    @staticmethod
    def forward(ctx, x, cos, sin, weight, eps):
        x = x.contiguous()
        cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
        n_rows, T, H, D, block_r, n_blocks, scb = _launch_args(x, cos)
        y = torch.empty_like(x)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        _norm_rope_fwd[(n_blocks,)](x, y, weight if weight is not None else x, cos, sin, rstd, n_rows, T, H,
                                    scb, cos.stride(1), eps, HAS_W=weight is not None, HALF=D // 2,
                                    BLOCK_R=block_r, num_warps=4)
        ctx.save_for_backward(x, cos, sin, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, cos, sin, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        n_rows, T, H, D, block_r, n_blocks, scb = _launch_args(x, cos)
        dx = torch.empty_like(x)
        dw_partial = torch.empty(n_blocks, D, device=x.device, dtype=torch.float32) if weight is not None else rstd
        _norm_rope_bwd[(n_blocks,)](dy, x, weight if weight is not None else x, cos, sin, rstd, dx, dw_partial,
                                    n_rows, T, H, scb, cos.stride(1), HAS_W=weight is not None, HALF=D // 2,
                                    BLOCK_R=block_r, num_warps=4)
        dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
        return dx, None, None, dw, None

"""
Fused LM head + softcapped cross-entropy that never materialises the full (N, V) logits.

The loss of the last layer, mean_i [logsumexp_j z_ij - z_i,t_i] with z = s * tanh(x W^T / s) (model.py's softcap),
needs the (N, V) logits only one chunk of rows at a time: for each chunk the logits come from one cuBLAS matmul,
a Triton kernel turns them *in place* into dL/dlogits (softmax(z) - onehot(t)) * (1 - tanh^2) / n (two passes
over the row: an online max/sum for the logsumexp, then the gradient), and two more matmuls give this chunk's dx
and its share of dW. The gradients are thus computed in the forward (as Liger-Kernel's fused linear
cross-entropy does), so the backward only scales them by the incoming scalar gradient. Peak memory is
chunk x V instead of N x V in fp32 plus its softmax copy: at V = 65536, N = 64k tokens that is 16+ GiB saved.
"""

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# Kernel


@triton.jit
def _ce_grad_kernel(LOGITS, TARGETS, LOSS, GRAD_SCALE, stride_row, V, softcap, ignore_index,
                    SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: loss = logsumexp(z) - z[t]; LOGITS row overwritten with dloss/dlogits * grad_scale."""
    row = tl.program_id(0).to(tl.int64)
    grad_scale = tl.load(GRAD_SCALE)  # read on the device: no host sync to count the non-ignored targets
    LOGITS += row * stride_row
    target = tl.load(TARGETS + row)
    # pass 1: online max and sum of exp over the softcapped row (no (V,) buffer: rows can be 100k+ wide)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(LOGITS + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            z = softcap * (2 * tl.sigmoid(2 * z / softcap) - 1)  # s * tanh(z / s); tanh(y) = 2 sigmoid(2y) - 1
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    ignored = target == ignore_index
    # pass 2: gradient, in place
    z_target = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        logit = tl.load(LOGITS + offs, mask=offs < V, other=0.0).to(tl.float32)
        z = logit
        if SOFTCAP:
            z = softcap * (2 * tl.sigmoid(2 * logit / softcap) - 1)
        is_target = offs == target
        z_target += tl.sum(tl.where(is_target, z, 0.0), 0)
        grad = tl.exp(z - lse) - is_target.to(tl.float32)  # d loss / d z
        if SOFTCAP:
            tanh = z / softcap
            grad = grad * (1 - tanh * tanh)  # d z / d logit
        grad = tl.where(ignored, 0.0, grad * grad_scale)
        tl.store(LOGITS + offs, grad.to(LOGITS.dtype.element_ty), mask=offs < V)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - z_target))

# -----------------------------------------------------------------------------
# The autograd Function


class LinearCrossEntropy(torch.autograd.Function):
    """loss = reduce_i CE(softcap(x_i W^T), t_i) over rows with t_i != ignore_index; reduction "mean" or "sum"."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, ignore_index, reduction, chunk_size, need_grad):
        N, C = x.shape
        V = weight.size(0)
        # under autocast the head matmuls run in the autocast dtype, as model.py's nn.Linear would
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        if reduction == "mean":  # (1,) fp32 on the device: 1 / number of non-ignored targets
            grad_scale = 1.0 / (targets != ignore_index).sum(dtype=torch.float32).clamp(min=1).reshape(1)
        else:
            grad_scale = torch.ones(1, device=x.device, dtype=torch.float32)
        if chunk_size is None:  # ~256 MiB of logits per chunk, whatever V
            chunk_size = max(1, (2 ** 28 // (V * xc.element_size())))
        losses = torch.empty(N, device=x.device, dtype=torch.float32)
        dx = torch.empty_like(xc) if need_grad else None  # (N, C)
        dw = torch.zeros(V, C, device=x.device, dtype=torch.float32) if need_grad else None
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                logits = xc[start:end] @ wc.T  # (n, V), overwritten by its gradient below
                _ce_grad_kernel[(end - start,)](logits, targets[start:end], losses[start:end], grad_scale,
                                                logits.stride(0), V, float(softcap), ignore_index,
                                                SOFTCAP=bool(softcap), BLOCK_V=1024 if x.is_cuda else 128,
                                                num_warps=8)
                if need_grad:  # (evaluation skips these two matmuls)
                    dx[start:end] = logits @ wc  # (n, C)
                    dw += (logits.T @ xc[start:end]).float()  # (V, C)
        if need_grad:
            ctx.save_for_backward(dx, dw)
        ctx.dtypes = (x.dtype, weight.dtype)
        return losses.sum() * grad_scale[0]

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return ((dx * grad_loss).to(ctx.dtypes[0]), (dw * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None, None, None)

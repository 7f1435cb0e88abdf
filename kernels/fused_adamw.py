"""
Fused AdamW in Triton: one launch per dtype group updates every parameter of the group.

AdamW is memory bound (per element: read p, g, m, v; write p, m, v), so the only things that matter are touching
each byte once and not paying a launch per tensor. The launch walks a table of (tensor, block) work items; each
work item reads the tensor's four addresses from a pointer table and updates one BLOCK of it in fp32 registers.
The math is torch.optim.AdamW's (bias correction, decoupled weight decay), in fp32 whatever the parameter dtype:
bf16/fp16 parameters and grads are upcast on load and rounded once on store, the moments are kept in fp32.
"""

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# -----------------------------------------------------------------------------
# Kernel


@triton.jit
def _adamw_kernel(PTRS, NUMELS, ITEM_TENSOR, ITEM_START,
                  beta1, beta2, eps, decay, step_size, bc2_sqrt,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    item = tl.program_id(0)
    t = tl.load(ITEM_TENSOR + item)  # which tensor this work item updates
    start = tl.load(ITEM_START + item)  # int64 element offset into it
    n = tl.load(NUMELS + t)
    p_ptr = tl.load(PTRS + 4 * t + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(PTRS + 4 * t + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(PTRS + 4 * t + 2).to(tl.pointer_type(M_DTYPE))
    v_ptr = tl.load(PTRS + 4 * t + 3).to(tl.pointer_type(M_DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    # same order of operations as torch.optim.AdamW's single-tensor path
    p = p * decay  # decoupled weight decay: p *= 1 - lr * wd
    m = m + (1.0 - beta1) * (g - m)  # exp_avg.lerp_(g, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p + (-step_size) * (m / denom)  # p.addcdiv_(m, denom, value=-lr / bc1)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(M_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(M_DTYPE), mask=mask)

# -----------------------------------------------------------------------------
# Launcher: work tables are cached per set of buffers, so a steady training loop launches with no host work


_tables = {}


def _work_tables(group, block):
    """(pointer table (N, 4) int64, numels (N,) int64, item_tensor (I,) int32, item_start (I,) int64) on device."""
    key = (block,) + tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel())
                           for p, g, m, v in group)
    if key not in _tables:
        if len(_tables) >= 16:  # buffers moved (e.g. grads re-allocated each step): keep the cache bounded
            _tables.clear()
        device = group[0][0].device
        ptrs = torch.tensor([[x.data_ptr() for x in quad] for quad in group], dtype=torch.int64)  # (N, 4)
        numels = torch.tensor([quad[0].numel() for quad in group], dtype=torch.int64)  # (N,)
        nblocks = (numels + block - 1) // block  # (N,)
        item_tensor = torch.repeat_interleave(torch.arange(len(group)), nblocks)  # (I,)
        first_item = torch.cumsum(nblocks, 0) - nblocks  # (N,) index of each tensor's first work item
        item_start = (torch.arange(len(item_tensor)) - first_item[item_tensor]) * block  # (I,)
        _tables[key] = tuple(x.to(device) for x in (ptrs, numels, item_tensor.to(torch.int32), item_start))
    return _tables[key]


def adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step in place; one kernel launch per (param, grad, moment) dtype combination."""
    groups = {}
    for quad in zip(params, grads, exp_avgs, exp_avg_sqs):
        assert all(x.is_contiguous() and x.numel() == quad[0].numel() for x in quad), "contiguous, same-size buffers"
        groups.setdefault((quad[0].dtype, quad[1].dtype, quad[2].dtype), []).append(quad)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = (1.0 - beta2 ** step) ** 0.5
    for (p_dtype, g_dtype, m_dtype), group in groups.items():
        block = 4096 if group[0][0].is_cuda else 256  # interpreter: small blocks so test sizes span several
        ptrs, numels, item_tensor, item_start = _work_tables(group, block)
        _adamw_kernel[(len(item_tensor),)](
            ptrs, numels, item_tensor, item_start,
            beta1, beta2, eps, 1.0 - lr * weight_decay, lr / bc1, bc2_sqrt,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], M_DTYPE=_TL_DTYPES[m_dtype], BLOCK=block,
            num_warps=8)

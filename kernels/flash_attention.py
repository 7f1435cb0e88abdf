"""
Flash attention in Triton: forward and backward, causal or not, grouped-query (GQA), any sequence length.

The algorithm is FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691):
- forward: one program per (query block, batch*head) streams the key/value blocks through SRAM with the online
  softmax (running max m, running sum l, rescaled accumulator), so the (T, T) score matrix never exists in memory.
  It saves only O and the row logsumexp (LSE), in base 2 because exp2 is the native instruction.
- backward: a preprocess computes delta = rowsum(dO * O) (= rowsum(P * dP), FA2 eq. in sec. 3.1.2), then two
  kernels recompute P = exp2(S - LSE) block by block: one per key block accumulates dK, dV (looping over the query
  blocks *and* over the query heads sharing that kv head, so GQA needs no atomics and stays deterministic), one per
  query block accumulates dQ. Splitting dQ from dK/dV costs one extra recompute of P but avoids atomic adds.
- causal masking is applied only to the blocks that straddle the diagonal (and to the ragged last key block in the
  forward); every other block takes the unmasked fast path.

Causal with Tq < Tk uses the KV-cache convention (bottom-right aligned): query i sees keys j <= i + (Tk - Tq).
This module imports triton; kernels/__init__.py imports it lazily so picochat runs without triton.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax(x) = exp2(x * log2(e) - max), exp2 is cheaper than exp on the GPU

# -----------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, Tk, causal_offset, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over the key blocks [lo, hi). MASK=False is the fast path for blocks fully in range and
    fully below the diagonal; MASK=True handles the diagonal blocks and the ragged last block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASK:
            kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=offs_n[None, :] < Tk, other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=offs_n[:, None] < Tk, other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None])  # (D, BLOCK_N)
            v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :])  # (BLOCK_N, D)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), in log2 units
        if MASK:
            valid = offs_n[None, :] < Tk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(valid, s, float("-inf"))
        # every row has seen at least key 0 by now (it is never masked), so m_new is finite: no NaN from inf - inf
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)  # (BLOCK_M, D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              H, GROUP, Tq, Tk, qk_scale,
              CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: B*H*T*D can exceed 2^31
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP  # GQA: GROUP consecutive query heads share one kv head
    Q += b * sqb + h * sqh
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    O += b * sob + h * soh
    LSE += pid_bh.to(tl.int64) * Tq

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    causal_offset = Tk - Tq
    if CAUSAL:
        # keys past the block's last row are masked for every row; keys < start_m + offset + 1 for none of them
        hi = tl.minimum(Tk, start_m + BLOCK_M + causal_offset)
        mid = tl.minimum(start_m + causal_offset + 1, Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        mid = Tk // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, 0, mid, Tk, causal_offset,
                               qk_scale, False, CAUSAL, BLOCK_N, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, mid, hi, Tk, causal_offset,
                               qk_scale, True, CAUSAL, BLOCK_N, PREC)
    acc = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=row_ok)  # log2-sum-exp2 of the scaled scores

# -----------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, H, Tq,
                         D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, which equals sum_j P_ij dP_ij: the softmax-backward row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask = offs_m[:, None] < Tq
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sqt, sdot, offs_n, offs_d, lo, hi, Tq, causal_offset, qk_scale,
                    MASK: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one head. Rows past Tq load as zero,
    so they add exactly zero (dO = 0 and delta = 0); only the causal diagonal needs an explicit mask."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        do = tl.load(DO + offs_m[:, None] * sdot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT - lse[None, :])
        if MASK:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)  # (BLOCK_N, D)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)  # (BLOCK_N, D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                   H, Hkv, GROUP, Tq, Tk, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n[:, None] < Tk
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)

    causal_offset = Tk - Tq
    if CAUSAL:
        # the first row that sees key start_n is start_n - offset; rows from start_n + BLOCK_N - 1 - offset on see
        # the whole key block, so only the query blocks in between need the mask
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M, Tq)
    else:
        lo = 0
        mid = 0
    for g in range(GROUP):  # GQA: sum dK, dV over the query heads that share this kv head
        h = hk * GROUP + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdob + h * sdoh
        LSEh = LSE + (b * H + h) * Tq
        DELTAh = DELTA + (b * H + h) * Tq
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdot, offs_n, offs_d, lo, mid, Tq,
                                     causal_offset, qk_scale, True, BLOCK_M, PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdot, offs_n, offs_d,
                                 tl.maximum(lo, mid), Tq, Tq, causal_offset, qk_scale, False, BLOCK_M, PREC)
    dk *= sm_scale  # S = sm_scale * Q K^T, so dK = sm_scale * dS^T Q
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, lo, hi, Tk, causal_offset, qk_scale,
                  MASK: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi). Keys past Tk load as zero and add zero."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n[None, :] < Tk
        kT = tl.load(K + offs_n[None, :] * skt + offs_d[:, None], mask=col_ok, other=0.0)  # (D, BLOCK_N)
        vT = tl.load(V + offs_n[None, :] * svt + offs_d[:, None], mask=col_ok, other=0.0)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_offset, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)  # (BLOCK_M, D)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
                 H, GROUP, Tq, Tk, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    causal_offset = Tk - Tq
    if CAUSAL:  # same block split as the forward
        hi = tl.minimum(Tk, start_m + BLOCK_M + causal_offset)
        mid = tl.minimum(start_m + causal_offset + 1, Tk) // BLOCK_N * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, 0, mid, Tk, causal_offset,
                           qk_scale, False, BLOCK_N, PREC)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, mid, hi, Tk, causal_offset,
                           qk_scale, True, BLOCK_N, PREC)
    else:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, 0, Tk, Tk, causal_offset,
                           qk_scale, False, BLOCK_N, PREC)
    dq *= sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])

# -----------------------------------------------------------------------------
# Launchers and the autograd Function


def _config(q, kind):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel. A fixed table rather than autotuning: the
    interpreter cannot choose among configs. The GPU entries come from compiling every kernel for sm_90 (ptxas
    resource usage, no GPU needed) and keeping large tiles without register spills; only D=128 dK/dV spills a
    little (64 bytes) in every tiling tried, this one the least. Not yet timed on a GPU: see tests/bench_kernels.py."""
    D = q.size(-1)
    if not q.is_cuda:  # interpreter: small blocks so short test sequences still cross block and diagonal edges
        return 32, 16, 1, 1
    if q.dtype == torch.float32:  # fp32 tiles take twice the registers and shared memory
        return 64, 32, 4, 2
    if kind == "fwd":
        return 128, 64, 8, 3
    if kind == "dkdv":  # tall key blocks, short query blocks: the dK, dV accumulators stay in registers
        return (32, 128, 8, 3) if D <= 64 else (32, 64, 8, 2)
    return (128, 64, 8, 3) if D <= 64 else (128, 32, 8, 3)  # dq: the mirror image


def _precision(q):
    # fp32 inputs get true fp32 dot products (not TF32) so the fp32 path is as exact as PyTorch's fp32 attention
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _forward(q, k, v, causal):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    o = torch.empty_like(q)  # keeps q's memory layout, e.g. a (B, T, H, D) buffer viewed as (B, H, T, D)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config(q, "fwd")
    grid = (triton.cdiv(Tq, BLOCK_M), B * H)
    _attn_fwd[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                    H, H // Hkv, Tq, Tk, LOG2E / math.sqrt(D),
                    CAUSAL=causal, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PREC=_precision(q),
                    num_warps=num_warps, num_stages=num_stages)
    return o, lse


def _backward(do, q, k, v, o, lse, causal):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    if do.stride(-1) != 1:
        do = do.contiguous()
    sm_scale = 1.0 / math.sqrt(D)
    delta = torch.empty_like(lse)  # (B, H, Tq) fp32
    _attn_bwd_preprocess[(triton.cdiv(Tq, 64), B * H)](o, do, delta, *_strides(o), *_strides(do), H, Tq,
                                                       D=D, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config(q, "dkdv")
    _attn_bwd_dkdv[(triton.cdiv(Tk, BLOCK_N), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, Hkv, H // Hkv, Tq, Tk, sm_scale * LOG2E, sm_scale,
        CAUSAL=causal, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PREC=_precision(q),
        num_warps=num_warps, num_stages=num_stages)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config(q, "dq")
    _attn_bwd_dq[(triton.cdiv(Tq, BLOCK_M), B * H)](
        q, k, v, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, H // Hkv, Tq, Tk, sm_scale * LOG2E, sm_scale,
        CAUSAL=causal, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PREC=_precision(q),
        num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(D)) V with O(T) memory; saves (q, k, v, o, lse) for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # kernels assume unit d-stride
        o, lse = _forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal)
        return dq, dk, dv, None


def attention_triton(q, k, v, causal=True):
    """q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D) -> (B, H, Tq, D), via the Triton kernels."""
    return FlashAttention.apply(q, k, v, causal)

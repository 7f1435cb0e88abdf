"""
Muon's orthogonalisation (Polar Express / Newton-Schulz quintic iterations) with a symmetric Gram-matrix kernel.

Each iteration is X <- a X + (b A + c A^2) X with A = X X^T. Both A = X X^T and A^2 = A A^T (A is symmetric)
are "X times its own transpose", whose result is symmetric: computing only the tiles on and above the diagonal
and writing each one also to its mirror position does half the FLOPs of a general matmul (the trick of
modded-nanogpt's and Dion's Newton-Schulz kernels). The same kernel also fuses the b A + c A^2 epilogue.
The last product B X is not symmetric and stays a cuBLAS call (torch.baddbmm).
The iteration itself (coefficients, normalisation, when to transpose, dtypes) is model.py's `orthogonalize`,
so Muon gets bit-for-bit the same algorithm whichever path runs.
"""

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# Kernel


@triton.jit
def _syrk_kernel(X, C, OUT, M, K, alpha, beta,
                 sxb, sxm, sxk, scb, scm, scn, sob, som, son,
                 HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """OUT = alpha * X X^T (+ beta * C) for one (M, K) matrix X of the batch; C must be symmetric."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    if pid_m > pid_n:  # upper triangle only: tile (n, m) is the transpose of tile (m, n)
        return
    X += batch * sxb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kmask = (k + offs_k) < K
        a = tl.load(X + offs_m[:, None] * sxm + (k + offs_k)[None, :] * sxk,
                    mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        bT = tl.load(X + offs_n[None, :] * sxm + (k + offs_k)[:, None] * sxk,
                     mask=(offs_n[None, :] < M) & kmask[:, None], other=0.0)  # (BLOCK_K, BLOCK_M)
        acc = tl.dot(a, bT, acc, input_precision=PREC)
    acc = acc * alpha
    tile_mask = (offs_m[:, None] < M) & (offs_n[None, :] < M)
    if HAS_C:
        c = tl.load(C + batch * scb + offs_m[:, None] * scm + offs_n[None, :] * scn, mask=tile_mask, other=0.0)
        acc += beta * c.to(tl.float32)
    out = acc.to(OUT.dtype.element_ty)
    OUT += batch * sob
    tl.store(OUT + offs_m[:, None] * som + offs_n[None, :] * son, out, mask=tile_mask)
    if pid_m != pid_n:  # mirror; the diagonal tile is already complete (and must not be written twice)
        tl.store(OUT + offs_n[:, None] * som + offs_m[None, :] * son, tl.trans(out),
                 mask=(offs_n[:, None] < M) & (offs_m[None, :] < M))

# -----------------------------------------------------------------------------
# Launcher and the iteration


def syrk(X, alpha=1.0, C=None, beta=0.0):
    """alpha * X X^T + beta * C for X (N, M, K) (any strides), C symmetric (N, M, M) or None -> (N, M, M)."""
    N, M, K = X.shape
    out = torch.empty((N, M, M), device=X.device, dtype=X.dtype)
    if X.is_cuda:
        BLOCK_M, BLOCK_K, num_warps, num_stages = (128, 64, 8, 3) if X.element_size() <= 2 else (64, 32, 4, 3)
    else:  # interpreter: small tiles so test matrices span several, with ragged edges
        BLOCK_M, BLOCK_K, num_warps, num_stages = 32, 64, 1, 1
    Cx = out if C is None else C  # a dummy pointer when HAS_C is off
    nb = triton.cdiv(M, BLOCK_M)
    _syrk_kernel[(nb, nb, N)](X, Cx, out, M, K, alpha, beta, *X.stride(), *Cx.stride(), *out.stride(),
                              HAS_C=C is not None, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                              PREC="ieee" if X.dtype == torch.float32 else "tf32",
                              num_warps=num_warps, num_stages=num_stages)
    return out


def orthogonalize_triton(G, steps, coefficients, compute_dtype):
    """model.orthogonalize's iteration with both Gram products on the symmetric kernel. G: (..., rows, cols)."""
    X = G.to(compute_dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the short side: A = X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)  # as model.py: singular values in (0, 1)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # (N, m, n), m <= n
    for a, b, c in coefficients[:steps]:
        A = syrk(X)  # (N, m, m) = X X^T
        B = syrk(A, alpha=c, C=A, beta=b)  # (N, m, m) = c A A^T + b A
        X = torch.baddbmm(X, B, X, beta=a)  # (N, m, n) = a X + B X
    X = X.reshape(shape)
    return (X.mT if transposed else X).to(G.dtype)

"""
Benchmark the Triton kernels of kernels/ against PyTorch on a GPU.

    python tests/bench_kernels.py

- attention: causal fwd+bwd TFLOP/s, kernels.attention vs SDPA's flash backend (bf16, head_dim 64 and 128, MHA and
  GQA); target >= 0.9x SDPA.
- AdamW: GB/s of kernels.adamw_step over a model-like list of tensors vs torch.optim.AdamW(fused=True), against a
  measured device-to-device copy bandwidth; target >= 80% of copy.
- orthogonalize: ms per Muon step for a stack of matrices, symmetric-kernel path vs model.py's plain matmuls.
- linear_cross_entropy: ms and peak memory of the fused head + loss vs logits -> softcap -> F.cross_entropy.
- rmsnorm_rope: ms of the fused q/k RMSNorm + RoPE, fwd+bwd, vs model.py's PyTorch ops.
On a machine without CUDA (or without triton) it says so and exits 0. The last line is one JSON object.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: kernels, model
import kernels  # noqa: E402


def main():
    if not kernels.available() or not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU and triton; nothing to measure here")
        print(json.dumps({"device": "cpu"}))
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import torch.nn.functional as F

    import model
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name()}

    # -------------------------------------------------------------------------
    # Attention: causal fwd + bwd. FLOPs: 2 matmuls of 2*T*T*D per head forward, halved by causality; the
    # backward does 2.5x the forward's matmul work (FlashAttention-2's accounting) -> 3.5x in all.
    for B, T, H, Hkv, D in [(8, 2048, 16, 16, 64), (4, 2048, 16, 16, 128), (4, 4096, 16, 4, 128)]:
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        flops = 3.5 * 4 * B * H * T * T * D / 2

        def ours_step():
            o = kernels.attention(q, k, v, causal=True, impl="triton")
            torch.autograd.grad(o, (q, k, v), do)

        def sdpa_step(k, v):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
            torch.autograd.grad(o, (q, k, v), do)

        def tflops(fn):
            return flops / (do_bench(fn, warmup=25, rep=100) * 1e-3) / 1e12

        ours = tflops(ours_step)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                theirs = tflops(lambda: sdpa_step(k, v))
            except RuntimeError:  # a torch whose flash backend lacks GQA: expand k, v outside the timed region
                ke, ve = (x.detach().repeat_interleave(H // Hkv, 1).requires_grad_() for x in (k, v))
                theirs = tflops(lambda: sdpa_step(ke, ve))
        name = f"attn_B{B}_T{T}_H{H}_Hkv{Hkv}_D{D}"
        print(f"{name}: triton {ours:.1f} TFLOP/s, sdpa flash {theirs:.1f} TFLOP/s, ratio {ours / theirs:.2f}")
        results[name] = {"triton_tflops": round(ours, 1), "sdpa_tflops": round(theirs, 1),
                         "ratio": round(ours / theirs, 3)}

    # -------------------------------------------------------------------------
    # AdamW: memory bound, so report bandwidth. Bytes per element: fp32 params read p, g, m, v and write p, m, v
    # (28 B); bf16 params and grads with fp32 moments 22 B. Copy moves 2 x 4 B per fp32 element.
    numel = 64 * 2**20
    buf = torch.empty(numel, device="cuda")
    dst = torch.empty_like(buf)
    copy_gbs = 2 * 4 * numel / (do_bench(lambda: dst.copy_(buf), warmup=25, rep=100) * 1e-3) / 1e9
    print(f"copy: {copy_gbs:.0f} GB/s")
    results["copy_gbs"] = round(copy_gbs, 1)
    # a 24-layer transformer's worth of shapes (d=1024): many matrices of two sizes plus ragged small vectors
    shapes = [(1024, 1024)] * 96 + [(4096, 1024), (1024, 4096)] * 24 + [(1024,)] * 48 + [(50257, 1024)]
    n_elem = sum(torch.Size(s).numel() for s in shapes)
    for dtype, bytes_per in ((torch.float32, 28), (torch.bfloat16, 22)):
        params = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        grads = [torch.randn_like(p) for p in params]
        exp_avgs = [torch.zeros(s, device="cuda") for s in shapes]
        exp_avg_sqs = [torch.zeros(s, device="cuda") for s in shapes]
        ms = do_bench(lambda: kernels.adamw_step(params, grads, exp_avgs, exp_avg_sqs, 10, 1e-3, 0.9, 0.95, 1e-8,
                                                 0.1, impl="triton"), warmup=10, rep=50)
        gbs = bytes_per * n_elem / (ms * 1e-3) / 1e9
        name = f"adamw_{str(dtype)[6:]}"
        print(f"{name}: triton {gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of copy")
        results[name] = {"triton_gbs": round(gbs, 1), "frac_of_copy": round(gbs / copy_gbs, 3)}
        if dtype == torch.float32:  # torch's fused AdamW needs same-dtype state, so fp32 only
            ps = [torch.nn.Parameter(p) for p in params]
            for p, g in zip(ps, grads):
                p.grad = g
            opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
            ms = do_bench(opt.step, warmup=10, rep=50)
            torch_gbs = bytes_per * n_elem / (ms * 1e-3) / 1e9
            print(f"{name}: torch fused {torch_gbs:.0f} GB/s = {torch_gbs / copy_gbs:.0%} of copy")
            results[name]["torch_fused_gbs"] = round(torch_gbs, 1)

    # -------------------------------------------------------------------------
    # Muon's orthogonalisation of a stack of same-shape matrices (what Muon batches per shape)
    for shape in [(12, 1024, 1024), (12, 1024, 4096)]:
        G = torch.randn(shape, device="cuda")
        ours = do_bench(lambda: kernels.orthogonalize(G, steps=5, impl="triton"), warmup=5, rep=30)
        theirs = do_bench(lambda: model.orthogonalize(G, 5), warmup=5, rep=30)
        name = "orthogonalize_" + "x".join(map(str, shape))
        print(f"{name}: triton {ours:.2f} ms, torch {theirs:.2f} ms, speedup {theirs / ours:.2f}x")
        results[name] = {"triton_ms": round(ours, 3), "torch_ms": round(theirs, 3), "speedup": round(theirs / ours, 3)}

    # -------------------------------------------------------------------------
    # LM head + cross-entropy, fwd+bwd under bf16 autocast as in training: time and peak memory
    N, C, V = 32768, 1536, 65536
    x = torch.randn(N, C, device="cuda", requires_grad=True)
    w = (0.02 * torch.randn(V, C, device="cuda")).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    for impl in ("triton", "torch"):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = kernels.linear_cross_entropy(x, w, targets, softcap=15.0, impl=impl)
            torch.autograd.grad(loss, (x, w))

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = do_bench(step, warmup=5, rep=30)
        print(f"linear_cross_entropy {impl}: {ms:.1f} ms, peak {peak_gib:.2f} GiB above inputs")
        results[f"linear_ce_{impl}"] = {"ms": round(ms, 2), "peak_gib": round(peak_gib, 3)}

    # -------------------------------------------------------------------------
    # RMSNorm + RoPE of the queries, fwd+bwd, bf16 (memory bound: fused = one read and one write each way)
    B, T, H, D = 8, 2048, 16, 128
    x = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angles = torch.randn(1, T, 1, D // 2, device="cuda")
    cos, sin = angles.cos(), angles.sin()
    dy = torch.randn_like(x)
    for impl in ("triton", "torch"):
        def step():
            y = kernels.rmsnorm_rope(x, cos, sin, impl=impl)
            torch.autograd.grad(y, x, dy)

        ms = do_bench(step, warmup=10, rep=50)
        print(f"rmsnorm_rope {impl}: {ms:.3f} ms")
        results[f"rmsnorm_rope_{impl}_ms"] = round(ms, 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

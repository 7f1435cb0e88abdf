"""
The Triton kernels of kernels/ compiled for a real CUDA GPU, checked against float64 references on that GPU.
tests/test_kernels.py checks the same kernels on CPU through Triton's interpreter, at tiny sizes and without bf16
(the interpreter's bf16 is broken); this script is its counterpart for a GPU machine, at model-like sizes.

    python tests/check_gpu.py          # on a machine with CUDA and triton; elsewhere it says so and exits 0

Every check compares ||ours - ref|| / ||ref|| with ref in float64, against the same error of PyTorch's own op in
the same dtype (FlashAttention's rule: within 2x of it, plus a small floor), for outputs and gradients.
Exit status 1 if any check fails. The last line is one JSON object.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: kernels, model
import kernels  # noqa: E402
import model  # noqa: E402

device, impl = "cuda", "triton"  # what is checked (a dry run of this script's own logic: cpu, torch)
results, failures = {}, []


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def check(name, ours, torch_same_dtype, ref, floor):
    """ours / torch_same_dtype / ref: lists of tensors (outputs, then gradients)."""
    for i, (o, t, r) in enumerate(zip(ours, torch_same_dtype, ref)):
        e_ours, e_torch = rel_err(o, r), rel_err(t, r)
        ok = e_ours <= 2 * e_torch + floor and torch.isfinite(o).all().item()
        key = f"{name}[{i}]"
        results[key] = {"err": float(f"{e_ours:.3g}"), "torch_err": float(f"{e_torch:.3g}"), "ok": ok}
        print(f"{'ok  ' if ok else 'FAIL'} {key}: rel err {e_ours:.2e} (torch {e_torch:.2e})")
        if not ok:
            failures.append(key)


def grads(fn, inputs, dtype, dy):
    xs = [x.detach().to(dtype).requires_grad_() if x.is_floating_point() else x for x in inputs]
    out = fn(*xs)
    diff = [x for x in xs if x.requires_grad]
    return [out, *torch.autograd.grad(out, diff, dy.to(out.dtype))]


def main():
    if not kernels.available() or not torch.cuda.is_available():
        print("check_gpu.py needs a CUDA GPU and triton; nothing to check here")
        print(json.dumps({"device": "cpu"}))
        return
    torch.manual_seed(0)
    dev = device
    print(f"gpu {torch.cuda.get_device_name()} | torch {torch.__version__} | cuda {torch.version.cuda}")

    # attention: MHA and GQA, head_dim 64 and 128, ragged T, Tq < Tk (the KV cache's bottom-right mask)
    for B, H, Hkv, Tq, Tk, D, causal in [(2, 8, 8, 1000, 1000, 64, True), (2, 8, 2, 517, 517, 128, True),
                                         (1, 4, 4, 300, 300, 128, False), (2, 8, 4, 37, 301, 64, True)]:
        q = torch.randn(B, H, Tq, D, device=dev, dtype=torch.float64)
        k, v = (torch.randn(B, Hkv, Tk, D, device=dev, dtype=torch.float64) for _ in range(2))
        do = torch.randn_like(q)
        for dtype in (torch.bfloat16, torch.float32):
            def ours(q, k, v):
                return kernels.attention(q, k, v, causal=causal, impl=impl)

            def theirs(q, k, v):
                return kernels.attention(q, k, v, causal=causal, impl="torch")
            name = f"attention_B{B}_H{H}_Hkv{Hkv}_Tq{Tq}_Tk{Tk}_D{D}_{str(dtype)[6:]}"
            check(name, grads(ours, [q, k, v], dtype, do), grads(theirs, [q, k, v], dtype, do),
                  grads(theirs, [q, k, v], torch.float64, do), 1e-3 if dtype == torch.bfloat16 else 1e-5)

    # fused LM head + cross-entropy, bf16 inputs as under autocast, several chunks
    N, C, V = 4096, 768, 32768
    x = torch.randn(N, C, device=dev, dtype=torch.float64)
    w = 0.05 * torch.randn(V, C, device=dev, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), device=dev)
    targets[::7] = -1
    one = torch.ones((), device=dev)
    for dtype in (torch.bfloat16, torch.float32):
        def ours(x, w):
            return kernels.linear_cross_entropy(x, w, targets, 15.0, impl=impl, chunk_size=1024)

        def theirs(x, w):
            return kernels.linear_cross_entropy(x, w, targets, 15.0, impl="torch")
        check(f"linear_cross_entropy_{str(dtype)[6:]}", grads(ours, [x, w], dtype, one),
              grads(theirs, [x, w], dtype, one), grads(theirs, [x, w], torch.float64, one), 1e-4)

    # fused RMSNorm + RoPE, with and without the gain
    B, T, H, D = 4, 512, 8, 128
    x = torch.randn(B, T, H, D, device=dev, dtype=torch.float64)
    angles = torch.randn(1, T, 1, D // 2, device=dev, dtype=torch.float64)
    gain = 1 + 0.1 * torch.randn(D, device=dev, dtype=torch.float64)
    dy = torch.randn_like(x)
    for dtype in (torch.bfloat16, torch.float32):
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

        def ours(x, g):
            return kernels.rmsnorm_rope(x, cos.to(x.dtype), sin.to(x.dtype), g, eps=1e-6, impl=impl)

        def theirs(x, g):
            return kernels.rmsnorm_rope(x, cos.to(x.dtype), sin.to(x.dtype), g, eps=1e-6, impl="torch")
        check(f"rmsnorm_rope_{str(dtype)[6:]}", grads(ours, [x, gain], dtype, dy), grads(theirs, [x, gain], dtype, dy),
              grads(theirs, [x, gain], torch.float64, dy), 1e-3 if dtype == torch.bfloat16 else 1e-5)

    # AdamW: fp32 and bf16 params, fp32 moments; the reference is the PyTorch path on float64 copies
    shapes = [(1024, 1024), (4096, 1024), (1024,), (50, 3)]
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(s, device=dev, dtype=torch.float64) for s in shapes]
        grads_ = [torch.randn(s, device=dev, dtype=torch.float64) for s in shapes]
        state = [[torch.rand(s, device=dev, dtype=torch.float64) for s in shapes] for _ in range(2)]
        outs = {}
        # the reference: PyTorch's update of fp32 params (it computes in fp32 whatever the params' dtype)
        for name, which, d in (("ours", impl, dtype), ("torch", "torch", dtype), ("ref", "torch", torch.float32)):
            p = [t.to(d) for t in params]
            m, v = ([t.float() for t in s] for s in state)
            kernels.adamw_step(p, [g.to(d) for g in grads_], m, v, 7, 1e-2, 0.9, 0.95, 1e-8, 0.1, impl=which)
            outs[name] = [torch.cat([t.flatten() for t in p]), torch.cat([t.flatten() for t in m]),
                          torch.cat([t.flatten() for t in v])]
        check(f"adamw_{str(dtype)[6:]}", outs["ours"], outs["torch"], outs["ref"], 1e-6)

    # Muon's orthogonalisation: the Triton path and model.py's both run the iteration in bf16 on CUDA; the
    # reference is model.py's iteration in fp32
    fast_bf16 = model._fast_bf16
    for shape in [(12, 768, 768), (4, 768, 3072), (3, 1000, 200)]:
        G = torch.randn(shape, device=dev)
        ours, theirs = kernels.orthogonalize(G, 5, impl=impl), kernels.orthogonalize(G, 5, impl="torch")
        model._fast_bf16 = lambda device: False
        ref = model.orthogonalize(G, 5)
        model._fast_bf16 = fast_bf16
        check("orthogonalize_" + "x".join(map(str, shape)), [ours], [theirs], [ref], 1e-3)

    # end to end: a small GPT's training losses with the kernels on and off, bf16 autocast
    losses = {}
    for use in (False, True):
        torch.manual_seed(0)
        kernels.enable(use)
        gpt = model.GPT(model.config_from_depth(2, 4096, 256, aspect_ratio=64, head_dim=64, use_kernels=use)).to(dev)
        gpt.init_weights()
        adamw, muon = gpt.setup_optimizers()
        batch = torch.randint(0, 4096, (4, 257), device=dev, generator=torch.Generator(dev).manual_seed(1))
        run = []
        for _ in range(8):  # one batch again and again: its loss must fall
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = gpt(batch[:, :-1], batch[:, 1:])
            loss.backward()
            adamw.step()
            muon.step()
            gpt.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses[use] = run
    kernels.enable(False)
    gap = max(abs(a - b) for a, b in zip(*losses.values()))
    ok = gap < 0.05 and losses[True][-1] < losses[True][0]
    results["train_losses"] = {"torch": [round(x, 4) for x in losses[False]],
                               "kernels": [round(x, 4) for x in losses[True]], "max_gap": round(gap, 4), "ok": ok}
    print(f"{'ok  ' if ok else 'FAIL'} training with kernels on/off: max loss gap {gap:.4f} over 8 steps, "
          f"loss {losses[True][0]:.3f} -> {losses[True][-1]:.3f}")
    if not ok:
        failures.append("train_losses")
    results["failures"] = failures
    print(json.dumps(results))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

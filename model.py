"""
The picochat GPT: the architecture, the optimisers (AdamW + Muon), KV-cache inference and sampling, and
generation with the calculator tool (the Engine).

    from model import GPT, config_from_depth, generate
    model = GPT(config_from_depth(depth=6, vocab_size=4096, sequence_len=512))
    model.init_weights()
    loss = model(idx, targets)                      # idx, targets: (B, T) int64; targets -1 are ignored
    adamw, muon = model.setup_optimizers()
    for step_tokens in generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16, seed=0): ...
    Engine(model, tokenizer).generate_batch([prompt_ids], num_samples=8)  # replies, calculator calls answered

Architecture (as nanochat's gpt.py): token embedding, parameter-free RMSNorm, rotary embeddings (RoPE), QK-norm,
grouped-query attention, ReLU^2 MLP, untied head, tanh logit softcap, no biases, zero-initialised output
projections. `mlp="swiglu"` and `norm_weight=True` give the Qwen3-style variant (gated MLP, learnable norm gains).

The same GPT, switched by its config, is also Qwen3 and GPT-2, and loads their Hugging Face weights:

    model = GPT.from_pretrained("path/to/Qwen3-0.6B-Base", device="cpu", dtype=torch.bfloat16)
    # the folder of config.json + model.safetensors (or shards + model.safetensors.index.json); see data/hf_model.py
"""

import ast
import contextlib
import functools
import json
import math
import os
import sys
import warnings
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    sequence_len: int = 1024     # training context; RoPE is precomputed for 10x this (longer inference)
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6              # query heads
    n_kv_head: int = 6           # key/value heads (GQA when < n_head)
    n_embd: int = 768
    head_dim: int = 128
    mlp: str = "relu2"           # "relu2": relu(x W1)^2 W2 | "swiglu": (silu(x Wg) * x Wu) W2 |
                                 # "gelu_tanh": gelu(x W1) W2, tanh approximation (GPT-2's "gelu_new")
    mlp_hidden: int = 0          # 0 -> 4 * n_embd
    norm_weight: bool = False    # learnable RMSNorm gains (Qwen3 style); nanochat's norms are parameter-free
    rope_theta: float = 10000.0
    softcap: float = 15.0        # logits = softcap * tanh(logits / softcap); 0 disables
    use_kernels: bool = False    # attention / optimiser steps through kernels/ (Triton, CUDA) when importable
    # switches for the open models (the defaults are nanochat's; see config_from_hf for Qwen3 and GPT-2)
    norm: str = "rmsnorm"        # "rmsnorm" | "layernorm" (with gain and bias, GPT-2)
    norm_eps: float = 0.0        # 0: the dtype's machine epsilon (F.rms_norm's default); Qwen3 1e-6, GPT-2 1e-5
    embed_norm: bool = True      # normalise the token embedding before the first block (nanochat; not Qwen3, GPT-2)
    qk_norm: bool = True         # per-head RMSNorm of queries and keys (nanochat, Qwen3; not GPT-2)
    positions: str = "rope"      # "rope" | "learned": a table of sequence_len position embeddings (GPT-2)
    bias: bool = False           # biases on the blocks' linear layers (GPT-2)
    tie_embeddings: bool = False  # the head is the token embedding matrix (Qwen3-0.6B, GPT-2)

    def __post_init__(self):
        checks = [
            (self.n_layer >= 1, f"n_layer (depth) must be >= 1, got {self.n_layer}"),
            (self.vocab_size >= 1 and self.sequence_len >= 1, "vocab_size and sequence_len must be >= 1"),
            (self.n_head >= 1 and self.n_kv_head >= 1, f"n_head={self.n_head}, n_kv_head={self.n_kv_head} must be >= 1"),
            (self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} (grouped-query attention)"),
            (self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}"),
            (self.n_embd >= 1, f"n_embd must be >= 1, got {self.n_embd}"),
            (self.mlp in ("relu2", "swiglu", "gelu_tanh"),
             f"mlp must be 'relu2', 'swiglu' or 'gelu_tanh', got {self.mlp!r}"),
            (self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}"),
            (self.norm_eps >= 0 and (self.norm == "rmsnorm" or self.norm_eps > 0),
             f"norm_eps must be >= 0 (> 0 for layernorm), got {self.norm_eps}"),
            (self.positions in ("rope", "learned"), f"positions must be 'rope' or 'learned', got {self.positions!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, n_kv_head=0, **kwargs):
    """nanochat's sizing: model dim = aspect_ratio * depth rounded up to a multiple of head_dim,
    n_head = dim // head_dim; n_kv_head 0 -> n_head (plain multi-head attention). kwargs: other GPTConfig fields."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if aspect_ratio < 1 or head_dim < 1:
        raise ValueError(f"aspect_ratio and head_dim must be >= 1, got {aspect_ratio}, {head_dim}")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=n_embd, head_dim=head_dim, **kwargs)


def param_floor(config):
    """A lower bound of GPT(config).num_params() without building it: the matrices every variant has (the token
    embedding, the head unless tied, attention, the MLP's two); norm gains, biases and position tables are left
    out. Exact for nanochat's default architecture. A config whose floor cannot fit in memory is refused before
    anything is allocated (common.check_model_fits)."""
    C, D, hidden = config.n_embd, config.head_dim, config.mlp_hidden or 4 * config.n_embd
    attention = C * D * (2 * config.n_head + 2 * config.n_kv_head)  # q and proj, k and v
    return (1 if config.tie_embeddings else 2) * config.vocab_size * C + config.n_layer * (attention + 2 * C * hidden)


# the adapters' AdamW learning rate at width 768 (scaled with width as the other AdamW groups; stages multiply it by
# their lr_scale). Tuned on the CPU pipeline's depth-4 model, LoRA sft from base for 40 steps at lr_scale 0.2:
# val loss 2.68 at an effective 0.002, 2.22 at 0.01, 5.49 at 0.03 (unstable)
LORA_LR = 0.02


@functools.cache
def _kernels():
    """The kernels package (kernels/__init__.py) when importable, else None: the pure-PyTorch paths. Its entry
    points pick the Triton kernel themselves when enabled and on CUDA, else their PyTorch fallback."""
    try:
        import kernels
    except ImportError:
        return None
    names = ("attention", "adamw_step", "orthogonalize", "linear_cross_entropy")
    return kernels if all(hasattr(kernels, name) for name in names) else None

# -----------------------------------------------------------------------------
# Building blocks


class _RMSNormFunction(torch.autograd.Function):
    """Parameter-free RMSNorm y = x / rms(x) with a hand-written backward dx = (dy - y mean(dy y)) / rms(x).
    On CPU F.rms_norm is a chain of elementwise ops in both directions; this is 2.5x faster forward+backward
    (measured on (8, 512, 384) fp32: 36-42 ms against 92-106 ms), same result to 5e-7."""

    @staticmethod
    def forward(ctx, x):
        x_hi = x.to(torch.promote_types(x.dtype, torch.float32))  # the statistic in >= fp32
        rstd = torch.rsqrt(x_hi.square().mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)  # (..., 1)
        y = x * rstd.to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        mean_dy_y = torch.linalg.vecdot(dy, y).unsqueeze(-1).div_(y.size(-1))  # (..., 1)
        return torch.addcmul(dy, y, mean_dy_y, value=-1).mul_(rstd.to(dy.dtype))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; parameter-free unless `weight` (a learnable gain, Qwen3 style). eps 0: the dtype's
    machine epsilon (as F.rms_norm)."""

    def __init__(self, dim, weight, eps=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None
        self.eps = eps

    def forward(self, x):
        # the hand-written backward only where there is a backward: under no_grad / inference_mode the fused op
        # costs half as much per call on one decoded token ((1, 1, 128): ~58 -> ~30 us of CPU), and generation
        # makes 4 per layer and 1-2 more of these calls per token (figures under load)
        if self.weight is None and not self.eps and torch.is_grad_enabled():
            return _RMSNormFunction.apply(x)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps or None)


def make_norm(config, dim):
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_weight, config.norm_eps)


def apply_rotary(x, cos, sin):
    """RoPE on (B, T, H, D) with cos/sin (B or 1, T, 1, D/2): rotates the pairs (x[i], x[i + D/2]) by
    position * theta_i, the "rotate_half" layout of Llama/Qwen, so their weights load unchanged."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.use_kernels = config.use_kernels
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        # QK-norm is always an RMSNorm over the head dim (Qwen3: with gains and the config's eps)
        self.q_norm = RMSNorm(self.head_dim, config.norm_weight, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_weight, config.norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, kv_cache, attn_mask):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        # QK-norm bounds the attention logits (stabler training at high lr); norm then rotate as Qwen3 does
        # (for parameter-free norms the order does not matter: a rotation keeps the RMS)
        if self.q_norm is not None and self.q_norm.weight is None and cos is not None and not torch.is_grad_enabled():
            # inference: q and k through one norm and one rotation, the same per-head ops on each row: a decoded
            # token's norm and rotation are a dozen tiny ops each, its cost on a small model. Training keeps them
            # apart (the cat would copy both, forward and backward)
            qk = apply_rotary(self.q_norm(torch.cat((q, k), dim=2)), cos, sin)  # (B, T, H + Hkv, D)
            q, k = qk.split((self.n_head, self.n_kv_head), dim=2)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if cos is not None:  # None: learned positions, added to the embedding instead
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, Hkv, Tk, D): the cache up to the newest token
        gqa = self.n_head != self.n_kv_head
        if attn_mask is not None:  # cached decoding: per-row lengths, so an explicit (B, 1, T, Tk) mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif self.use_kernels and _kernels() is not None:
            y = _kernels().attention(q, k, v, causal=True)  # bottom-right aligned: also a token after a cache
        else:
            # no mask: T == Tk (causal), or one new token per row after an aligned cache, which sees every key;
            # SDPA's is_causal is top-left aligned, so that token would see only the first key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.kind = config.mlp
        # swiglu: one matmul computes [gate | up] (from_pretrained concatenates Qwen3's gate_proj and up_proj)
        self.c_fc = nn.Linear(config.n_embd, (2 if self.kind == "swiglu" else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden or 2*hidden)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (B, T, hidden)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")  # GPT-2's activation, so its weights load unchanged
        else:
            h = F.relu(h).square()  # ReLU^2 (So et al. 2021, "Primer"): sparse, and better than GELU per FLOP
        return self.c_proj(h)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.norm_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, attn_mask):
        x = x + self.attn(self.norm_1(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(self.norm_2(x))

# -----------------------------------------------------------------------------
# The GPT


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.sequence_len, config.n_embd)
        if config.embed_norm:
            modules["norm_in"] = make_norm(config, config.n_embd)
        modules["h"] = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        modules["norm_f"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.lora = None  # a LoRAConfig once add_lora has put adapters on the model
        # RoPE for 10x the training context, so inference may run longer (as nanochat); beyond it: an error.
        # Learned positions end where their table does.
        self.context_len = 10 * config.sequence_len if config.positions == "rope" else config.sequence_len
        if config.positions == "rope":
            cos, sin = self._rotary(self.context_len)
            self.register_buffer("cos", cos, persistent=False)  # (10*T, D/2)
            self.register_buffer("sin", sin, persistent=False)

    def tie_weights(self):
        """With tie_embeddings, the head's weight is the token embedding's: one parameter, two keys in the state
        dict. Called again after anything that may replace parameters (from_pretrained's meta-device build)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def from_pretrained(path, device="cpu", dtype=torch.float32, sequence_len=4096):
        """A GPT with the weights of a Hugging Face model folder (config.json, model.safetensors or shards with
        their index; Qwen3 or GPT-2), in `dtype` on `device`, in eval mode. Built on the meta device, allocated
        once and filled tensor by tensor, so the weights never exist twice in memory. sequence_len: see
        config_from_hf."""
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
        try:
            config = config_from_hf(hf, sequence_len)
        except KeyError as e:
            raise ValueError(f"{path}/config.json has no {e.args[0]!r}") from None
        with torch.device("meta"):
            model = GPT(config).to(dtype)
        model.to_empty(device=device)
        model.tie_weights()  # to_empty may give the two modules separate tensors
        model.fill_rotary()
        load_hf_weights(model, path, hf["model_type"])
        return model.eval()

    def _rotary(self, length, device=None):
        c = self.config
        inv_freq = c.rope_theta ** -(torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=device) / c.head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: embedding N(0, 1); head N(0, 0.001) (near-uniform first predictions); input
        projections U(-a, a) with a = sqrt(3 / n_embd) (std 1/sqrt(fan_in)); output projections zero, so
        every block starts as the identity and the residual stream is just the embedding. A tied head keeps the
        embedding's init; learned positions N(0, 0.02) (GPT-2's); norm gains one, biases zero."""
        c = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        if not c.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        if c.positions == "learned":
            nn.init.normal_(self.transformer.wpe.weight, mean=0.0, std=0.02)
        a = (3.0 / c.n_embd) ** 0.5
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -a, a)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for module in self.modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.fill_rotary()

    @torch.no_grad()
    def fill_rotary(self):
        """(Re)compute the RoPE tables, which are not saved: after init, or a build on the meta device."""
        if self.config.positions == "rope":
            cos, sin = self._rotary(self.cos.size(0), self.cos.device)
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token (nanochat): 6 per weight of every matmul (2 forward, 4 backward; the embedding
        is a lookup, not a matmul) plus attention's QK^T and AV, 2 * 2 * H * D * T forward, x3 with backward,
        counted over the full context T (as nanochat; causal masking halves the real work)."""
        c = self.config
        n_matmul = sum(p.numel() for p in self.transformer.h.parameters() if p.dim() == 2) + self.lm_head.weight.numel()
        return 6 * n_matmul + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def _positions(self):
        if self.config.positions == "rope":
            return f"rotary cache of {self.context_len} (10 x sequence_len={self.config.sequence_len})"
        return f"position table of {self.context_len}"

    def check_room(self, kv_cache, T):
        """Refuse T more tokens when the cache (or the position table) has no room for them."""
        if kv_cache.length + T > min(self.context_len, kv_cache.max_len):
            raise ValueError(f"KV cache of {kv_cache.max_len} positions ({self._positions()}) "
                             f"cannot take {T} more tokens after {kv_cache.length}")

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx: (B, T) token ids. Returns float32 logits (B, T, V) when targets is None, else the cross-entropy
        loss (targets -1 ignored): a scalar for loss_reduction "mean"/"sum", (B, T) for "none".
        With a kv_cache, idx continues each row from the cache's per-row length."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        c = self.config
        attn_mask = None
        if kv_cache is None:
            if T > self.context_len:
                raise ValueError(f"sequence of {T} tokens is longer than the {self._positions()}")
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            self.check_room(kv_cache, T)
            if kv_cache.aligned:  # every row at the same length: one slice of positions, no gather
                pos = torch.arange(kv_cache.length, kv_cache.length + T, device=idx.device)[None]  # (1, T)
            else:
                pos = kv_cache.pos[:, None] + torch.arange(T, device=idx.device)  # (B, T) per-row positions
            attn_mask = kv_cache.attn_mask(T)  # (B, 1, T, Tk) or None when no mask is needed
        cos = sin = None  # learned positions: added to the embedding instead
        if c.positions == "rope" and (kv_cache is None or kv_cache.aligned):
            start = kv_cache.length if kv_cache is not None else 0
            cos, sin = self.cos[None, start:start + T, None], self.sin[None, start:start + T, None]  # (1, T, 1, D/2)
        elif c.positions == "rope":
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (B, T, 1, D/2)
        x = self._trunk(idx, pos, cos, sin, kv_cache, attn_mask)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.advance(T)
        if (targets is not None and loss_reduction != "none" and self.config.use_kernels and _kernels() is not None
                and isinstance(self.lm_head, nn.Linear)):  # not a quantized head
            # the kernels' fused head + softcap + cross-entropy never materialises the (B*T, V) logits
            return _kernels().linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                                   softcap=self.config.softcap, reduction=loss_reduction)
        logits = self._head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def _trunk(self, idx, pos, cos, sin, kv_cache, attn_mask):
        """The embedding, the blocks and the final norm: (B, T) ids at positions pos (B or 1, T) -> (B, T, C)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(pos)  # (B or 1, T, C) broadcast over rows
        if self.config.embed_norm:
            x = self.transformer.norm_in(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, attn_mask)
        return self.transformer.norm_f(x)

    def _head(self, x):
        logits = self.lm_head(x).float()  # (B, T, V): softcap and cross-entropy in fp32
        if self.config.softcap:
            # tanh softcap (Gemma 2): bounded logits keep early training from overconfident spikes
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    def decode_step(self, idx, kv_cache):
        """Logits (B, V) of one new token per row, idx (B, 1), each at its row's position in a static KVCache:
        the keys and values are written at kv_cache.pos and attention reads all max_len positions under a mask, so
        no shape and no host-side value changes from one step to the next and one compiled graph serves them all
        (generate's compile). Reads only device tensors: the caller checks the room left and advances the cache."""
        pos = kv_cache.pos[:, None]  # (B, 1)
        cos = sin = None
        if self.config.positions == "rope":
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (B, 1, 1, D/2)
        attn_mask = (torch.arange(kv_cache.max_len, device=idx.device) <= pos)[:, None, None]  # (B, 1, 1, max_len)
        return self._head(self._trunk(idx, pos, cos, sin, kv_cache, attn_mask))[:, -1]  # (B, V)

    # ---- optimisers

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95), zero=0, lora_lr=LORA_LR):
        """[AdamW, Muon] as nanochat: Muon for the 2-D matrices of the blocks; AdamW for the embedding, the head
        and the norm gains (at unembedding_lr). AdamW lrs scale with width as (n_embd / 768) ** -0.5 (tuned at
        768); Muon's update is already width-independent (orthogonal, aspect-scaled). Each param group stores
        `initial_lr`, which learning-rate schedules multiply. Both optimisers average gradients over ranks
        themselves when torch.distributed is initialised; zero: the data-parallel level they run at (see
        Optimisers below; common.parallelize sets it up, sharding the model first at level 3). With LoRA: [AdamW]
        of the adapters."""
        scale = (self.config.n_embd / 768) ** -0.5
        if self.lora is not None:
            # only the adapters learn, and with AdamW, not Muon: Muon sets every singular value of a matrix's update
            # to ~1, which is meant for a full weight matrix; on the thin factors A and B of a low-rank product it
            # would throw away the gradient's own spectrum, the little a rank-r update has to go on
            lr = lora_lr * scale
            return self.setup_adamw(lr, weight_decay, adam_betas, zero, eps=1e-10)
        matrices = [p for p in self.transformer.h.parameters() if p.dim() == 2]
        gains = [p for p in self.parameters() if p.dim() == 1]  # norm gains and biases
        # a tied embedding is the head too: it learns at the head's (lower) rate
        embeddings = [m.weight for name, m in self.transformer.items() if name in ("wte", "wpe")
                      and m.weight is not self.lm_head.weight]
        adam_groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * scale)]
        if embeddings:
            adam_groups.append(dict(params=embeddings, lr=embedding_lr * scale))
        if gains:
            adam_groups.append(dict(params=gains, lr=unembedding_lr * scale))
        adam_settings = dict(betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        if zero in (1, 2):
            adamw = ZeroAdamW(adam_groups, zero=zero, **adam_settings)
        else:
            adamw = AdamW(adam_groups, use_kernels=self.config.use_kernels, **adam_settings)
        muon = Muon(matrices, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay,
                    use_kernels=self.config.use_kernels, zero=zero)
        for opt in (adamw, muon):
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return [adamw, muon]

    def setup_adamw(self, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), zero=0, eps=1e-8):
        """[AdamW] on every parameter at one learning rate: how a pretrained (open) model is fine-tuned, at ~1e-5
        (reasoning-from-scratch's GRPO on Qwen3-0.6B: 1e-5). setup_optimizers' from-scratch rates (Muon at 0.02,
        embeddings at 0.2) would overwrite its pretraining within steps. The group stores `initial_lr` too; zero as
        setup_optimizers'. Frozen weights (LoRA's base) are left out."""
        groups = [dict(params=[p for p in self.parameters() if p.requires_grad], lr=lr)]
        settings = dict(betas=betas, eps=eps, weight_decay=weight_decay)
        if zero in (1, 2):
            adamw = ZeroAdamW(groups, zero=zero, **settings)
        else:
            adamw = AdamW(groups, use_kernels=self.config.use_kernels, **settings)
        for group in adamw.param_groups:
            group["initial_lr"] = group["lr"]
        return [adamw]

# -----------------------------------------------------------------------------
# Open models: a Hugging Face folder (config.json + safetensors) as a GPTConfig and the GPT's weights


def config_from_hf(hf, sequence_len=4096):
    """GPTConfig of a Hugging Face config.json (a dict) for model_type "qwen3" or "gpt2". sequence_len: the
    context picochat's stages work in (rows, prompt room), capped at the model's own; RoPE then reaches 10x it.
    GPT-2's learned position table fixes its context at n_positions."""
    kind = hf.get("model_type")
    if kind == "qwen3":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5 | older files
        unsupported = [(hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}"),
                       (hf.get("attention_bias", False), "attention_bias"),
                       (hf.get("use_sliding_window", False), "use_sliding_window"),
                       (rope.get("rope_type", rope.get("type", "default")) != "default",
                        f"rope type {rope.get('rope_type', rope.get('type'))!r}")]
        if any(bad for bad, _ in unsupported):
            raise ValueError(f"qwen3 config with unsupported {', '.join(w for bad, w in unsupported if bad)}")
        n_head = hf["num_attention_heads"]
        return GPTConfig(
            sequence_len=min(sequence_len, hf["max_position_embeddings"]), vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, mlp="swiglu",
            mlp_hidden=hf["intermediate_size"], norm_weight=True, norm_eps=hf["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), softcap=0.0,
            embed_norm=False, tie_embeddings=hf.get("tie_word_embeddings", False))
    if kind == "gpt2":
        unsupported = [(hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
                        f"activation_function {hf.get('activation_function')!r}"),
                       (hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
                       (not hf.get("scale_attn_weights", True), "scale_attn_weights false"),
                       (not hf.get("tie_word_embeddings", True), "untied embeddings")]
        if any(bad for bad, _ in unsupported):
            raise ValueError(f"gpt2 config with unsupported {', '.join(w for bad, w in unsupported if bad)}")
        n_embd, n_head = hf["n_embd"], hf["n_head"]
        return GPTConfig(
            sequence_len=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=n_head,
            n_kv_head=n_head, n_embd=n_embd, head_dim=n_embd // n_head, mlp="gelu_tanh",
            mlp_hidden=hf.get("n_inner") or 4 * n_embd, softcap=0.0, norm="layernorm",
            norm_eps=hf["layer_norm_epsilon"], embed_norm=False, qk_norm=False, positions="learned", bias=True,
            tie_embeddings=True)
    raise ValueError(f"model_type {kind!r} is not supported (qwen3, gpt2)")


def _hf_weight_map(kind, config):
    """{our parameter: (its Hugging Face keys, fn(tensors) -> our tensor)}, and the predicate of file keys that
    are known not to be weights. Qwen3's gate and up projections become our one [gate | up] matrix; GPT-2's
    Conv1D layers store (in, out), the transpose of a Linear, and its c_attn holds q, k and v side by side."""
    same = lambda ts: ts[0]  # noqa: E731
    weights = {}
    if kind == "qwen3":
        weights["transformer.wte.weight"] = (["model.embed_tokens.weight"], same)
        for i in range(config.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            for a, b in [("norm_1", "input_layernorm"), ("norm_2", "post_attention_layernorm"),
                         ("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"),
                         ("attn.c_v", "self_attn.v_proj"), ("attn.c_proj", "self_attn.o_proj"),
                         ("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm"),
                         ("mlp.c_proj", "mlp.down_proj")]:
                weights[ours + a + ".weight"] = ([theirs + b + ".weight"], same)
            weights[ours + "mlp.c_fc.weight"] = ([theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"],
                                                 lambda ts: torch.cat(ts, dim=0))
        weights["transformer.norm_f.weight"] = (["model.norm.weight"], same)
        if not config.tie_embeddings:
            weights["lm_head.weight"] = (["lm_head.weight"], same)
        # a tied model's file may still carry the head (a copy of the embedding): not a weight of ours
        return weights, lambda key: config.tie_embeddings and key == "lm_head.weight"
    # gpt2, keys without the "transformer." prefix (see _read_hf_weights)
    C = config.n_embd
    weights["transformer.wte.weight"] = (["wte.weight"], same)
    weights["transformer.wpe.weight"] = (["wpe.weight"], same)
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"h.{i}."
        for part in ("weight", "bias"):
            weights[ours + f"norm_1.{part}"] = ([theirs + f"ln_1.{part}"], same)
            weights[ours + f"norm_2.{part}"] = ([theirs + f"ln_2.{part}"], same)
        for j, name in enumerate(("c_q", "c_k", "c_v")):
            weights[ours + f"attn.{name}.weight"] = ([theirs + "attn.c_attn.weight"],
                                                     lambda ts, j=j: ts[0][:, j * C:(j + 1) * C].t())
            weights[ours + f"attn.{name}.bias"] = ([theirs + "attn.c_attn.bias"],
                                                   lambda ts, j=j: ts[0][j * C:(j + 1) * C])
        for a in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weights[ours + a + ".weight"] = ([theirs + a + ".weight"], lambda ts: ts[0].t())
            weights[ours + a + ".bias"] = ([theirs + a + ".bias"], same)
    for part in ("weight", "bias"):
        weights[f"transformer.norm_f.{part}"] = ([f"ln_f.{part}"], same)
    # the causal-mask buffers of older GPT-2 files, and the tied head some files repeat
    return weights, lambda key: key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight"


def _safetensors_files(path):
    """The weight files of a Hugging Face model folder: the shards its index names, or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    missing = [name for name in files if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise FileNotFoundError(f"{path}: missing {', '.join(missing)} (an interrupted download? rerun it)")
    return [os.path.join(path, name) for name in files]


@torch.no_grad()
def load_hf_weights(model, path, kind):
    """Copy the weights of the Hugging Face folder `path` into `model` (a GPT of config_from_hf's config), one
    tensor at a time from the memory-mapped files: besides the model, memory holds one converted tensor."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("loading Hugging Face weights needs safetensors: pip install safetensors") from None
    weights, ignored = _hf_weight_map(kind, model.config)
    with contextlib.ExitStack() as stack:
        handles = {}  # their key (gpt2: without "transformer.") -> (open file, key in the file)
        for file in _safetensors_files(path):
            f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            for key in f.keys():
                handles[key.removeprefix("transformer.") if kind == "gpt2" else key] = (f, key)
        wanted = {key for keys, _ in weights.values() for key in keys}
        missing = sorted(wanted - handles.keys())
        unexpected = sorted(k for k in handles.keys() - wanted if not ignored(k))
        if missing or unexpected:
            show = lambda keys: ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")  # noqa
            raise ValueError(f"{path}: the weights do not fit a {kind} model of its config.json: "
                             + "; ".join(f"{what} keys: {show(keys)}" for what, keys in
                                         (("missing", missing), ("unexpected", unexpected)) if keys))
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, (keys, combine) in weights.items():
            tensor = combine([handles[k][0].get_tensor(handles[k][1]) for k in keys])
            if tensor.shape != params[name].shape:
                raise ValueError(f"{path}: {', '.join(keys)} has shape {tuple(tensor.shape)}, the config.json "
                                 f"makes {name} {tuple(params[name].shape)}")
            params[name].copy_(tensor)  # converts to the model's dtype and device


# -----------------------------------------------------------------------------
# Optimisers
#
# Data parallelism by --zero level (common.parallelize sets it up; the optimisers do the communication). What a rank
# holds of the weights / gradients / optimiser states:
#   0  all / all / all of AdamW's, its own matrices' of Muon's: step() all-reduces the gradients (no DDP wrapper)
#   1  all / all / its share: AdamW is torch's ZeroRedundancyOptimizer
#   2  all / its share / its share: each gradient is reduced onto its owner during backward (_reduce_to_owners)
#   3  its slices / its slices / its share: FSDP2 (fully_shard) shards the weights as dim-0 slices (DTensors)
# Muon's state and work are split by whole matrices at every level, AdamW's by ZeRO's whole tensors (1, 2) or
# FSDP2's slices (3): see Muon for why. Checkpoints hold the whole states (full_state_dict), so a run resumes at
# any level on any number of ranks. torch's sharding engines are imported where a level uses them: importing them
# (torch.distributed.tensor underneath) costs about 1 s of CPU per process, measured, which level 0 is spared.


def _world():
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dtensor(x):
    """Whether x is a DTensor (FSDP2's slices), without importing torch.distributed.tensor: none exists before
    something has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _average_gradients(params):
    """All-reduce (mean) the gradients of params over ranks, in one flat bucket (fewer, larger messages)."""
    if _world()[1] == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def _reduce_to_owners(params, owner):
    """--zero=2's gradient reduce-scatter, by whole parameters: after every backward each gradient is summed onto
    the rank that owns its parameter (owner: {param: rank}) and dropped by the others, so a rank holds the gradients
    of what it updates only (plus the one in flight). Written by hand because torch has no engine for it: its ZeRO
    leaves gradients to DDP, whose all-reduce leaves every rank all of them, and FSDP2 shards the weights as well.
    The minimum: one reduce per parameter as soon as its gradient is ready (no buckets). Every backward is then a
    collective, so every rank must run as many; the owner's gradient is a sum over ranks, step() divides it."""
    rank, _ = _world()

    def hook(p):
        dist.reduce(p.grad, dst=owner[p])
        if owner[p] != rank:
            p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


class AdamW(torch.optim.AdamW):
    """torch's AdamW (its fused kernel), made DDP-aware: when torch.distributed is initialised, step() first
    averages the gradients over ranks (all-reduce), so pretrain.py needs no DDP wrapper and every rank applies the
    identical update. With use_kernels on CUDA the update runs in kernels.adamw_step (one Triton launch).
    At --zero=3 the parameters are FSDP2's slices (DTensors), whose gradients FSDP2 has already averaged: the fused
    step runs on each rank's slices, so the moments are sliced like the weights."""

    def __init__(self, param_groups, use_kernels=False, **kwargs):
        first = next(iter(param_groups[0]["params"]))
        self.sliced = is_dtensor(first)
        self.kernels = _kernels() if use_kernels and first.device.type == "cuda" and not self.sliced else None
        super().__init__(param_groups, fused=first.device.type in ("cpu", "cuda") and self.kernels is None, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if not self.sliced:
            _average_gradients([p for group in self.param_groups for p in group["params"]])
        if self.kernels is None:
            return super().step(closure)
        k = self.kernels
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p] = dict(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
                self.state[p]["step"] += 1
            if params:
                beta1, beta2 = group["betas"]
                k.adamw_step(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                             [self.state[p]["exp_avg_sq"] for p in params], int(self.state[params[0]]["step"]),
                             group["lr"], beta1, beta2, group["eps"], group["weight_decay"])

    def full_state_dict(self):
        """The whole state in torch's state_dict format on rank 0, None elsewhere (every rank must call it)."""
        saved = self.state_dict()
        if self.sliced:  # gather the slices, one tensor at a time (each gather is a collective)
            saved["state"] = {i: {name: value.full_tensor().cpu() if is_dtensor(value) else value
                                  for name, value in s.items()} for i, s in saved["state"].items()}
        return saved if _world()[0] == 0 else None

    def load_state_dict(self, state_dict):
        """Load a whole state (full_state_dict's); at --zero=3 each rank keeps its slices of the moments."""
        if self.sliced:
            from torch.distributed.tensor import distribute_tensor
            params = [p for group in self.param_groups for p in group["params"]]
            state_dict = {**state_dict, "state": {i: {
                name: distribute_tensor(value.to(params[i].device), params[i].device_mesh, params[i].placements,
                                        src_data_rank=None)  # None: every rank slices its own copy, no messages
                if torch.is_tensor(value) and value.shape == params[i].shape else value
                for name, value in s.items()} for i, s in state_dict["state"].items()}}
        super().load_state_dict(state_dict)


class ZeroAdamW:
    """AdamW at --zero=1 and 2: torch's ZeroRedundancyOptimizer around torch's fused AdamW (the engine). Each rank
    keeps the moments of its share of the parameters (whole tensors, shares balanced by size with torch's greedy
    partition: with only a few large tensors, as here, the largest one bounds the share), steps them and broadcasts
    them to the others. ZeRO leaves the gradients to DDP, which picochat does not use: step() averages them first
    (level 1), or at level 2 the hooks of _reduce_to_owners have already summed each onto its owner in backward."""

    def __init__(self, param_groups, zero=1, **kwargs):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        device = param_groups[0]["params"][0].device
        self.engine = ZeroRedundancyOptimizer(param_groups, optimizer_class=torch.optim.AdamW,
                                              fused=device.type in ("cpu", "cuda"), **kwargs)
        self.zero = zero
        if zero == 2:  # who owns what: each rank knows its local optimiser's share; the map is gathered once
            params = [p for group in self.param_groups for p in group["params"]]
            local = {id(p) for group in self.engine.optim.param_groups for p in group["params"]}
            shares = [None] * self.engine.world_size
            dist.all_gather_object(shares, [i for i, p in enumerate(params) if id(p) in local])
            _reduce_to_owners(params, {params[i]: r for r, share in enumerate(shares) for i in share})

    @property
    def param_groups(self):  # a property: loading a state replaces the engine's list
        return self.engine.param_groups

    @property
    def state(self):
        """This rank's share of the state: its local optimiser's."""
        return self.engine.optim.state

    @torch.no_grad()
    def step(self):
        params = [p for group in self.param_groups for p in group["params"]]
        if self.zero == 2:
            for p in params:
                if p.grad is not None:  # the sum over ranks, on its owner only
                    p.grad.div_(self.engine.world_size)
        else:
            _average_gradients(params)
        self.engine.step()

    def full_state_dict(self):
        """The whole state in torch's state_dict format on rank 0, None elsewhere (every rank must call it)."""
        self.engine.consolidate_state_dict(to=0)
        return self.engine.state_dict() if self.engine.rank == 0 else None

    def load_state_dict(self, state_dict):
        """Load a whole state (full_state_dict's, or AdamW's); each rank keeps its share."""
        self.engine.load_state_dict(state_dict)


# Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932): per-iteration optimal quintic
# coefficients for the matrix sign / polar factor, as used by modded-nanogpt and nanochat. Same cost as Keller
# Jordan's fixed quintic (3.4445, -4.7750, 2.0315), tighter result: measured after 5 steps (fp32), singular values
# >= 3e-3 x the largest land in [0.86, 1.14] (the fixed quintic: [0.57, 1.20]); tests/test_model.py checks it.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def _fast_bf16(device):
    """bf16 matmuls pay off on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16); on plain AVX2 oneDNN
    emulates them at ~4 GFLOP/s against ~60+ in fp32 (measured on a 2-core EPYC), so there we stay in fp32."""
    return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def orthogonalize(G, steps=5):
    """Approximate polar factor U V^T of G = U S V^T (batched over leading dims) with Polar Express quintic
    iterations X <- a X + (b A + c A^2) X, A = X X^T; in bf16 where that is fast. Singular values land near 1."""
    X = G.bfloat16() if _fast_bf16(G.device) else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the short side: A = X X^T is then the smaller Gram matrix
        X = X.mT
    # spectral norm <= Frobenius norm, so singular values start in (0, 1]; the 1.01 margin (as modded-nanogpt)
    # keeps rounding from pushing the largest just past 1, outside the region the coefficients were fit for
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # (N, m, n)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT  # (N, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2: the scaling fused into the GEMM
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X, (N, m, n)
    X = X.view(shape)
    return (X.mT if transposed else X).to(G.dtype)


def deal_matrices(params, world_size):
    """Muon's split of matrices over ranks: (batches, owner). batches: the same-shape matrices, in order of shape;
    owner: {param: rank}, dealt round-robin within a shape, each shape starting one rank further (small models
    spread over the ranks too)."""
    by_shape = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    batches = [same for _, same in sorted(by_shape.items())]
    return batches, {p: (i + j) % world_size for i, same in enumerate(batches) for j, p in enumerate(same)}


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan 2024): SGD with Nesterov momentum whose update is orthogonalised (Polar Express), scaled
    by max(1, rows/cols) ** 0.5 so that every matrix gets a similar per-element RMS update. For the 2-D hidden
    matrices only. Decoupled weight decay p <- p (1 - lr wd).

    Data parallel: every matrix has one owner rank (same-shape matrices dealt round-robin), which alone keeps its
    momentum and computes its update (same-shape matrices stacked into one batched orthogonalisation). So Muon's
    state and work are split by whole matrices at every --zero level, never sliced as AdamW's are: the
    orthogonalisation needs the whole matrix (A = X X^T mixes all its rows), whereas Adam's moments are elementwise
    and any slice can be stepped on its own. Levels 0-1: step() all-reduces (averages) the gradients, and the owners
    broadcast the updated matrices, so the ranks stay bit-identical. Level 2: each gradient was reduced onto its
    owner during backward. Level 3: the matrices are FSDP2 slices; each averaged gradient is gathered whole (an
    all-gather: DTensor has no gather to one rank) and the owner's update is scattered back as slices."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, steps=5, use_kernels=False,
                 zero=0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      steps=steps))
        self.use_kernels = use_kernels
        self.zero = zero
        # batches: (param group index, its same-shape matrices, orthogonalised together)
        self.batches, self.owner = [], {}
        for g, group in enumerate(self.param_groups):
            batches, owner = deal_matrices(group["params"], _world()[1])
            self.batches += [(g, same) for same in batches]
            self.owner.update(owner)
        if zero == 2:
            _reduce_to_owners(list(self.owner), self.owner)

    def _orthogonalize(self, G, steps):
        k = _kernels() if self.use_kernels else None
        return k.orthogonalize(G, steps=steps) if k is not None else orthogonalize(G, steps)

    @torch.no_grad()
    def step(self, closure=None):
        rank, world = _world()
        params = [p for group in self.param_groups for p in group["params"]]
        if any(p.grad is None for p in params if self.zero != 2 or self.owner[p] == rank):
            raise RuntimeError("Muon: every parameter needs a gradient (all ranks must update the same set)")
        sliced = is_dtensor(params[0])  # --zero=3: FSDP2 has averaged the gradient slices
        if sliced:
            from torch.distributed.tensor import distribute_tensor
        if self.zero == 2:
            for p in params:
                if self.owner[p] == rank:  # the sum over ranks that the hooks reduced onto this owner
                    p.grad.div_(world)
        elif not sliced:
            _average_gradients(params)
        for g, same in self.batches:
            group = self.param_groups[g]
            grads = {}
            for p in same:
                grad = p.grad.full_tensor() if sliced else p.grad
                if self.owner[p] == rank:
                    grads[p] = grad
            updates = dict(zip(grads, self._updates(group, list(grads), list(grads.values())))) if grads else {}
            for p in same:
                if sliced:  # every rank takes its slice of the owner's update
                    update = updates.get(p, torch.empty(p.shape, dtype=p.dtype, device=p.device))
                    self._apply(group, p, distribute_tensor(update, p.device_mesh, p.placements,
                                                            src_data_rank=self.owner[p]))
                elif p in updates:
                    self._apply(group, p, updates[p])
        if world > 1 and not sliced:
            handles = [dist.broadcast(p, src=self.owner[p], async_op=True) for p in params]
            for h in handles:
                h.wait()

    def _updates(self, group, params, grads):
        """Momentum, Nesterov and orthogonalisation of same-shape matrices with their averaged gradients:
        the updates, (N, rows, cols)."""
        momentum = group["momentum"]
        looks = []
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)  # whole, even at --zero=3: see the docstring
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * g
            looks.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
        return self._orthogonalize(torch.stack(looks), group["steps"])  # (N, rows, cols)

    def _apply(self, group, p, update):
        rows, cols = p.shape
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    def full_state_dict(self):
        """The whole state in torch's state_dict format on rank 0 (every owner's momentum gathered there), None
        elsewhere (every rank must call it)."""
        saved = self.state_dict()
        rank, world = _world()
        if world > 1:
            parts = [None] * world if rank == 0 else None
            dist.gather_object({i: {name: value.cpu() for name, value in s.items()} for i, s in saved["state"].items()},
                               parts, dst=0)
            if rank != 0:
                return None
            saved["state"] = {i: s for part in parts for i, s in part.items()}
        return saved

    def load_state_dict(self, state_dict):
        """Load a whole state (full_state_dict's), keeping the momentum of the matrices this rank owns."""
        rank, _ = _world()
        params = [p for group in self.param_groups for p in group["params"]]
        saved = state_dict["state"]
        if saved and len(saved) != len(params):
            raise ValueError(f"the checkpoint holds Muon's momentum of {len(saved)} of {len(params)} matrices "
                             f"(an older picochat saved it per rank)")
        super().load_state_dict({**state_dict, "state": {i: s for i, s in saved.items()
                                                         if self.owner[params[i]] == rank}})

# -----------------------------------------------------------------------------
# Inference: KV cache, sampling, generation


class KVCache:
    """Keys and values of every layer for B rows of up to max_len positions, each row with its own length
    (prompts of different lengths decode together: per-row RoPE positions and an attention mask over the cache).
    The row lengths are kept on the host too (`lengths`), so that deciding between the paths never reads the
    device: a read per layer per token stalls a GPU's queue, and on a CPU costs as much as a small layer.
    static: every write goes to each row's position (`pos`) and attention reads all max_len positions under a
    mask, so a step's shapes never change (GPT.decode_step, compiled by generate). Each layer has its own
    tensors: an in-place write into a slice of one (L, ...) tensor makes a compiled graph copy the whole layer."""

    def __init__(self, batch_size, max_len, config, device, dtype=None, static=False):
        self.batch_size, self.max_len, self.static = batch_size, max_len, static
        self.n_layer, self.shape = config.n_layer, (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.device, self.dtype = torch.device(device), dtype
        self.k = self.v = None  # lists of (B, Hkv, max_len, D) per layer, allocated on the first write in the dtype
                                # the model computes in (autocast)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) tokens cached per row
        self.lengths = [0] * batch_size  # the same on the host
        self.length = 0  # max over rows
        self.aligned = True  # all rows at the same length: writes are one slice, one new token needs no mask

    def _allocate(self, dtype):
        self.k = [torch.zeros(self.shape, dtype=dtype, device=self.device) for _ in range(self.n_layer)]
        self.v = [torch.zeros(self.shape, dtype=dtype, device=self.device) for _ in range(self.n_layer)]

    def attn_mask(self, T):
        """(B, 1, T, Tk) bool mask for T new tokens per row, Tk = longest row after them (static: max_len); None
        where attention needs no mask: a prefill of an empty cache (plain causal), or one new token per row on an
        aligned cache (it sees every key)."""
        if not self.static and (self.length == 0 or (self.aligned and T == 1)):
            return None
        Tk = self.max_len if self.static else self.length + T
        query_pos = self.pos[:, None] + torch.arange(T, device=self.device)  # (B, T)
        key_pos = torch.arange(Tk, device=self.device)  # (Tk,)
        return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # (B, 1, T, Tk)

    def insert(self, layer, k, v):
        """Write k, v (B, Hkv, T, D) at each row's position; return this layer's keys/values up to the
        longest row (static: all max_len positions), (B, Hkv, Tk, D)."""
        if self.k is None:
            self._allocate(self.dtype or k.dtype)
        T = k.size(2)
        if not self.static and self.aligned:
            self.k[layer][:, :, self.length:self.length + T] = k
            self.v[layer][:, :, self.length:self.length + T] = v
        else:
            rows = torch.arange(self.batch_size, device=self.device)[:, None]  # (B, 1)
            cols = self.pos[:, None] + torch.arange(T, device=self.device)  # (B, T)
            self.k[layer].transpose(1, 2)[rows, cols] = k.transpose(1, 2).to(self.k[layer].dtype)  # via (B, T, Hkv, D)
            self.v[layer].transpose(1, 2)[rows, cols] = v.transpose(1, 2).to(self.v[layer].dtype)
        if self.static:
            return self.k[layer], self.v[layer]
        Tk = self.length + T
        return self.k[layer][:, :, :Tk], self.v[layer][:, :, :Tk]

    def advance(self, T):
        self.pos += T
        self.lengths = [n + T for n in self.lengths]
        self.length += T

    def copy_rows(self, rows, other):
        """Copy a 1-row cache's contents into `rows` of this one (N samples of a prompt share one prefill)."""
        n = other.lengths[0]
        if self.k is None:
            self._allocate(other.k[0].dtype)
        idx = torch.tensor(rows, device=self.device)
        for layer in range(self.n_layer):
            self.k[layer][idx, :, :n] = other.k[layer][:1, :, :n]
            self.v[layer][idx, :, :n] = other.v[layer][:1, :, :n]
        self.pos[idx] = n
        for r in rows:
            self.lengths[r] = n
        self.length = max(self.lengths)
        self.aligned = min(self.lengths) == self.length


MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (vLLM's _SAMPLING_EPS): logits / 1e-40 overflow to inf and
                        # 5e-324 is 0 in float32, so softmax would give NaN probabilities


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token id per row from logits (B, V): greedy at temperature 0 (and below MIN_TEMPERATURE), else
    softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the smallest set whose
    probability reaches top_p (the most likely token always stays, however small top_p)."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p; the top token always stays, also when
        # top_p is 0 in float32 (1e-46) and the comparison alone would drop every token
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@functools.cache
def _compiled_decode_step():
    # dynamic shapes: one graph for every cache length and batch size > 1 (a static graph would be compiled again
    # for each generate call's (B, max_len)), as fast per step as a static one on the CPU pipeline's model.
    # emulate_precision_casts: fused kernels round bf16 intermediates as eager does, so the tokens stay the same
    return torch.compile(GPT.decode_step, dynamic=True, options={"emulate_precision_casts": True})


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_tokens=(), seed=None,
             force=None, vocab_size=0, compile=False):
    """Decode a batch of prompts (lists of token ids, any lengths) together. Yields once per step a list with one
    entry per row: (token_id, forced) or None once the row has finished (right after a sampled stop token or
    max_new_tokens tokens). force(row, generated_so_far) -> list | None is called after each emitted token of a
    row; returned tokens are fed in on the following steps instead of sampling (yielded with forced=True). Forced
    tokens never stop a row: Qwen3's calculator result is forced in with the <|im_end|> that ends the call's turn.
    vocab_size > 0 samples only ids below it: Qwen3-0.6B's head has 151,936 rows for a tokenizer of 151,669
    tokens, and the untrained rest must never come out. Each distinct prompt is prefilled once (batch 1) and its
    cache copied into all rows that share it. compile: the decoding steps through torch.compile'd
    GPT.decode_step on a static cache (same tokens; the first call in a process compiles for tens of seconds on a
    CPU, worth it for long generations of small models, whose eager steps are mostly per-operation overhead)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k < 0 or not 0.0 < top_p <= 1.0 or temperature < 0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    config, device = model.config, model.lm_head.weight.device
    B = len(prompts)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    cache = KVCache(B, max(len(p) for p in prompts) + max_new_tokens, config, device, static=compile)
    logits = torch.empty(B, config.vocab_size, device=device)  # (B, V) next-token logits of each row
    rows_of = {}
    for b, prompt in enumerate(prompts):
        rows_of.setdefault(tuple(prompt), []).append(b)
    for prompt, rows in rows_of.items():
        single = KVCache(1, len(prompt), config, device)
        prompt_logits = model(torch.tensor([prompt], dtype=torch.long, device=device), kv_cache=single)
        cache.copy_rows(rows, single)
        logits[rows] = prompt_logits[0, -1]
    stop_tokens = set(stop_tokens)
    generated = [[] for _ in range(B)]
    queued = [deque() for _ in range(B)]
    done = [max_new_tokens == 0] * B
    for _ in range(max_new_tokens):
        if 0 < vocab_size < logits.size(-1):
            logits = logits[:, :vocab_size]  # (B, vocab_size): the ids a token can have
        sampled = sample_next(logits, temperature, top_k, top_p, generator).tolist()
        step, next_ids = [], []
        for b in range(B):
            if done[b]:
                step.append(None)
                next_ids.append(generated[b][-1] if generated[b] else prompts[b][-1])  # fed, never used
                continue
            forced = bool(queued[b])
            token = queued[b].popleft() if forced else sampled[b]
            generated[b].append(token)
            step.append((token, forced))
            next_ids.append(token)
            if (token in stop_tokens and not forced) or len(generated[b]) == max_new_tokens:
                done[b] = True
            elif force is not None:
                queued[b].extend(force(b, generated[b]) or ())
        yield step
        if all(done):
            return
        next_idx = torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]  # (B, 1)
        if compile:
            model.check_room(cache, 1)
            logits = _compiled_decode_step()(model, next_idx, cache)  # (B, V)
            cache.advance(1)
        else:
            logits = model(next_idx, kv_cache=cache)[:, -1]  # (B, V)

# -----------------------------------------------------------------------------
# The calculator. Arithmetic only: the expression is parsed with `ast` and evaluated by walking the tree, never
# by eval(), so names, attributes, calls, subscripts, strings, lambdas and comprehensions cannot run at all.
# Every intermediate value must stay within ±10**100 and an exponent within ±100 (checked before computing the
# power), so an expression of at most 200 characters is at most ~100 cheap operations on small numbers: its
# time is bounded by construction. Anything refused or failing (syntax, division by zero, too large) returns
# None, and then nothing is forced: the model goes on writing by itself.

CALC_MAX_CHARS = 200
CALC_MAX_DIGITS = 100
CALC_MAX_VALUE = 10**CALC_MAX_DIGITS
CALC_MAX_EXPONENT = 100


def _power(base, exponent):
    # compute the size of the result from logarithms first: 9**9**9 must be refused, not attempted
    if abs(exponent) > CALC_MAX_EXPONENT:
        raise ValueError("exponent too large")
    if base != 0 and abs(exponent * math.log10(abs(base))) > CALC_MAX_DIGITS:
        raise ValueError("power too large")
    return base ** exponent


_BINARY = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}
_UNARY = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool and complex are not numbers here
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        value = _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    else:
        raise ValueError(f"{type(node).__name__} is not allowed")
    # `not <=` also catches nan and inf; a complex number (a negative base to a fractional power) fails the type
    if type(value) not in (int, float) or not abs(value) <= CALC_MAX_VALUE:
        raise ValueError("result out of range")
    return value


def format_number(x):
    """Integers as integers; floats with 6 significant digits (all the digits of the integer part are kept) and
    no trailing zeros; scientific notation only for very small or very large floats."""
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    if not 1e-4 <= abs(x) < 1e15:
        return f"{x:.6g}"
    decimals = max(0, 5 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}".rstrip("0").rstrip(".")


def calculator(expr):
    """Evaluate an arithmetic expression in the sandbox: the result as text, or None if refused or failing."""
    if not isinstance(expr, str) or len(expr) > CALC_MAX_CHARS:
        return None
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for `1if`: a refusal, not news
            warnings.simplefilter("ignore")
            tree = ast.parse(expr.strip(), mode="eval")
        return format_number(_evaluate(tree.body))
    except Exception:  # nothing is executed, so every failure (SyntaxError, ZeroDivisionError, ...) means "no result"
        return None

# -----------------------------------------------------------------------------
# Tool-using generation: the Engine owns the calculator. generate() above only knows that a row may have tokens
# forced in; the Engine decides when (after <|python_end|>) and what (the sandbox's result, in the tokenizer's
# convention). Every stage that generates replies (sft.py's samples, rl.py, dpo.py, evaluate.py, chat.py) goes
# through it.


class Engine:
    """Generates assistant replies with the calculator tool.

        engine = Engine(model, tokenizer)
        engine.generate_batch([tokenizer.render_for_completion(messages)], num_samples=8, max_new_tokens=256)
        # -> per prompt, per sample: (tokens, mask), mask 0 on the forced calculator outputs

    generate() streams: it yields once per decoding step a list with one entry per row (prompt-major: the
    num_samples rows of prompt 0, then of prompt 1, ...), each `(token, forced)` or None once the row has
    finished. A row finishes after a sampled <|assistant_end|> or <|bos|>, which are yielded (and kept by
    generate_batch): RL learns to end its answers only if the end token is among the tokens it trains on.
    The calculator follows the tokenizer's family: picochat's <|python_start|>expr<|python_end|> and
    <|output_start|>result<|output_end|>, Qwen3's <tool_call> JSON and its tool turn (tokenizer.tool_call and
    tool_output); none for a family without tokens for it (GPT-2). compile: generate's compile (a torch.compile'd
    decoding step)."""

    def __init__(self, model, tokenizer, compile=False):
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self.python_start, self.python_end, self.output_start, self.output_end, self.assistant_end = (
            tokenizer.special(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                                 "<|output_end|>", "<|assistant_end|>"))
        self.stop_tokens = (self.assistant_end, tokenizer.bos_id)

    def prompt_ids(self, prompt):
        """A prompt is token ids (from render_for_completion) or a conversation: a list of messages or
        {"messages": [...]}, rendered up to the assistant's turn."""
        if isinstance(prompt, dict):
            prompt = prompt["messages"]
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.render_for_completion(prompt)
        return list(prompt)

    def tool_output(self, row, generated):
        """model.generate's `force` hook: after a sampled <|python_end|>, the calculator's answer to the call
        since the last <|python_start|>, as the tokens the tokenizer's family frames it with (None: nothing)."""
        if not generated or generated[-1] != self.python_end or self.python_start not in generated:
            return None
        start = len(generated) - 1 - generated[::-1].index(self.python_start)
        expression = self.tokenizer.tool_call(self.tokenizer.decode(generated[start + 1:-1]))
        result = calculator(expression)
        return None if result is None else self.tokenizer.tool_output(result)

    def generate(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, tools=True):
        # the samples of a prompt are identical rows, and model.generate prefills identical rows once
        rows = [ids for ids in map(self.prompt_ids, prompts) for _ in range(num_samples)]
        tools = tools and self.python_end is not None  # a family without calculator tokens: no tool
        yield from generate(self.model, rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_tokens=self.stop_tokens, seed=seed, force=self.tool_output if tools else None,
                            vocab_size=self.tokenizer.vocab_size, compile=self.compile)

    def generate_batch(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                       seed=None, tools=True):
        """Per prompt, per sample: (tokens, mask) of the generated reply, ending with the stop token when one
        was generated within max_new_tokens; mask is 0 on forced calculator outputs, 1 on sampled tokens."""
        rows = [([], []) for _ in range(len(prompts) * num_samples)]
        for step_tokens in self.generate(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed,
                                         tools):
            for (tokens, mask), entry in zip(rows, step_tokens):
                if entry is not None:
                    tokens.append(entry[0])
                    mask.append(0 if entry[1] else 1)
        return [rows[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]

# -----------------------------------------------------------------------------
# Small hardware: weight-only quantisation and LoRA. Both replace modules of a built GPT in place, so the
# architecture stays one: quantize_model stores the linear layers' weights as int8 (per output channel) or int4
# (per group of inputs), de-quantized on the fly; add_lora freezes every weight and puts trainable low-rank adapters
# beside the chosen linear layers (QLoRA when the frozen base is quantized first).

QUANT_FORMATS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes
# Up to this many rows (tokens) per matmul, torch's packed kernels (decoding: memory-bound, so fewer bytes read is
# faster); beyond, de-quantize the weight once and one ordinary matmul (prefill, training: compute-bound). Measured
# on a (3072, 1024) weight, 1 thread, Sapphire Rapids: the int8 kernel takes 0.4 ms at 1 row (fp32 matmul 0.7),
# 2.5 ms at 16 rows, 58 ms at 128, where de-quantize + bf16 matmul takes 10 ms.
KERNEL_MAX_ROWS = 32


def _bf16_round_up(x):
    """x (fp32, > 0) as bf16, rounded up: a scale never below the exact one, so no weight falls outside the grid."""
    y = x.to(torch.bfloat16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def quantize_int8(w):
    """Symmetric per output channel: w (N, K) ~ q * scale[:, None], q int8 in [-127, 127], scale (N,) bf16 =
    max |row| / 127 rounded up. Every weight is within scale / 2 of its de-quantized value."""
    w = w.detach().float()
    scale = _bf16_round_up(w.abs().amax(dim=1).clamp(min=1e-12) / 127)  # (N,)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def pack_int4(codes):
    """(N, K) codes 0..15 -> (N, K/2) uint8 in the layout of torch's CPU int4 kernel
    (_convert_weight_to_int4pack_for_cpu, for N a multiple of 64): blocks of 64 rows stored column by column, byte j
    of a column holding row j of the block in its low nibble and row j + 32 in its high one."""
    N, K = codes.shape
    b = codes.to(torch.uint8).view(N // 64, 64, K).transpose(1, 2)  # (N/64, K, 64)
    return (b[..., :32] | (b[..., 32:] << 4)).contiguous().view(N, K // 2)  # the kernel reads the memory as is


def unpack_int4(packed):
    """pack_int4's inverse: (N, K/2) uint8 -> (N, K) codes 0..15 (uint8)."""
    N, K = packed.shape[0], 2 * packed.shape[1]
    b = packed.view(N // 64, K, 32)
    return torch.cat((b & 15, b >> 4), dim=-1).transpose(1, 2).reshape(N, K)  # via (N/64, K, 64)


def quantize_int4(w, group_size):
    """Asymmetric per group of group_size inputs of a row, torch's int4 convention: w ~ (q - 8) * scale + zero,
    q in 0..15 (packed two per byte, pack_int4), scale and zero bf16. zero is the group's min + 8 scales, rounded to
    bf16; the scale is then the least that keeps the whole group on the grid, rounded up, so every weight is within
    scale / 2 of its de-quantized value. Returns (packed (N, K/2), scale_zero (K/group_size, N, 2))."""
    N, K = w.shape
    g = w.detach().float().view(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, G)
    zero = (lo + 8 * ((hi - lo) / 15)).to(torch.bfloat16)
    z = zero.float()
    scale = _bf16_round_up(torch.maximum((hi - z) / 7, (z - lo) / 8).clamp(min=1e-12))  # (N, G)
    q = torch.round((g - z[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)  # (N, G, g)
    return pack_int4(q.view(N, K)), torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()


@functools.cache
def _packed_kernel_ok(device_type, fmt):
    """Whether torch's packed kernel for fmt runs on this device and agrees with de-quantize + matmul, tried once on
    a small random case (the ops are private: they differ by build and device). On a CPU only with native bf16:
    the kernels take bf16 activations, and their fp32 path measured 20x slower than an fp32 matmul here."""
    device = torch.device(device_type)
    if device.type == "cpu" and not _fast_bf16(device):
        return False
    try:
        layer = QuantLinear(nn.Linear(128, 64, bias=False, device=device), fmt, 32, use_kernel=False)
        x = torch.randn(2, 128, device=device, dtype=torch.bfloat16)
        want = F.linear(x.float(), layer.dequantize(torch.float32))
        got = layer.kernel_matmul(x).float()
        return bool(torch.allclose(got, want, atol=0.02 * want.abs().max().item()))
    except (RuntimeError, NotImplementedError):
        return False


class _QuantMatmul(torch.autograd.Function):
    """x @ W^T for a QuantLinear's frozen W, differentiable in x only. The backward de-quantizes W again instead of
    saving it: a saved copy per layer would hold the whole model in full precision until the backward (QLoRA's
    point is not to)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None  # (..., N) @ (N, K)


class QuantLinear(nn.Module):
    """A frozen linear layer with its weight stored quantized: "int8" per output channel or "int4" per group of
    group_size inputs (quantize_int8, quantize_int4). `weight` holds the codes, `scale` the scales (int8: (N,);
    int4: scales and zeros (K/group_size, N, 2)). The bias, if any, stays as it was."""

    def __init__(self, linear, fmt, group_size=64, use_kernel=True):
        super().__init__()
        N, K = linear.out_features, linear.in_features
        if fmt not in QUANT_FORMATS:
            raise ValueError(f"quantize must be one of {', '.join(QUANT_FORMATS)}, got {fmt!r}")
        if fmt == "int4" and (group_size not in INT4_GROUP_SIZES or K % group_size or N % 64):
            raise ValueError(f"int4 needs outputs in multiples of 64 (torch's packed layout) and inputs in groups of "
                             f"{group_size} (one of {INT4_GROUP_SIZES}); a ({N}, {K}) layer has not: int8 takes any "
                             f"shape")
        self.fmt, self.group_size, self.in_features, self.out_features = fmt, group_size, K, N
        self.dtype = linear.weight.dtype  # what dequantize() gives by default
        q, scale = quantize_int8(linear.weight) if fmt == "int8" else quantize_int4(linear.weight, group_size)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.use_kernel = use_kernel  # where _packed_kernel_ok says the kernel works

    def dequantize(self, dtype=None):
        """The weight (N, K) in dtype (default: the original's)."""
        dtype = dtype or self.dtype
        if self.fmt == "int8":
            return self.weight.to(dtype) * self.scale.to(dtype)[:, None]
        N, K, G = self.out_features, self.in_features, self.in_features // self.group_size
        scale, zero = self.scale.to(dtype).permute(2, 1, 0)  # each (N, G)
        q = unpack_int4(self.weight).view(N, G, self.group_size).to(dtype)  # (N, G, g)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)

    def kernel_matmul(self, x):
        """x (M, K) bf16 @ W^T through torch's packed kernel -> (M, N) bf16."""
        if self.fmt == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale.to(x.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scale.to(x.dtype))

    def matmul(self, x):
        """x (..., K) @ W^T -> (..., N) in x's dtype."""
        rows = x.numel() // self.in_features
        if self.use_kernel and rows <= KERNEL_MAX_ROWS and _packed_kernel_ok(x.device.type, self.fmt):
            y = self.kernel_matmul(x.reshape(rows, self.in_features).to(torch.bfloat16))  # (M, N)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        device = x.device.type
        # under autocast the matmul runs in bf16 anyway: de-quantize straight into it
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return F.linear(x.to(dtype), self.dequantize(dtype)).to(x.dtype)

    def forward(self, x):
        y = _QuantMatmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """A frozen embedding table stored int8 per row (per token), so a lookup de-quantizes only the rows it reads.
    A tied model's table is its head's QuantLinear weight and scale, shared."""

    def __init__(self, weight, scale, dtype):
        super().__init__()
        self.register_buffer("weight", weight)  # (V, C) int8
        self.register_buffer("scale", scale)  # (V,) bf16
        self.dtype = dtype

    def forward(self, idx):
        return self.weight[idx].to(self.dtype) * self.scale[idx].to(self.dtype)[..., None]  # (B, T, C)


def _block_linears(model):
    """(module that holds it, attribute name, short name) of every linear layer of the blocks."""
    short = {"attn": {"c_q": "q", "c_k": "k", "c_v": "v", "c_proj": "o"}, "mlp": {"c_fc": "up", "c_proj": "down"}}
    for block in model.transformer.h:
        for part, names in short.items():
            for attr, name in names.items():
                yield getattr(block, part), attr, name


def quantize_model(model, fmt, group_size=64):
    """Weight-only quantisation in place, at load time and calibration-free: the blocks' linear layers in fmt (int8
    per output channel, int4 per group of group_size inputs); the head and the token embedding in int8 per row,
    whatever fmt: the head is the layer most sensitive to rounding, and a tied head is also the embedding table,
    which must serve lookups. Norm gains, biases and learned positions stay as they are. Returns the model."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_FORMATS)}, got {fmt!r}")
    with torch.no_grad():
        for holder, attr, _ in _block_linears(model):
            layer = getattr(holder, attr)
            if isinstance(layer, LoRALinear):
                layer.base = QuantLinear(layer.base, fmt, group_size)
            elif isinstance(layer, nn.Linear):
                setattr(holder, attr, QuantLinear(layer, fmt, group_size))
        if isinstance(model.lm_head, nn.Linear):
            wte = model.transformer.wte
            head = QuantLinear(model.lm_head, "int8")
            table = (head.weight, head.scale) if model.config.tie_embeddings else quantize_int8(wte.weight)
            model.transformer.wte = QuantEmbedding(*table, wte.weight.dtype)
            model.lm_head = head
    return model


def weight_bytes(model):
    """Bytes of the model's weights: parameters and buffers, each stored tensor once (a tied table counts once),
    leaving out the RoPE tables (recomputed, never saved)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in ("cos", "sin") or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.numel() * t.element_size()
    return total


LORA_TARGETS = ("q", "k", "v", "o", "up", "down")  # attention's q, k, v and output projections; the MLP's up
                                                   # (with swiglu: [gate | up], one adapter) and down projections


@dataclass
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float
    targets: str  # comma-separated LORA_TARGETS
    quantize: str = ""  # the frozen base stored int8 or int4 (QLoRA); "": as loaded
    group_size: int = 64  # int4's group


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * B A dropout(x) (Hu et al. 2021, "LoRA"): the base (nn.Linear, or QuantLinear
    for QLoRA) frozen; A (rank, in) uniform in +-1/sqrt(in) (PEFT's Kaiming init), B (out, rank) zero, so training
    starts exactly from the base. The adapters are fp32 (under autocast they compute in bf16). `enabled` False: the
    base alone (the reference model of KL and DPO, with no second copy)."""

    def __init__(self, base, rank, alpha, dropout, generator):
        super().__init__()
        self.base = base
        device = base.weight.device
        bound = 1 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
                                   .to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    @property
    def in_features(self):
        return self.base.in_features

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., rank)
        return y + F.linear(h, self.lora_B.to(h.dtype)) * self.scaling


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model, rank, alpha=32.0, dropout=0.0, targets=",".join(LORA_TARGETS), quantize="", group_size=64,
             seed=0):
    """LoRA in place: every weight frozen, the base quantized first when `quantize` (QLoRA: quantize_model), then
    an adapter of `rank` on each target layer of every block. The adapters' init comes from `seed` alone, so every
    rank of a DDP run starts identical. Returns the LoRAConfig (also kept as model.lora)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if rank < 1 or not alpha > 0 or not names or set(names) - set(LORA_TARGETS) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1 and targets among "
                         f"{','.join(LORA_TARGETS)}; got rank {rank}, alpha {alpha}, dropout {dropout}, "
                         f"targets {targets!r}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters: merge them first (merge_lora)")
    model.requires_grad_(False)
    if quantize:
        quantize_model(model, quantize, group_size)
    generator = torch.Generator().manual_seed(seed)
    for holder, attr, name in _block_linears(model):
        if name in names:
            setattr(holder, attr, LoRALinear(getattr(holder, attr), rank, alpha, dropout, generator))
    model.lora = LoRAConfig(rank, alpha, dropout, ",".join(names), quantize, group_size)
    return model.lora


def _adapters(model):
    """{name: parameter} of the LoRA adapters (DTensors of slices at --zero=3)."""
    return {name: p for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


def lora_state_dict(model):
    """The adapters alone, whole: {name: tensor}, a small checkpoint (torch.load(weights_only=True) reads it). At
    --zero=3 each is gathered from the ranks' slices (a collective: every rank calls it), the base left alone."""
    return {name: (p.full_tensor() if is_dtensor(p) else p).detach() for name, p in _adapters(model).items()}


@torch.no_grad()
def load_lora_state_dict(model, state):
    """Copy saved adapters (whole) into the model's, each rank taking its slice at --zero=3; a checkpoint of other
    adapters (targets, rank, depth) is refused."""
    own = _adapters(model)
    shapes = lambda d: {k: tuple(v.shape) for k, v in d.items()}  # noqa: E731  (a DTensor's shape is the whole's)
    if shapes(own) != shapes(state):
        raise ValueError(f"the saved adapters ({len(state)} tensors) do not fit this model's "
                         f"({len(own)}, rank {model.lora.rank}, targets {model.lora.targets})")
    for name, p in own.items():
        if is_dtensor(p):  # every rank holds the whole saved tensor: it takes its own slice, no communication
            from torch.distributed.tensor import distribute_tensor
            p.copy_(distribute_tensor(state[name].to(p.device, p.dtype), p.device_mesh, p.placements,
                                      src_data_rank=None))
        else:
            p.copy_(state[name])


@contextlib.contextmanager
def lora_disabled(model):
    """The model without its adapters while inside: the base it started from (a no-op without LoRA)."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its base, W + (alpha / rank) B A, and put plain nn.Linear layers back: the model is a
    GPT without LoRA again (every weight trainable), and as fast. A quantized (QLoRA) base is de-quantized, all of
    it (dequantize_model): the merged model is the very function trained, in full precision; quantize it again to
    serve it small. Returns the model."""
    for holder, attr, _ in _block_linears(model):
        layer = getattr(holder, attr)
        if isinstance(layer, LoRALinear):
            base = _plain_linear(layer.base) if isinstance(layer.base, QuantLinear) else layer.base
            base.weight += layer.scaling * (layer.lora_B.float() @ layer.lora_A.float()).to(base.weight.dtype)
            setattr(holder, attr, base)
    model.lora = None
    return dequantize_model(model).requires_grad_(True)  # as a GPT without LoRA is: ready for full fine-tuning


def _plain_linear(layer):
    """A QuantLinear as an nn.Linear of its de-quantized weight, in the dtype it had."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.weight.device,
                       dtype=layer.dtype)
    linear.weight.copy_(layer.dequantize())
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


@torch.no_grad()
def dequantize_model(model):
    """quantize_model's inverse, as far as rounding allows: plain nn.Linear and nn.Embedding layers holding the
    de-quantized weights, in the dtype they had (a tied table stays tied). Returns the model."""
    for holder, attr, _ in _block_linears(model):
        if isinstance(getattr(holder, attr), QuantLinear):
            setattr(holder, attr, _plain_linear(getattr(holder, attr)))
    wte = model.transformer.wte
    if isinstance(wte, QuantEmbedding):
        table = wte.weight.to(wte.dtype) * wte.scale.to(wte.dtype)[:, None]  # (V, C)
        model.transformer.wte = nn.Embedding.from_pretrained(table, freeze=False)
    if isinstance(model.lm_head, QuantLinear):
        model.lm_head = _plain_linear(model.lm_head)
        model.tie_weights()
    return model

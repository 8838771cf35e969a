"""Reference sequence architectures (own definitions): a ViT, a GPT-style decoder, GLU FFNs, a
Conformer-style block (convolution + attention) and an MLP-Mixer. Their FFN intermediate neurons and
attention heads are the sites. Attention comes in the forms users bring: three projections or one
fused qkv projection (timm's unbind, GPT-2's split or chunk), softmax(q k^T) v or
F.scaled_dot_product_attention (`timm_vit`, `gpt2`).

    >>> gpt = GPT(vocab=64, dim=32, depth=2, heads=4, context=16)
    >>> gpt(torch.randint(0, 64, (2, 16))).shape           # [B, T, vocab]
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and an output projection."""

    def __init__(self, dim: int, heads: int, causal: bool = False, context: int = 512, sdpa: bool = False):
        super().__init__()
        self.dim, self.heads, self.causal, self.sdpa = dim, heads, causal, sdpa
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.register_buffer("mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        B, T, h, dh = x.size(0), x.size(1), self.heads, self.dim // self.heads
        q, k, v = (f(x).view(B, T, h, dh).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:                                                    # the kernel, with a boolean mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:T, :T] if self.causal else None)
            return self.proj(y.transpose(1, 2).reshape(B, T, self.dim))
        att = (q @ k.transpose(-2, -1)) * dh**-0.5                       # [B, h, T, T]
        if self.causal:
            att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
        y = att.softmax(-1) @ v                                          # [B, h, T, dh]
        return self.proj(y.transpose(1, 2).reshape(B, T, self.dim))


class FusedAttention(nn.Module):
    """Self-attention with one qkv projection Linear(dim, 3 dim): `unbind` as timm writes it
    (reshape [B, T, 3, h, dh], permute, unbind), `split` or `chunk` in thirds as GPT-2 code does (then
    one view per tensor); the kernel is F.scaled_dot_product_attention (`sdpa`) or softmax(q k^T) v."""

    def __init__(self, dim: int, heads: int, causal: bool = False, context: int = 512, form: str = "unbind",
                 sdpa: bool = True):
        super().__init__()
        self.heads, self.causal, self.form, self.sdpa = heads, causal, form, sdpa
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm, self.attn_drop = nn.Identity(), nn.Identity(), nn.Dropout(0.1)   # as timm's
        self.register_buffer("mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        h, dh = self.heads, C // self.heads
        if self.form == "unbind":
            q, k, v = self.qkv(x).reshape(B, T, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)   # [B, h, T, dh]
            q, k = self.q_norm(q), self.k_norm(k)
        else:
            q, k, v = self.qkv(x).split(C, dim=2) if self.form == "split" else self.qkv(x).chunk(3, dim=-1)
            q, k, v = q.view(B, T, h, dh).transpose(1, 2), k.view(B, T, h, dh).transpose(1, 2), \
                v.view(B, T, h, dh).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            att = (q * k.size(-1) ** -0.5) @ k.transpose(-2, -1)          # [B, h, T, T]
            if self.causal:
                att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
            y = self.attn_drop(att.softmax(-1)) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """The FFN: Linear -> GELU -> Linear; the hidden neurons are a site."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, causal: bool = False, context: int = 512, attention=Attention):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), attention(dim, heads, causal, context)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Patch embedding (a strided conv), class token, position embedding, pre-norm blocks, head."""

    def __init__(self, image: int = 32, patch: int = 8, dim: int = 64, depth: int = 2, heads: int = 4,
                 classes: int = 10, channels: int = 3, attention=Attention):
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, attention=attention) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)                      # [B, patches, dim]
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class GPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, causal pre-norm blocks, LM head."""

    def __init__(self, vocab: int = 64, dim: int = 64, depth: int = 2, heads: int = 4, context: int = 32,
                 attention=Attention):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, causal=True, context=context, attention=attention)
                                      for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        positions = torch.arange(idx.size(1), device=idx.device)
        return self.head(self.norm(self.blocks(self.tok(idx) + self.pos(positions))))


def timm_vit(**kw) -> ViT:
    """A ViT whose blocks attend as timm's do: fused qkv, reshape/permute/unbind, SDPA."""
    return ViT(attention=partial(FusedAttention, form="unbind"), **kw)


def gpt2(**kw) -> GPT:
    """A GPT whose blocks attend as GPT-2 code does: fused qkv split in thirds, SDPA with is_causal."""
    return GPT(attention=partial(FusedAttention, form="split"), **kw)


class GatedMLP(nn.Module):
    """A GLU FFN, fc2(a * silu(g)): fused (one Linear dim -> 2 hidden, chunked in halves) or, as in
    LLaMA's SwiGLU, two Linears (up, gate). Either way the hidden units are one site."""

    def __init__(self, dim: int, hidden: int, fused: bool = True):
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(dim, 2 * hidden)
        else:
            self.up, self.gate = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, g = self.fc1(x).chunk(2, dim=-1) if self.fused else (self.up(x), self.gate(x))
        return self.fc2(a * F.silu(g))


class GatedFFN(nn.Module):
    """A sequence model of pre-norm GLU FFN blocks with residuals (fused, then two-Linear), mean pool, head."""

    def __init__(self, features: int = 16, dim: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(features, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.ffns = nn.ModuleList([GatedMLP(dim, hidden, fused=True), GatedMLP(dim, hidden, fused=False)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):                                                # [B, T, features]
        x = self.inp(x)
        for norm, ffn in zip(self.norms, self.ffns):
            x = x + ffn(norm(x))
        return self.head(x.mean(1))


class ConformerBlock(nn.Module):
    """Half-step FFN, self-attention, a pointwise-depthwise-pointwise convolution module, half FFN."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ff1_norm, self.ff1 = nn.LayerNorm(dim), MLP(dim, 4 * dim)
        self.attn_norm, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.conv_norm = nn.LayerNorm(dim)
        self.pw1 = nn.Conv1d(dim, 2 * dim, 1)
        self.dw, self.bn = nn.Conv1d(dim, dim, 7, padding=3, groups=dim), nn.BatchNorm1d(dim)
        self.pw2 = nn.Conv1d(dim, dim, 1)
        self.ff2_norm, self.ff2 = nn.LayerNorm(dim), MLP(dim, 4 * dim)

    def forward(self, x):                                                # [B, T, dim]
        x = x + 0.5 * self.ff1(self.ff1_norm(x))
        x = x + self.attn(self.attn_norm(x))
        h = F.glu(self.pw1(self.conv_norm(x).transpose(1, 2)), dim=1)    # [B, dim, T]
        h = self.pw2(F.silu(self.bn(self.dw(h))))
        x = x + h.transpose(1, 2)
        return x + 0.5 * self.ff2(self.ff2_norm(x))


class Conformer(nn.Module):
    def __init__(self, features: int = 16, dim: int = 32, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*(ConformerBlock(dim, heads) for _ in range(depth)))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):                                                # [B, T, features]
        return self.head(self.blocks(self.inp(x)).mean(1))


class MixerBlock(nn.Module):
    """Token mixing (an MLP across patches) then channel mixing (an MLP across features)."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(dim), MLP(tokens, 2 * tokens)
        self.norm2, self.channel_mlp = nn.LayerNorm(dim), MLP(dim, 4 * dim)

    def forward(self, x):                                                # [B, tokens, dim]
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, image: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*(MixerBlock((image // patch) ** 2, dim) for _ in range(depth)))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last axis (written out, as Llama code does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the last axis: the rotary pairing of Llama code."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep: int, h_kv: int, dh: int):
    """[B, h_kv, T, dh] -> [B, h_kv * n_rep, T, dh]: kv head j serves query heads j n_rep .. j n_rep + n_rep - 1
    (Llama's, with the head count and size as numbers: torch.fx cannot unpack a traced shape)."""
    B, T = x.size(0), x.size(2)
    return x[:, :, None, :, :].expand(B, h_kv, n_rep, T, dh).reshape(B, h_kv * n_rep, T, dh)


class LlamaAttention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings: `heads` query heads share
    `kv_heads` key/value heads, repeated as `kv_repeat` says: "expand" (Llama's repeat_kv),
    "interleave" (repeat_interleave) or "sdpa" (F.scaled_dot_product_attention(enable_gqa=True));
    `qk_norm` adds an RMSNorm over head_dim on q and k (as Qwen3 does)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, context: int, qk_norm: bool = False,
                 kv_repeat: str = "expand"):
        super().__init__()
        self.heads, self.kv_heads, self.dh, self.kv_repeat = heads, kv_heads, dim // heads, kv_repeat
        self.q = nn.Linear(dim, heads * self.dh, bias=False)
        self.k, self.v = (nn.Linear(dim, kv_heads * self.dh, bias=False) for _ in range(2))
        self.o = nn.Linear(heads * self.dh, dim, bias=False)
        self.q_norm, self.k_norm = (RMSNorm(self.dh) if qk_norm else nn.Identity() for _ in range(2))
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.dh, 2).float() / self.dh)
        angles = torch.outer(torch.arange(context).float(), inv_freq)                 # [context, dh / 2]
        self.register_buffer("cos", torch.cat((angles, angles), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((angles, angles), -1).sin(), persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        B, T = x.size(0), x.size(1)
        q = self.q_norm(self.q(x).view(B, T, self.heads, self.dh)).transpose(1, 2)       # [B, h, T, dh]
        k = self.k_norm(self.k(x).view(B, T, self.kv_heads, self.dh)).transpose(1, 2)    # [B, h_kv, T, dh]
        v = self.v(x).view(B, T, self.kv_heads, self.dh).transpose(1, 2)
        cos, sin = self.cos.narrow(0, 0, T), self.sin.narrow(0, 0, T)        # [T, dh]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        n_rep = self.heads // self.kv_heads
        if self.kv_repeat == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)     # [B, h, T, dh]
            return self.o(y.transpose(1, 2).reshape(B, T, self.heads * self.dh))
        if self.kv_repeat == "interleave":
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        else:
            k, v = repeat_kv(k, n_rep, self.kv_heads, self.dh), repeat_kv(v, n_rep, self.kv_heads, self.dh)
        att = (q @ k.transpose(-2, -1)) * self.dh ** -0.5                                 # [B, h, T, T]
        att = att.masked_fill(~self.mask.narrow(0, 0, T).narrow(1, 0, T), float("-inf"))
        y = att.softmax(-1) @ v                                                          # [B, h, T, dh]
        return self.o(y.transpose(1, 2).reshape(B, T, self.heads * self.dh))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), without biases: the hidden units are one site."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False),
                                         nn.Linear(hidden, dim, bias=False))

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, context: int, qk_norm: bool, kv_repeat: str):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = LlamaAttention(dim, heads, kv_heads, context, qk_norm, kv_repeat)
        self.ffn_norm, self.ffn = RMSNorm(dim), SwiGLU(dim, 2 * dim)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """A Llama-style decoder: token embedding, pre-RMSNorm blocks (rotary GQA, SwiGLU), LM head."""

    def __init__(self, vocab: int = 50, dim: int = 64, depth: int = 2, heads: int = 8, kv_heads: int = 2,
                 context: int = 32, qk_norm: bool = False, kv_repeat: str = "expand"):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*(LlamaBlock(dim, heads, kv_heads, context, qk_norm, kv_repeat)
                                      for _ in range(depth)))
        self.norm, self.head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        return self.head(self.norm(self.blocks(self.tok(idx))))

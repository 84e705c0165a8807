"""Attention pooling with a learned latent query (timm's ``AttentionPoolLatent``; SigLIP's ``global_pool='map'``
head), on the fused ops.

    q = latent Wq^T + bq                  (1, L, C): the latent is the same for every image, so q is projected
                                          once and broadcast over the batch as a stride-0 view
    k, v = split(x Wkv^T + bkv)           (B, N, C) each, strided views of one GEMM output
    o = attention(q, k, v)                ops.attention with L query rows over N keys (L = 1 for SigLIP)
    y = o Wp^T + bp;  y = y + mlp(norm(y))   ops.linear, then ops.ln_mlp (norm + MLP + residual in one op)
    pooled = y[:, 0] ('token') or mean over the L latents ('avg')

Parameter names and constructor arguments are timm's (``latent``, ``q``, ``kv``, ``q_norm``, ``k_norm``,
``proj``, ``norm``, ``mlp.fc1`` / ``mlp.fc2``, optional ``pos_embed``), so timm / big_vision SigLIP weights
load as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vitkernels import ops
from vitkernels.nn.attention import mask_bias
from vitkernels.nn.init import trunc_normal_
from vitkernels.nn.mlp import Mlp, epilogue_activation, mlp_forward
from vitkernels.nn.norm import LayerNorm


class AttentionPoolLatent(nn.Module):
    """tokens (B, N, C) -> pooled features (B, out_features) (or (B, L, out_features) with pool_type '').

    Args (timm's): in_features (C), out_features (None: C; 0: no proj / norm / MLP), embed_dim (None: C),
        num_heads, feat_size + pos_embed='abs' (a learned (N, C) position embedding added first), mlp_ratio,
        qkv_bias, q_proj (False: the latent is the query), qk_norm, latent_len (L), latent_dim, pool_type
        ('token' | 'avg' | ''), norm_layer, act_layer (an epilogue activation), drop.
    """

    def __init__(self, in_features, out_features=None, embed_dim=None, num_heads=8, feat_size=None, mlp_ratio=4.0,
                 qkv_bias=True, q_proj=True, qk_norm=False, latent_len=1, latent_dim=None, pos_embed="",
                 pool_type="token", norm_layer=None, act_layer=None, drop=0.0, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        embed_dim = embed_dim or in_features
        out_features = in_features if out_features is None else out_features
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if pool_type not in ("token", "avg", ""):
            raise ValueError(f"pool_type must be 'token', 'avg' or '', got {pool_type!r}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.feat_size = feat_size
        self.scale = self.head_dim ** -0.5
        self.pool = pool_type
        if pos_embed == "abs":
            if feat_size is None:
                raise ValueError("pos_embed='abs' needs feat_size")
            self.pos_embed = nn.Parameter(torch.zeros(feat_size, in_features, **dd))
        else:
            self.pos_embed = None
        self.latent_dim = latent_dim or embed_dim
        if not q_proj and self.latent_dim != embed_dim:
            raise ValueError(f"q_proj=False uses the latent as the query: latent_dim {self.latent_dim} must equal "
                             f"embed_dim {embed_dim}")
        self.latent_len = latent_len
        self.latent = nn.Parameter(torch.zeros(1, latent_len, self.latent_dim, **dd))
        self.q = nn.Linear(self.latent_dim, embed_dim, bias=qkv_bias, **dd) if q_proj else nn.Identity()
        self.kv = nn.Linear(embed_dim, embed_dim * 2, bias=qkv_bias, **dd)
        qk_norm_layer = norm_layer or functools.partial(LayerNorm, backend=backend)
        self.q_norm = qk_norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = qk_norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        if out_features > 0:
            self.proj = nn.Linear(embed_dim, out_features, **dd)
            self.proj_drop = nn.Dropout(drop)
            self.norm = norm_layer(out_features, **dd) if norm_layer is not None else nn.Identity()
            self.mlp = Mlp(out_features, int(out_features * mlp_ratio), out_features=out_features, act_layer=act_layer,
                           backend=backend, **dd)
        else:
            self.proj = nn.Identity()
            self.proj_drop = nn.Dropout(drop)
            self.norm = nn.Identity()
            self.mlp = None
            out_features = embed_dim
        self.out_features = out_features
        self.backend = backend
        self.init_weights()

    def init_weights(self) -> None:
        """timm's: truncated-normal latent (and position embedding), std = dim ** -0.5, TF-style (+-2 std)."""
        if self.pos_embed is not None:
            _trunc_normal_tf(self.pos_embed, std=self.pos_embed.shape[1] ** -0.5)
        _trunc_normal_tf(self.latent, std=self.latent_dim ** -0.5)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return attention_pool_forward(self, x, self.backend, attn_mask)


@torch.no_grad()
def _trunc_normal_tf(t: torch.Tensor, std: float) -> None:
    """timm's trunc_normal_tf_: N(0, 1) truncated to [-2, 2], then scaled by std (the same RNG draws)."""
    trunc_normal_(t, std=1.0).mul_(std)


def attention_pool_forward(pool: nn.Module, x: torch.Tensor, backend: str,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, N, C) -> pooled (see the module docstring), for any module with timm's AttentionPoolLatent names
    (this one, and timm's under ``vitkernels.patch_timm``). ``attn_mask``: an additive / boolean mask over the
    keys, as timm's (the fused attention's additive bias)."""
    B, N, _ = x.shape
    H, D, L = pool.num_heads, pool.head_dim, pool.latent_len
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    latent = pool.latent
    q = latent if isinstance(pool.q, nn.Identity) else ops.linear(latent, pool.q.weight, pool.q.bias, backend=backend)
    q = q.view(1, L, H, D).transpose(1, 2).expand(B, H, L, D)  # one projection, a stride-0 view over the batch
    kv = ops.linear(x, pool.kv.weight, pool.kv.bias, backend=backend)  # (B, N, 2 H D)
    k, v = kv.unflatten(-1, (2, H, D)).unbind(2)  # each (B, N, H, D), strided
    q, k, v = pool.q_norm(q), pool.k_norm(k.transpose(1, 2)), v.transpose(1, 2)
    q = q.to(k.dtype)
    o = ops.attention(q, k, v, bias=mask_bias(attn_mask, False, q, k), scale=pool.scale, backend=backend)  # (B, H, L, D)
    y = o.transpose(1, 2).reshape(B, L, H * D)
    if not isinstance(pool.proj, nn.Identity):
        y = ops.linear(y, pool.proj.weight, pool.proj.bias, backend=backend)
    y = pool.proj_drop(y)
    if pool.mlp is not None:
        y = _norm_mlp_residual(pool, y, backend)
    if pool.pool == "token":
        return y[:, 0]
    if pool.pool == "avg":
        return y.mean(1)
    return y


def _norm_mlp_residual(pool: nn.Module, y: torch.Tensor, backend: str) -> torch.Tensor:
    """y + mlp(norm(y)): one ``ops.ln_mlp`` when norm is a LayerNorm and the MLP is plain, else the MLP's GEMMs
    with the residual in fc2's epilogue."""
    norm, mlp = pool.norm, pool.mlp
    act = epilogue_activation(getattr(mlp, "act", None))
    plain = (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 and act is not None
             and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
             and not (mlp.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0)))
    if plain:
        return ops.ln_mlp(y, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                          eps=norm.eps, add_input=True, activation=act, backend=backend)
    return mlp_forward(mlp, norm(y), y, backend)

"""The ``torch`` backend: every op in plain PyTorch, the reference the fused backends are tested against.

Each function takes inputs already validated by ``vitkernels.ops`` and computes in the inputs' dtype, as
eager PyTorch would; called on float64 copies it is the oracle of the tests. Autograd comes from PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def why_unavailable() -> str | None:
    return None


def why_not_device(device: torch.device) -> str | None:
    return None


def kernel_limits(op: str):
    return None  # the reference runs whatever PyTorch runs


def get_op(name: str):
    return {"patch_embed": patch_embed, "layer_norm": layer_norm, "attention": attention, "linear": linear,
            "ln_linear": ln_linear, "ln_mlp": ln_mlp, "attention_qkv": attention_qkv,
            "glu_linear": glu_linear, "ln_glu_mlp": ln_glu_mlp, "rope": rope}.get(name)


def patch_embed(images, weight, bias, pos_embed, prefix_tokens):
    """images (B, C, H, W), weight (D, C, P, P), prefix_tokens (1, K, D) -> tokens (B, K + N, D); see
    vitkernels.ops.patch_embed. timm's VisionTransformer._pos_embed: concat then add when pos_embed covers the
    prefix (T = K + N), add then concat when it does not (no_embed_class, T = N)."""
    P = weight.shape[-1]
    x = F.conv2d(images, weight, bias, stride=P)  # (B, D, H/P, W/P)
    x = x.flatten(2).transpose(1, 2)  # (B, N, D)
    N = x.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == N:  # no_embed_class: patches only
        x = x + pos_embed
        pos_embed = None
    if prefix_tokens is not None:
        x = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed
    return x


def layer_norm(x, weight, bias, eps, residual):
    """x (..., C) -> LN(x), or (LN(x + residual), x + residual)."""
    if residual is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s


def attention(q, k, v, bias, scale):
    """q (B, H, N, D), k/v (B, H, M, D), bias None or broadcastable to (B, H, N, M) -> (B, H, N, D).

    SDPA, except on rows whose bias is all -inf: SDPA returns NaN there (and NaN gradients), the op's
    contract returns 0 with no gradient (vitkernels/ops/attention.py), so those rows get bias 0 and a zeroed
    output."""
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if bias.dtype != q.dtype and not torch.is_autocast_enabled(q.device.type):
        bias = bias.to(q.dtype)  # SDPA takes a float mask in the query's dtype; fp32 biases are allowed
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)  # (B | 1, H | 1, N | 1, 1): every key masked
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(dead, 0.0), scale=scale)
    return out.masked_fill(dead, 0.0)


def attention_qkv(qkv, num_heads, scale):
    """qkv (B, N, 3 H D) -> (B, H, N, D): SDPA on its q, k, v views (autograd stacks their gradients)."""
    from vitkernels.ops.attention_qkv import split_qkv

    return F.scaled_dot_product_attention(*split_qkv(qkv, num_heads), scale=scale)


def activate(y, activation):
    """The epilogue activations by name, as timm computes them: "gelu" (exact erf), "gelu_tanh", "quick_gelu"
    (y sigmoid(1.702 y), OpenAI CLIP), "silu"; None / "none": y itself."""
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    if activation == "silu":
        return F.silu(y)
    return y


def linear(x, weight, bias, activation, residual):
    """x (..., K), weight (M, K) -> act(x W^T + b) + residual, (..., M)."""
    y = activate(F.linear(x, weight, bias), activation)
    if residual is not None:
        y = y + residual
    return y


def ln_linear(x, ln_weight, ln_bias, eps, weight, bias):
    """x (..., K) -> LN(x) W^T + b, (..., M): LayerNorm then Linear, as timm runs them."""
    return F.linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), weight, bias)


def ln_mlp(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_input, activation):
    """x (..., C) -> fc2(act(fc1(LN(x)))) [+ x], (..., O): timm's norm2 -> Mlp (-> residual add)."""
    h = activate(F.linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), fc1_weight, fc1_bias), activation)
    y = F.linear(h, fc2_weight, fc2_bias)
    return y + x if add_input else y


def glu_linear(x, gate_weight, gate_bias, value_weight, value_bias, activation):
    """x (..., C), weights (H, C) -> act(x Wg^T + bg) * (x Wv^T + bv), (..., H): timm's SwiGLU / GluMlp fc1."""
    g = F.linear(x, gate_weight, gate_bias)
    a = torch.sigmoid(g) if activation == "sigmoid" else activate(g, activation)
    return a * F.linear(x, value_weight, value_bias)


def rope(q, k, sin, cos, num_prefix, half):
    """q, k (B, H, T, D), sin / cos (T - P, D) -> (q_rot, k_rot): timm's EvaAttention, patch rows rotated by
    ``x * cos + rot(x) * sin`` at the tables' precision, rounded once to x's dtype; the P prefix rows kept."""

    def rot(x):  # timm's rope_rotate_half (half) or rot (interleaved pairs)
        if half:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat([-x2, x1], dim=-1)
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)

    def rotate(x):
        patches = x[:, :, num_prefix:]
        return torch.cat([x[:, :, :num_prefix], (patches * cos + rot(patches) * sin).to(x.dtype)], dim=2)

    return rotate(q), rotate(k)


def ln_glu_mlp(x, ln_weight, ln_bias, eps, gate_weight, gate_bias, value_weight, value_bias, fc2_weight, fc2_bias,
               add_input, activation):
    """x (..., C) -> fc2(act(LN(x) Wg^T + bg) * (LN(x) Wv^T + bv)) [+ x], (..., O): timm's norm2 -> SwiGLU /
    GluMlp (-> residual add)."""
    h = glu_linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), gate_weight, gate_bias, value_weight,
                   value_bias, activation)
    y = F.linear(h, fc2_weight, fc2_bias)
    return y + x if add_input else y

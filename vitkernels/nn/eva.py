"""Eva: timm's EVA-02 / rope-ViT model (``timm.models.eva.Eva``) on vitkernels ops, and ``eva_from_timm``.

EVA-02 (Fang et al., 2023) is a pre-norm ViT with 2-D rotary position embeddings on q and k of the patch
tokens (``ops.rope``: one fused op writing rotated q and k in the layout ``ops.attention`` reads), q / v
biases without a k bias, and a SwiGLU MLP, optionally with a LayerNorm before fc2 (``scale_mlp``, NormFormer
style). timm's rope ViTs (``vit_*_patch16_rope_reg*_gap_256``) are the same model with a GELU MLP, register
tokens, layer scale and no absolute position embedding (``use_abs_pos_emb=False``).

timm compatibility (timm 1.0.31): the constructor takes timm's arguments and builds timm's module tree, so
timm's state_dict loads with ``strict=True`` (the rope table and the zero k bias are non-persistent buffers,
as in timm); ``forward`` / ``forward_features`` / ``forward_head`` are timm's. The arguments used by the
``eva02_*_patch14_*`` and ``vit_*_rope_*`` models are supported; the others (grouped-query attention, q/k
norm, gated attention, post-norm blocks, attention pooling, patch dropout, dynamic image sizes, rope types
other than 'cat', rope coordinate augmentation, attention dropout, attention masks) raise a ValueError naming
the argument.

Data path per block: LayerNorm -> q/k/v GEMM(s) (``ops.linear``; fused ``qkv`` writes (B, N, 3 C) and q, k, v
are strided views of it) -> ``ops.rope`` on q and k -> ``ops.attention`` -> [LayerNorm] -> proj GEMM ->
layer scale + residual; LayerNorm -> MLP (``mlp_forward``: SwiGLU / packed GluMlp as one ``ops.glu_linear``
(gate and value GEMMs in one pass, the SiLU gate in their epilogue), [LayerNorm], fc2; or GELU in fc1's
epilogue; vitkernels/nn/mlp.py) -> layer scale + residual.

The forwards are module-level functions of the module they run (``eva_attention_forward(attn, x, rope,
backend)``, ``eva_block_forward``, ``eva_forward_features``, ``eva_pos_embed``) reading only timm's attribute
names, so ``vitkernels.patch_timm`` binds the same code onto a timm Eva's modules; ``check_timm_eva`` raises
``eva_from_timm``'s errors without building anything.

Not (yet) here: forward_intermediates / features_only, set_input_size, pretrained-weight loading by name (the
model takes timm's state_dict), fp32_residual; flops.count knows VisionTransformer, not Eva.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from vitkernels import ops
from vitkernels.backends import check_name, prepare
from vitkernels.nn.attention import causal_mask, mask_bias
from vitkernels.nn.block import DropPath
from vitkernels.nn.model_api import ClassifierApi
from vitkernels.nn.mlp import GluMlp, Mlp, SwiGLU
from vitkernels.nn.mlp import mlp_forward as mlp_block_forward
from vitkernels.nn.norm import norm_factory
from vitkernels.nn.patch_embed import PatchEmbed
from vitkernels.nn.vision_transformer import POOLS, global_pool_nlc, prefix_tokens

__all__ = ["Eva", "eva_from_timm", "RotaryEmbeddingCat", "rope_table", "check_timm_eva", "eva_attention_forward",
           "eva_block_forward", "eva_forward_features"]


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


# ----------------------------------------------------------------------------------------------------------
# The rope table: timm's RotaryEmbeddingCat for rope_type='cat' (in_pixels=False: an 'index' grid of
# inverse-frequency bands), computed with timm's operations in timm's order so the table is bit-identical.
# ----------------------------------------------------------------------------------------------------------


def rope_table(dim: int, feat_shape, temperature: float = 10000.0, ref_feat_shape=None, grid_offset: float = 0.0,
               grid_indexing: str = "ij", rotate_half: bool = False) -> torch.Tensor:
    """timm's ``RotaryEmbeddingCat(dim, in_pixels=False, ...).get_embed()``: (H * W, 2 dim) fp32, sin then cos.

    Per axis a, band j < dim / 4 and grid position p_a (0..s_a - 1, plus ``grid_offset``, rescaled to
    ``ref_feat_shape`` as p * ref / s when given): angle = p_a / temperature ** (j / (dim / 4)). The (axis,
    band) angles of a position are flattened axis-major and each is repeated for the two columns of its pair:
    [f0, f0, f1, f1, ...] (interleaved), or the whole list twice with ``rotate_half``. Computed on the CPU, as
    timm computes its cached table.
    """
    num_bands = dim // 4
    exp = torch.arange(0, num_bands, 1, dtype=torch.int64).to(torch.float32) / num_bands
    bands = 1.0 / (float(temperature) ** exp)
    feat_shape = list(feat_shape)
    ref = list(ref_feat_shape) if ref_feat_shape is not None else None
    if grid_indexing == "xy":
        feat_shape = [feat_shape[1], feat_shape[0]]
        ref = [ref[1], ref[0]] if ref is not None else None
    t = [torch.arange(s, dtype=torch.int64).to(torch.float32) + grid_offset for s in feat_shape]
    if ref is not None:
        t = [x / f * r for x, f, r in zip(t, feat_shape, ref)]
    grid = torch.stack(torch.meshgrid(t, indexing=grid_indexing), dim=-1).to(dtype=torch.float32)
    pos = grid.unsqueeze(-1) * bands  # (*shape, 2, num_bands)
    sin, cos = pos.sin().to(torch.float32), pos.cos().to(torch.float32)

    def layout(x):  # (*shape, 2, num_bands) -> (N, dim)
        x = x.flatten(-2).flatten(0, -2)
        return torch.cat([x, x], dim=-1) if rotate_half else x.repeat_interleave(2, -1)

    return torch.cat([layout(sin), layout(cos)], -1)


class RotaryEmbeddingCat(nn.Module):
    """The cached rope table of a fixed patch grid, as timm's module of that name (its buffers ``bands`` and
    ``pos_embed`` are non-persistent: no state_dict keys). ``get_embed()`` -> (H * W, 2 dim), sin then cos."""

    def __init__(self, dim: int, feat_shape, temperature: float = 10000.0, ref_feat_shape=None,
                 grid_offset: float = 0.0, grid_indexing: str = "ij", rotate_half: bool = False, device=None):
        super().__init__()
        self.dim, self.temperature = dim, temperature
        self.feat_shape = list(feat_shape)
        self.ref_feat_shape = list(ref_feat_shape) if ref_feat_shape is not None else None
        self.grid_offset, self.grid_indexing, self.rotate_half = grid_offset, grid_indexing, rotate_half
        self.register_buffer("pos_embed", self._table().to(device), persistent=False)

    def _table(self) -> torch.Tensor:
        return rope_table(self.dim, self.feat_shape, self.temperature, self.ref_feat_shape, self.grid_offset,
                          self.grid_indexing, self.rotate_half)

    def update_feat_shape(self, feat_shape) -> None:
        if list(feat_shape) != self.feat_shape:
            self.feat_shape = list(feat_shape)
            self.pos_embed = self._table().to(self.pos_embed.device)

    def get_embed(self) -> torch.Tensor:
        return self.pos_embed


# ----------------------------------------------------------------------------------------------------------
# Attention, MLP and block with timm's attribute names
# ----------------------------------------------------------------------------------------------------------


class EvaAttention(nn.Module):
    """x (B, N, C) -> proj(attention(rope(q), rope(k), v)) (B, N, C), timm's EvaAttention parameters:
    fused ``qkv`` (no bias) with ``q_bias`` / ``v_bias`` and a zero ``k_bias`` buffer, or separate
    ``q_proj`` / ``k_proj`` (no bias) / ``v_proj``; ``norm`` (scale_attn_inner) before ``proj``."""

    def __init__(self, dim, num_heads, qkv_bias=True, qkv_fused=True, num_prefix_tokens=1, proj_drop=0.0,
                 norm_layer=None, scale_norm=False, rotate_half=False, backend="auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.backend = backend
        if qkv_fused:
            self.qkv = nn.Linear(dim, attn_dim * 3, bias=False, **dd)
            self.q_proj = self.k_proj = self.v_proj = None
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
                self.register_buffer("k_bias", torch.zeros(attn_dim, **dd), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
            else:
                self.q_bias = self.k_bias = self.v_bias = None
        else:
            self.q_proj = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, attn_dim, bias=False, **dd)
            self.v_proj = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.qkv = None
            self.q_bias = self.k_bias = self.v_bias = None
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = norm_layer(attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return eva_attention_forward(self, x, rope, self.backend, attn_mask)


def eva_attention_forward(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, backend: str,
                          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, N, C), rope None or the (N - prefix, 2 D) table (sin then cos) -> (B, N, C), for any module with
    timm's EvaAttention attribute names (this one, and timm's under ``vitkernels.patch_timm``). ``attn_mask``
    (bool, True = attend, or additive): the fused attention's bias."""
    B, N, _ = x.shape
    H = attn.num_heads
    if attn.qkv is not None:
        D = attn.qkv.out_features // (3 * H)
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = ops.linear(x, attn.qkv.weight, bias, backend=backend)  # (B, N, 3 H D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(-1, (3, H, D)).unbind(2))  # (B, H, N, D) views
    else:
        D = attn.q_proj.out_features // H
        q, k, v = (ops.linear(x, p.weight, p.bias, backend=backend).unflatten(-1, (H, D)).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if rope is not None:
        sin, cos = rope.chunk(2, -1)  # (N - prefix, D) views of the table
        q, k = ops.rope(q, k, sin, cos, num_prefix_tokens=attn.num_prefix_tokens,
                        half=getattr(attn, "rotate_half", False), backend=backend)
    o = ops.attention(q, k, v, bias=mask_bias(attn_mask, False, q, k), scale=attn.scale,
                      backend=backend)  # (B, H, N, D), stored (B, N, H, D)
    o = attn.norm(o.transpose(1, 2).reshape(B, N, H * D))
    return attn.proj_drop(ops.linear(o, attn.proj.weight, attn.proj.bias, backend=backend))


def mlp_forward(mlp: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """x (B, N, C) -> the block's MLP output (B, N, C): vitkernels/nn/mlp.py's Mlp (GELU in fc1's epilogue) or
    gated MLP (gate and value in one ``ops.glu_linear``), the optional hidden norm, fc2."""
    return mlp_block_forward(mlp, x, None, backend)


class EvaBlock(nn.Module):
    """Pre-norm block with timm's EvaBlock names: ``norm1``, ``attn``, ``gamma_1``, ``norm2``, ``mlp``,
    ``gamma_2`` (layer scale as bare parameters, as timm's)."""

    def __init__(self, dim, num_heads, qkv_bias=True, qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=False,
                 scale_mlp=False, scale_attn_inner=False, num_prefix_tokens=1, rotate_half=False, proj_drop=0.0,
                 drop_path=0.0, init_values=None, norm_layer=None, backend="auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = EvaAttention(dim, num_heads, qkv_bias=qkv_bias, qkv_fused=qkv_fused,
                                 num_prefix_tokens=num_prefix_tokens, proj_drop=proj_drop, norm_layer=norm_layer,
                                 scale_norm=scale_attn_inner, rotate_half=rotate_half, backend=backend, **dd)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values), **dd)) if init_values is not None else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        hidden = int(dim * mlp_ratio)
        if swiglu_mlp and scale_mlp:
            self.mlp = SwiGLU(dim, hidden, act_layer="silu", norm_layer=norm_layer, drop=proj_drop, backend=backend,
                              **dd)
        elif swiglu_mlp:
            self.mlp = GluMlp(dim, hidden * 2, act_layer="silu", gate_last=False, drop=proj_drop, backend=backend,
                              **dd)
        else:
            self.mlp = Mlp(dim, hidden, norm_layer=norm_layer if scale_mlp else None, drop=proj_drop, act_layer="gelu",
                           backend=backend, **dd)
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values), **dd)) if init_values is not None else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.backend = backend

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return eva_block_forward(self, x, rope, self.backend, attn_mask)


def eva_block_forward(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, backend: str,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C) for any module with timm's EvaBlock attribute names: the norms and ``attn``
    called as modules (``attn(x, rope, attn_mask=...)``, timm's signature), the MLP through ``mlp_forward``."""
    y = blk.attn(blk.norm1(x), rope) if attn_mask is None else blk.attn(blk.norm1(x), rope, attn_mask=attn_mask)
    x = x + blk.drop_path1(y if blk.gamma_1 is None else blk.gamma_1 * y)
    y = mlp_forward(blk.mlp, blk.norm2(x), backend)
    return x + blk.drop_path2(y if blk.gamma_2 is None else blk.gamma_2 * y)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------

# Arguments of timm's Eva that vitkernels cannot compute: name -> (the value it supports, why).
_REFUSED = {
    "num_kv_heads": (None, "grouped-query attention (attn_type='rope') is not implemented"),
    "qk_norm": (False, "q/k normalisation before rope is not implemented"),
    "swiglu_align_to": (0, "SwiGLU hidden-width alignment is not implemented"),
    "attn_type": ("eva", "only EvaAttention is implemented"),
    "patch_drop_rate": (0.0, "patch dropout (which gathers the rope table per sample) is not implemented"),
    "attn_drop_rate": (0.0, "the fused attention has no attention dropout"),
    "attn_only_layer_scale": (False, "layer scale on the attention branch only is not implemented"),
    "rope_shift_coords": (None, "rope coordinate augmentation is not implemented"),
    "rope_jitter_coords": (None, "rope coordinate augmentation is not implemented"),
    "rope_rescale_coords": (None, "rope coordinate augmentation is not implemented"),
    "rope_mrope_section": (None, "MRoPE is not implemented"),
    "use_post_norm": (False, "post-norm blocks (EvaBlockPostNorm) are not implemented"),
    "use_pre_transformer_norm": (False, "a norm before the blocks (and a bias-free patch embedding) is not "
                                        "implemented"),
    "attn_pool_num_heads": (None, "attention pooling is not implemented"),
    "attn_pool_mlp_ratio": (None, "attention pooling is not implemented"),
    "dynamic_img_size": (False, "dynamic image sizes are not implemented"),
    "dynamic_img_pad": (False, "dynamic image padding is not implemented"),
}


class Eva(ClassifierApi, nn.Module):
    """timm's Eva (EVA-02, rope ViTs) on vitkernels ops; see the module docstring for what is supported.

    Args: timm's (``img_size``, ``patch_size``, ``in_chans``, ``num_classes``, ``global_pool``, ``embed_dim``,
    ``depth``, ``num_heads``, ``qkv_bias``, ``qkv_fused``, ``mlp_ratio``, ``swiglu_mlp``, ``scale_mlp``,
    ``scale_attn_inner``, ``drop_rate``, ``pos_drop_rate``, ``proj_drop_rate``, ``drop_path_rate``,
    ``norm_layer``, ``init_values``, ``class_token``, ``num_reg_tokens``, ``no_embed_class``,
    ``use_abs_pos_emb``, ``use_rot_pos_emb``, ``rope_type`` ('cat'), ``rope_grid_offset``,
    ``rope_grid_indexing``, ``rope_temperature``, ``rope_rotate_half``, ``use_post_transformer_norm``,
    ``use_fc_norm``, ``ref_feat_shape``, ``head_init_scale``, ``device``, ``dtype``; the rest of timm's only at
    their defaults), plus ``backend``: the ops backend (``auto | triton | cuda | torch``).
    """

    POOLS = POOLS  # timm's Eva pools as VisionTransformer

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="avg", embed_dim=768,
                 depth=12, num_heads=12, num_kv_heads=None, qkv_bias=True, qkv_fused=True, qk_norm=False,
                 mlp_ratio=4.0, swiglu_mlp=False, swiglu_align_to=0, scale_mlp=False, scale_attn_inner=False,
                 attn_type="eva", drop_rate=0.0, pos_drop_rate=0.0, patch_drop_rate=0.0, proj_drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=None, init_values=None,
                 attn_only_layer_scale=False, class_token=True, num_reg_tokens=0, no_embed_class=False,
                 use_abs_pos_emb=True, use_rot_pos_emb=False, rope_type="cat", rope_grid_offset=0.0,
                 rope_grid_indexing="ij", rope_temperature=10000.0, rope_rotate_half=False, rope_shift_coords=None,
                 rope_jitter_coords=None, rope_rescale_coords=None, rope_mrope_section=None, use_post_norm=False,
                 use_pre_transformer_norm=False, use_post_transformer_norm=None, use_fc_norm=None,
                 attn_pool_num_heads=None, attn_pool_mlp_ratio=None, dynamic_img_size=False, dynamic_img_pad=False,
                 ref_feat_shape=None, head_init_scale=0.001, device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        given = dict(num_kv_heads=num_kv_heads, qk_norm=qk_norm, swiglu_align_to=swiglu_align_to,
                     attn_type=attn_type, patch_drop_rate=patch_drop_rate, attn_drop_rate=attn_drop_rate,
                     attn_only_layer_scale=attn_only_layer_scale, rope_shift_coords=rope_shift_coords,
                     rope_jitter_coords=rope_jitter_coords, rope_rescale_coords=rope_rescale_coords,
                     rope_mrope_section=rope_mrope_section, use_post_norm=use_post_norm,
                     use_pre_transformer_norm=use_pre_transformer_norm, attn_pool_num_heads=attn_pool_num_heads,
                     attn_pool_mlp_ratio=attn_pool_mlp_ratio, dynamic_img_size=dynamic_img_size,
                     dynamic_img_pad=dynamic_img_pad)
        for arg, value in given.items():
            supported, why = _REFUSED[arg]
            if value != supported and not (arg == "num_kv_heads" and value == num_heads):
                raise ValueError(f"Eva: {arg}={value!r} is not supported ({why}); vitkernels supports "
                                 f"{arg}={supported!r}")
        if use_rot_pos_emb and rope_type != "cat":
            raise ValueError(f"Eva: rope_type={rope_type!r} is not supported; vitkernels computes rope_type='cat' "
                             "(EVA-02 and timm's rope ViTs)")
        if global_pool not in POOLS:
            raise ValueError(f"Eva: global_pool={global_pool!r} is not supported; one of "
                             f"{', '.join(repr(p) for p in POOLS)}")
        if global_pool == "token" and not class_token:
            raise ValueError("Eva: global_pool='token' needs class_token=True")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4 and use_rot_pos_emb:
            raise ValueError(f"Eva: embed_dim {embed_dim} must split into num_heads {num_heads} heads of a width "
                             "divisible by 4 (the 2-D rope pairs columns per axis)")
        self.backend = backend = check_name(backend)
        prepare(backend)
        dd = dict(device=device, dtype=dtype)
        norm_layer = norm_factory(norm_layer, eps=1e-6, backend=backend)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + num_reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = False
        self.grad_checkpointing = False
        fc_norm = use_fc_norm if use_fc_norm is not None else global_pool == "avg"
        post_norm = use_post_transformer_norm if use_post_transformer_norm is not None else not fc_norm

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, backend=backend, **dd)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_reg_tokens, embed_dim, **dd)) if num_reg_tokens else None
        self.cls_embed = class_token and self.reg_token is None
        num_pos = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim, **dd)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = None
        self.rope_mixed = False
        if use_rot_pos_emb:
            self.rope = RotaryEmbeddingCat(
                embed_dim // num_heads, self.patch_embed.grid_size, temperature=rope_temperature,
                ref_feat_shape=_pair(ref_feat_shape) if ref_feat_shape is not None else None,
                grid_offset=rope_grid_offset, grid_indexing=rope_grid_indexing, rotate_half=rope_rotate_half,
                device=device)
        else:
            self.rope = None
        self.norm_pre = nn.Identity()
        dpr = ([x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")] if depth > 1
               else [drop_path_rate] * depth)
        self.blocks = nn.ModuleList([
            EvaBlock(embed_dim, num_heads, qkv_bias=qkv_bias, qkv_fused=qkv_fused, mlp_ratio=mlp_ratio,
                     swiglu_mlp=swiglu_mlp, scale_mlp=scale_mlp, scale_attn_inner=scale_attn_inner,
                     num_prefix_tokens=self.num_prefix_tokens, rotate_half=rope_rotate_half,
                     proj_drop=proj_drop_rate, drop_path=dpr[i], init_values=init_values, norm_layer=norm_layer,
                     backend=backend, **dd)
            for i in range(depth)])
        r = self.patch_embed.patch_size[0]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=r) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd) if post_norm else nn.Identity()
        self.attn_pool = None
        self.fc_norm = norm_layer(embed_dim, **dd) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_init_scale = head_init_scale
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    # timm's initialisation (truncated normal 0.02, depth-rescaled output projections, a scaled-down head).
    def init_weights(self) -> None:
        def init(m):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(init)
        for p in (self.pos_embed, self.cls_token, self.reg_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
            if self.head_init_scale and isinstance(self.head, nn.Linear):
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return eva_pos_embed(self, x, self.backend)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        return eva_forward_features(self, x, self.backend, attn_mask, is_causal)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        if pre_logits or not isinstance(self.head, nn.Linear):
            return x if pre_logits else self.head(x)
        return ops.linear(x, self.head.weight, self.head.bias, backend=self.backend)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))


def eva_pos_embed(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """images -> tokens (B, prefix + N, C) for any model with timm's Eva attribute names: one fused op writes the
    prefix rows (class, register tokens) and the patches with the position embedding (over N + prefix rows, or
    the patches only: no_embed_class), as timm's ``_pos_embed``; then position dropout as timm applies it."""
    pe = model.patch_embed.proj
    x = ops.patch_embed(x, pe.weight, pe.bias, pos_embed=model.pos_embed, prefix_tokens=prefix_tokens(model),
                        backend=backend)
    return x if model.pos_embed is None and model.reg_token is None else model.pos_drop(x)


def eva_forward_features(model: nn.Module, x: torch.Tensor, backend: str, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
    """images (B, C, H, W) -> tokens (B, prefix + N, C) after the final norm, for any model with timm's Eva
    attribute names (this one, and timm's under ``vitkernels.patch_timm``): the blocks are called as modules
    with timm's signature ``blk(x, rope)``, checkpointed when ``grad_checkpointing`` is set."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != tuple(model.patch_embed.img_size):
        raise ValueError(f"Eva: expected images (B, {model.in_chans}, {model.patch_embed.img_size[0]}, "
                         f"{model.patch_embed.img_size[1]}), got {tuple(x.shape)}")
    x = model.norm_pre(eva_pos_embed(model, x, backend))
    rope = model.rope.get_embed() if model.rope is not None else None  # (N - prefix, 2 D): sin then cos
    if is_causal:  # timm's Eva takes attn_mask only: causal masking as its bool mask
        if attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True together: give one")
        attn_mask = causal_mask(x.shape[1], x.shape[1], x.device)
    extra = {} if attn_mask is None else dict(attn_mask=attn_mask)
    for blk in model.blocks:
        if model.grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, rope, use_reentrant=False, **extra)
        else:
            x = blk(x, rope, **extra)
    return model.norm(x)


# ----------------------------------------------------------------------------------------------------------
# From timm
# ----------------------------------------------------------------------------------------------------------


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def eva_kwargs_from_timm(model: nn.Module) -> dict:
    """The ``Eva`` constructor arguments (without ``device`` / ``backend``) of timm's ``timm.models.eva.Eva``
    ``model``. Raises ValueError naming what vitkernels does not compute that the arguments cannot express."""
    if type(model).__name__ != "Eva" or not hasattr(model, "blocks"):
        raise ValueError(f"eva_from_timm expects timm.models.eva.Eva, got {type(model).__qualname__}")
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    dim = model.embed_dim
    if type(blk).__name__ != "EvaBlock":
        raise ValueError(f"eva_from_timm: {type(blk).__name__} blocks are not supported (use_post_norm=True)")
    if type(attn).__name__ != "EvaAttention":
        raise ValueError(f"eva_from_timm: {type(attn).__name__} is not supported (attn_type='eva' only)")
    if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
        raise ValueError("eva_from_timm: qk_norm=True is not supported")
    if getattr(attn, "gate", None) is not None:
        raise ValueError("eva_from_timm: gated attention is not supported")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("eva_from_timm: global_pool='map' (attention pooling) is not supported")
    kind = type(mlp).__name__
    if kind == "SwiGLU":
        hidden, swiglu, scale_mlp = mlp.fc1_g.out_features, True, not _is_identity(mlp.norm)
        if not scale_mlp:
            raise ValueError("eva_from_timm: SwiGLU without a norm (swiglu_align_to) is not supported")
    elif kind == "GluMlp":
        hidden, swiglu, scale_mlp = mlp.fc2.in_features, True, not _is_identity(mlp.norm)
        if scale_mlp or mlp.gate_last or not isinstance(mlp.act, nn.SiLU):
            raise ValueError("eva_from_timm: this GluMlp configuration is not supported")
    elif kind == "Mlp":
        hidden, swiglu, scale_mlp = mlp.fc1.out_features, False, not _is_identity(mlp.norm)
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            raise ValueError(f"eva_from_timm: MLP activation {type(mlp.act).__name__} is not supported")
    else:
        raise ValueError(f"eva_from_timm: MLP {kind} is not supported")
    norm1 = blk.norm1
    if not isinstance(norm1, nn.LayerNorm):
        raise ValueError(f"eva_from_timm: norm layer {type(norm1).__qualname__} is not supported (LayerNorm)")
    rope = model.rope
    rope_kwargs = dict(use_rot_pos_emb=False)
    if rope is not None:
        if type(rope).__name__ != "RotaryEmbeddingCat" or rope.in_pixels or rope.grid_type != "index":
            raise ValueError(f"eva_from_timm: rope {type(rope).__name__} is not supported (rope_type='cat')")
        if getattr(rope, "aug_active", False):
            raise ValueError("eva_from_timm: rope coordinate augmentation is not supported")
        if rope.feat_shape is None:
            raise ValueError("eva_from_timm: dynamic_img_size=True is not supported")
        rope_kwargs = dict(use_rot_pos_emb=True, rope_type="cat", rope_grid_offset=rope.grid_offset,
                           rope_grid_indexing=rope.grid_indexing, rope_temperature=rope.temperature,
                           rope_rotate_half=rope.rotate_half, ref_feat_shape=rope.ref_feat_shape)
    dpr = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    qkv_fused = attn.qkv is not None
    pe = model.patch_embed
    return dict(
        img_size=tuple(pe.img_size), patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=dim, depth=len(model.blocks),
        num_heads=attn.num_heads, qkv_bias=(attn.q_bias is not None) if qkv_fused else attn.q_proj.bias is not None,
        qkv_fused=qkv_fused, mlp_ratio=(hidden + 0.5) / dim, swiglu_mlp=swiglu, scale_mlp=scale_mlp,
        scale_attn_inner=not _is_identity(attn.norm), drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p,
        patch_drop_rate=0.0 if model.patch_drop is None else model.patch_drop.prob,
        proj_drop_rate=attn.proj_drop.p, attn_drop_rate=attn.attn_drop.p, drop_path_rate=max(dpr),
        norm_layer=functools.partial(nn.LayerNorm, eps=norm1.eps, elementwise_affine=norm1.elementwise_affine,
                                     bias=norm1.bias is not None),
        init_values=1.0 if blk.gamma_1 is not None else None,
        attn_only_layer_scale=blk.gamma_1 is not None and blk.gamma_2 is None,
        class_token=model.cls_token is not None,
        num_reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        no_embed_class=model.no_embed_class, use_abs_pos_emb=model.pos_embed is not None,
        use_pre_transformer_norm=not _is_identity(model.norm_pre),
        use_post_transformer_norm=not _is_identity(model.norm), use_fc_norm=not _is_identity(model.fc_norm),
        dynamic_img_size=model.dynamic_img_size, dynamic_img_pad=getattr(pe, "dynamic_img_pad", False),
        **rope_kwargs,
    )


def check_timm_eva(model: nn.Module) -> None:
    """Raise ``eva_from_timm``'s ValueError when vitkernels cannot compute timm's Eva ``model``; modify nothing
    (the arguments are checked by building the port on the meta device, which allocates no memory)."""
    Eva(**eva_kwargs_from_timm(model), device="meta", backend="torch")


def eva_from_timm(model: nn.Module, backend: str = "auto") -> Eva:
    """A vitkernels ``Eva`` with the configuration and weights of timm's ``timm.models.eva.Eva`` ``model``
    (its state_dict loaded with ``strict=True``), on the same device and dtype, in the same train/eval mode.
    Raises ValueError naming what vitkernels does not compute (see the module docstring)."""
    p = next(model.parameters())
    ours = Eva(**eva_kwargs_from_timm(model), device="meta", backend=backend)
    ours = ours.to_empty(device=p.device).to(p.dtype)
    if ours.rope is not None:  # non-persistent: rebuilt, not loaded
        ours.rope.pos_embed = ours.rope._table().to(device=p.device, dtype=model.rope.pos_embed.dtype)
    for b in ours.blocks:
        if b.attn.k_bias is not None:
            b.attn.k_bias.zero_()
    ours.load_state_dict(model.state_dict(), strict=True)
    return ours.train(model.training)

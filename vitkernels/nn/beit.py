"""Beit: timm's BEiT / BEiT v2 model (``timm.models.beit.Beit``) on vitkernels ops, and ``beit_from_timm``.

BEiT (Bao et al., 2022) is a pre-norm ViT whose attention scores carry a learned relative position bias: per
head, one scalar per 2-D offset (dy, dx) between two patches, plus three entries for the class token (class
-> patch, patch -> class, class -> class). The table ((2 Gh - 1) (2 Gw - 1) + 3, H) is gathered through a fixed
index (N, N) (N = Gh Gw + 1 tokens) into an (H, N, N) bias, added to q k^T * scale before the softmax. A block
owns its table (``use_rel_pos_bias``, the beit_* / beitv2_* models), or all blocks share one (``rel_pos_bias``,
``use_shared_rel_pos_bias``), or both (the sum). q / v biases without a k bias, layer scale ``gamma_1`` /
``gamma_2``, no absolute position embedding in the released models, mean pooling + ``fc_norm``.

The bias goes to ``ops.attention(q, k, v, bias=(1, H, N, N))``: the kernels read it broadcast over the batch
and, when the table requires grad, return dbias summed over the batch, which autograd's gather backward
scatters into the table (timm's gather, op for op, so the table's gradient accumulates as timm's does).

timm compatibility (timm 1.0.31): the constructor takes timm's arguments and builds timm's module tree, so
timm's state_dict loads with ``strict=True`` (``relative_position_index`` and the zero ``k_bias`` are
non-persistent buffers, as in timm); ``forward`` / ``forward_features`` / ``forward_head`` are timm's; a
seeded construction draws timm's initial weights. Every constructor argument of timm's Beit is taken; attention
dropout (``attn_drop_rate`` > 0: the fused attention has none) and pooling other than '' / 'avg' / 'token'
raise a ValueError naming the argument.

Data path per block: LayerNorm -> fused qkv GEMM (``ops.linear``, bias [q_bias, 0, v_bias]; q, k, v are
strided views of its (B, N, 3 C) output) -> the block's table gathered (H, N, N) [+ the shared one] ->
``ops.attention`` with that bias -> proj GEMM -> layer scale + residual; LayerNorm -> MLP (``mlp_forward``:
GELU in fc1's epilogue, or SwiGLU as one ``ops.glu_linear``; [LayerNorm] with ``scale_mlp``; fc2;
vitkernels/nn/mlp.py) -> layer scale + residual.

The forwards are module-level functions of the module they run (``beit_attention_forward(attn, x,
shared_rel_pos_bias, backend)``, ``beit_block_forward``, ``beit_forward_features``, ``beit_pos_embed``) reading
only timm's attribute names, so ``vitkernels.patch_timm`` binds the same code onto a timm Beit's modules;
``check_timm_beit`` raises ``beit_from_timm``'s errors without building anything.

Not (yet) here: forward_intermediates / features_only, set_input_size (timm resizes the tables with
``resize_rel_pos_bias_table``), pretrained-weight loading by name (the model takes timm's state_dict);
flops.count knows VisionTransformer, not Beit.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from vitkernels import ops
from vitkernels.backends import check_name, prepare
from vitkernels.nn.block import DropPath
from vitkernels.nn.model_api import ClassifierApi
from vitkernels.nn.init import trunc_normal_
from vitkernels.nn.mlp import Mlp, SwiGLU, mlp_forward
from vitkernels.nn.norm import norm_factory
from vitkernels.nn.patch_embed import PatchEmbed, check_images, is_fx_tracing
from vitkernels.nn.vision_transformer import global_pool_nlc

__all__ = ["Beit", "beit_from_timm", "RelativePositionBias", "gen_relative_position_index", "check_timm_beit",
           "beit_attention_forward", "beit_block_forward", "beit_forward_features"]

# timm's Beit pools with the class token, the mean of the patch tokens, or not at all.
BEIT_POOLS = ("", "avg", "token")


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


# ----------------------------------------------------------------------------------------------------------
# The relative position index and bias (timm's gen_relative_position_index / RelativePositionBias)
# ----------------------------------------------------------------------------------------------------------


def num_relative_distance(window_size) -> int:
    """Rows of the bias table: (2 Gh - 1) (2 Gw - 1) patch offsets + class->patch, patch->class, class->class."""
    return (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3


def gen_relative_position_index(window_size, device=None) -> torch.Tensor:
    """(N, N) int64 rows of the bias table, N = Gh Gw + 1 (token 0 the class token), timm's.

    Patches i, j at grid (yi, xi), (yj, xj): (yi - yj + Gh - 1) (2 Gw - 1) + (xi - xj + Gw - 1). Row 0 (class
    -> patch) reads entry R - 3, column 0 (patch -> class) R - 2, (0, 0) R - 1, R = ``num_relative_distance``.
    """
    gh, gw = window_size
    num = num_relative_distance(window_size)
    coords = torch.stack(torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                                        indexing="ij")).flatten(1)  # (2, Gh Gw)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (Gh Gw, Gh Gw, 2): (dy, dx)
    index = torch.zeros((gh * gw + 1,) * 2, device=device, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def gather_rel_pos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (R, H), index (N, N) -> bias (H, N, N), contiguous (the kernels read a key row with unit stride).
    timm's gather, op for op: its backward accumulates the table's gradient in timm's order."""
    N = index.shape[0]
    return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()


class RelativePositionBias(nn.Module):
    """The table shared by every block (timm's ``rel_pos_bias``, ``use_shared_rel_pos_bias``): parameter
    ``relative_position_bias_table`` (R, H), non-persistent buffer ``relative_position_index`` (N, N).
    ``forward()`` -> (H, N, N)."""

    def __init__(self, window_size, num_heads: int, device=None, dtype=None):
        super().__init__()
        self.window_size = _pair(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(num_relative_distance(self.window_size), num_heads, device=device, dtype=dtype))
        self.register_buffer("relative_position_index", torch.empty((self.window_area + 1,) * 2, device=device,
                                                                    dtype=torch.long), persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        idx = self.relative_position_index
        if idx.device.type != "meta":
            idx.copy_(gen_relative_position_index(self.window_size, device=idx.device))

    def forward(self) -> torch.Tensor:
        return gather_rel_pos_bias(self.relative_position_bias_table, self.relative_position_index)


# ----------------------------------------------------------------------------------------------------------
# Attention and block with timm's attribute names
# ----------------------------------------------------------------------------------------------------------


class BeitAttention(nn.Module):
    """x (B, N, C) -> proj(attention(q, k, v, bias=rel_pos_bias)) (B, N, C), timm's beit ``Attention``
    parameters: fused ``qkv`` (no bias) with ``q_bias`` / ``v_bias`` and a zero ``k_bias`` buffer; with a
    ``window_size``, the block's ``relative_position_bias_table`` (R, H) and ``relative_position_index``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_drop=0.0, window_size=None, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        all_head_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim, **dd))
            self.register_buffer("k_bias", torch.zeros(all_head_dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if window_size:
            self.window_size = _pair(window_size)
            self.num_relative_distance = num_relative_distance(self.window_size)
            area = self.window_size[0] * self.window_size[1]
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(self.num_relative_distance, num_heads, **dd))
            self.register_buffer("relative_position_index",
                                 torch.empty((area + 1,) * 2, device=device, dtype=torch.long), persistent=False)
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(all_head_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Fill ``k_bias`` (zero) and ``relative_position_index`` (e.g. after ``to_empty``)."""
        with torch.no_grad():
            if self.k_bias is not None and self.k_bias.device.type != "meta":
                self.k_bias.zero_()
            idx = self.relative_position_index
            if idx is not None and idx.device.type != "meta":
                idx.copy_(gen_relative_position_index(self.window_size, device=idx.device))

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """The block's bias (1, H, N, N)."""
        return gather_rel_pos_bias(self.relative_position_bias_table, self.relative_position_index).unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        return beit_attention_forward(self, x, shared_rel_pos_bias, self.backend)


def beit_attention_forward(attn: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None,
                           backend: str) -> torch.Tensor:
    """x (B, N, C); shared_rel_pos_bias None or (H, N, N), added to the block's own bias as timm does -> (B, N, C),
    for any module with timm's beit ``Attention`` attribute names (this one, and timm's under
    ``vitkernels.patch_timm``; timm's has no ``head_dim``: the width comes from ``qkv``)."""
    B, N, _ = x.shape
    H = attn.num_heads
    D = attn.qkv.out_features // (3 * H)
    qkv_bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = ops.linear(x, attn.qkv.weight, qkv_bias, backend=backend)  # (B, N, 3 H D)
    q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(-1, (3, H, D)).unbind(2))  # (B, H, N, D) views
    bias = None
    if attn.relative_position_bias_table is not None:
        bias = gather_rel_pos_bias(attn.relative_position_bias_table, attn.relative_position_index).unsqueeze(0)
        if shared_rel_pos_bias is not None:
            bias = bias + shared_rel_pos_bias
    elif shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias.unsqueeze(0)
    o = ops.attention(q, k, v, bias=bias, scale=attn.scale, backend=backend)  # (B, H, N, D), stored (B, N, H, D)
    o = o.transpose(1, 2).reshape(B, N, H * D)
    return attn.proj_drop(ops.linear(o, attn.proj.weight, attn.proj.bias, backend=backend))


class BeitBlock(nn.Module):
    """Pre-norm block with timm's beit ``Block`` names: ``norm1``, ``attn``, ``norm2``, ``mlp`` (timm's Mlp
    with GELU, or SwiGLU; a norm before fc2 with ``scale_mlp``), layer scale ``gamma_1`` / ``gamma_2`` as bare
    parameters (present when ``init_values`` is truthy, as timm's)."""

    def __init__(self, dim, num_heads, qkv_bias=False, mlp_ratio=4.0, scale_mlp=False, swiglu_mlp=False,
                 proj_drop=0.0, drop_path=0.0, init_values=None, norm_layer=None, window_size=None,
                 backend="auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = BeitAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
                                  window_size=window_size, backend=backend, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        hidden = int(dim * mlp_ratio)
        mlp_norm = norm_layer if scale_mlp else None
        if swiglu_mlp:
            self.mlp = SwiGLU(dim, hidden, act_layer="silu", norm_layer=mlp_norm, drop=proj_drop, backend=backend,
                              **dd)
        else:
            self.mlp = Mlp(dim, hidden, act_layer="gelu", norm_layer=mlp_norm, drop=proj_drop, backend=backend, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.init_values = init_values
        if init_values:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
        else:
            self.gamma_1, self.gamma_2 = None, None
        self.backend = backend

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        return beit_block_forward(self, x, shared_rel_pos_bias, self.backend)


def beit_block_forward(blk: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None,
                       backend: str) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C) for any module with timm's beit ``Block`` attribute names: the norms and ``attn``
    called as modules (timm's signature), the MLP through ``mlp_forward``."""
    y = blk.attn(blk.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
    x = x + blk.drop_path1(y if blk.gamma_1 is None else blk.gamma_1 * y)
    y = mlp_forward(blk.mlp, blk.norm2(x), None, backend)
    return x + blk.drop_path2(y if blk.gamma_2 is None else blk.gamma_2 * y)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class Beit(ClassifierApi, nn.Module):
    """timm's Beit (BEiT, BEiT v2) on vitkernels ops; see the module docstring for what is supported.

    Args: timm's (``img_size``, ``patch_size``, ``in_chans``, ``num_classes``, ``global_pool`` '' | 'avg' |
    'token', ``embed_dim``, ``depth``, ``num_heads``, ``qkv_bias``, ``mlp_ratio``, ``swiglu_mlp``,
    ``scale_mlp``, ``drop_rate``, ``pos_drop_rate``, ``proj_drop_rate``, ``attn_drop_rate`` (0 only),
    ``drop_path_rate``, ``norm_layer`` (LayerNorm eps 1e-6 by default, as timm's), ``init_values``,
    ``use_abs_pos_emb``, ``use_rel_pos_bias``, ``use_shared_rel_pos_bias``, ``head_init_scale``,
    ``use_fc_norm``, ``device``, ``dtype``), plus ``backend``.
    """

    POOLS = BEIT_POOLS

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="avg", embed_dim=768,
                 depth=12, num_heads=12, qkv_bias=True, mlp_ratio=4.0, swiglu_mlp=False, scale_mlp=False,
                 drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=None, init_values=None, use_abs_pos_emb=True, use_rel_pos_bias=False,
                 use_shared_rel_pos_bias=False, head_init_scale=0.001, use_fc_norm=None, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__()
        if global_pool not in BEIT_POOLS:
            raise ValueError(f"Beit: global_pool={global_pool!r} is not supported; one of "
                             f"{', '.join(repr(p) for p in BEIT_POOLS)} (timm's Beit)")
        if attn_drop_rate:
            raise ValueError(f"Beit: attn_drop_rate={attn_drop_rate!r} is not supported (the fused attention has no "
                             "attention dropout); vitkernels supports attn_drop_rate=0.0")
        if embed_dim % num_heads:
            raise ValueError(f"Beit: embed_dim {embed_dim} must split into num_heads {num_heads} equal heads")
        self.backend = backend = check_name(backend)
        prepare(backend)
        dd = dict(device=device, dtype=dtype)
        norm_layer = norm_factory(norm_layer, eps=1e-6, backend=backend)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, backend=backend, **dd)
        num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim, **dd)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads, **dd) if use_shared_rel_pos_bias else None
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # timm's decay rule
        self.blocks = nn.ModuleList([
            BeitBlock(embed_dim, num_heads, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, scale_mlp=scale_mlp,
                      swiglu_mlp=swiglu_mlp, proj_drop=proj_drop_rate, drop_path=dpr[i], init_values=init_values,
                      norm_layer=norm_layer, window_size=grid if use_rel_pos_bias else None, backend=backend, **dd)
            for i in range(depth)])
        r = self.patch_embed.patch_size[0]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=r) for i in range(depth)]
        use_fc_norm = global_pool == "avg" if use_fc_norm is None else use_fc_norm
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim, **dd)
        self.fc_norm = norm_layer(embed_dim, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_init_scale = head_init_scale
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    # timm's initialisation, draw for draw: truncated normal 0.02 (timm's sampler, nn/init.py; torch's own
    # draws differently) on every Linear (module order), pos_embed, cls_token, depth-rescaled output
    # projections, the head drawn again and scaled down. The Conv2d keeps PyTorch's default; tables, q / v
    # biases zero; layer scale init_values (set in the constructors).
    def init_weights(self) -> None:
        def init(m):
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(init)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
        if self.head_init_scale and isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            with torch.no_grad():
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    def init_non_persistent_buffers(self) -> None:
        """Refill the relative position indices and zero k biases (after ``to_empty`` from the meta device)."""
        for m in self.modules():
            if isinstance(m, (RelativePositionBias, BeitAttention)):
                m.init_non_persistent_buffers()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | {n for n, _ in self.named_parameters()
                                            if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed|rel_pos_bias",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return beit_pos_embed(self, x, self.backend)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return beit_forward_features(self, x, self.backend)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        if pre_logits or not isinstance(self.head, nn.Linear):
            return x if pre_logits else self.head(x)
        return ops.linear(x, self.head.weight, self.head.bias, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def beit_pos_embed(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """images -> tokens (B, 1 + N, C): class token, patches, + pos_embed, in one fused op; for any model with
    timm's Beit attribute names."""
    pe = model.patch_embed.proj
    x = ops.patch_embed(x, pe.weight, pe.bias, pos_embed=model.pos_embed, cls_token=model.cls_token, backend=backend)
    return model.pos_drop(x)


def beit_forward_features(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """images (B, C, H, W) -> tokens (B, 1 + N, C) after the final norm, for any model with timm's Beit
    attribute names (this one, and timm's under ``vitkernels.patch_timm``): the shared table gathered once by
    its module, the blocks called as modules with timm's signature, checkpointed when ``grad_checkpointing``."""
    if not is_fx_tracing():
        check_images(model.patch_embed, x)
    x = beit_pos_embed(model, x, backend)
    rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None  # (H, N, N)
    for blk in model.blocks:
        if model.grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, rel_pos_bias, use_reentrant=False)
        else:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
    return model.norm(x)


# ----------------------------------------------------------------------------------------------------------
# From timm
# ----------------------------------------------------------------------------------------------------------


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def beit_kwargs_from_timm(model: nn.Module) -> dict:
    """The ``Beit`` constructor arguments (without ``device`` / ``backend``) of timm's ``timm.models.beit.Beit``
    ``model``. Raises ValueError naming what vitkernels does not compute that the arguments cannot express."""
    if type(model).__name__ != "Beit" or not hasattr(model, "blocks"):
        raise ValueError(f"beit_from_timm expects timm.models.beit.Beit, got {type(model).__qualname__}")
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    dim = model.embed_dim
    pe = model.patch_embed
    grid = tuple(pe.grid_size)
    if attn.qkv.out_features != 3 * dim:
        raise ValueError(f"beit_from_timm: attn_head_dim (an attention width {attn.qkv.out_features // 3} != "
                         f"embed_dim {dim}) is not supported")
    if attn.window_size is not None and tuple(attn.window_size) != grid:
        raise ValueError(f"beit_from_timm: a relative position window {tuple(attn.window_size)} other than the "
                         f"patch grid {grid} is not supported")
    kind = type(mlp).__name__
    if kind == "SwiGLU":
        hidden, swiglu = mlp.fc1_g.out_features, True
        if not isinstance(mlp.act, nn.SiLU):
            raise ValueError(f"beit_from_timm: SwiGLU activation {type(mlp.act).__name__} is not supported")
    elif kind == "Mlp":
        hidden, swiglu = mlp.fc1.out_features, False
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            raise ValueError(f"beit_from_timm: MLP activation {type(mlp.act).__name__} is not supported")
    else:
        raise ValueError(f"beit_from_timm: MLP {kind} is not supported")
    norm1 = blk.norm1
    if not isinstance(norm1, nn.LayerNorm):
        raise ValueError(f"beit_from_timm: norm layer {type(norm1).__qualname__} is not supported (LayerNorm)")
    dpr = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    return dict(
        img_size=tuple(pe.img_size), patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=dim, depth=len(model.blocks),
        num_heads=attn.num_heads, qkv_bias=attn.q_bias is not None, mlp_ratio=(hidden + 0.5) / dim,
        swiglu_mlp=swiglu, scale_mlp=not _is_identity(mlp.norm), drop_rate=model.head_drop.p,
        pos_drop_rate=model.pos_drop.p, proj_drop_rate=attn.proj_drop.p, attn_drop_rate=attn.attn_drop.p,
        drop_path_rate=max(dpr),
        norm_layer=functools.partial(nn.LayerNorm, eps=norm1.eps, elementwise_affine=norm1.elementwise_affine,
                                     bias=norm1.bias is not None),
        init_values=1.0 if blk.gamma_1 is not None else None, use_abs_pos_emb=model.pos_embed is not None,
        use_rel_pos_bias=attn.relative_position_bias_table is not None,
        use_shared_rel_pos_bias=model.rel_pos_bias is not None, use_fc_norm=not _is_identity(model.fc_norm),
    )


def check_timm_beit(model: nn.Module) -> None:
    """Raise ``beit_from_timm``'s ValueError when vitkernels cannot compute timm's Beit ``model``; modify
    nothing (the arguments are checked by building the port on the meta device, which allocates no memory)."""
    Beit(**beit_kwargs_from_timm(model), device="meta", backend="torch")


def beit_from_timm(model: nn.Module, backend: str = "auto") -> Beit:
    """A vitkernels ``Beit`` with the configuration and weights of timm's ``timm.models.beit.Beit`` ``model``
    (its state_dict loaded with ``strict=True``), on the same device and dtype, in the same train/eval mode.
    Raises ValueError naming what vitkernels does not compute (see the module docstring)."""
    p = next(model.parameters())
    ours = Beit(**beit_kwargs_from_timm(model), device="meta", backend=backend)
    ours = ours.to_empty(device=p.device).to(p.dtype)
    ours.init_non_persistent_buffers()  # not in the state_dict: rebuilt, not loaded
    ours.load_state_dict(model.state_dict(), strict=True)
    return ours.train(model.training)

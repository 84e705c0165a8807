"""VisionTransformer: timm's constructor arguments, module tree, state_dict keys and methods, on vitkernels ops.

The model follows Dosovitskiy et al. (2021): patches -> linear projection -> [class token] + position
embeddings -> L pre-norm blocks (MSA, MLP with GELU) -> LayerNorm -> head on the class token (or a pooling of
the patch tokens: ``global_pool='avg' | 'max' | 'avgmax'``). Every LayerNorm, GEMM, attention and the patch
embedding run through ``vitkernels.ops`` with the backend chosen at construction (``backend=``, changeable
with ``set_backend``); nothing else in the model dispatches.

timm compatibility (timm 1.0.31; tests/test_timm_compat.py holds each point against timm itself): all 42
constructor arguments of timm's VisionTransformer are accepted; those vitkernels cannot compute (other MLPs /
blocks / attention layers than timm's plain ones, activations no fused epilogue computes, 'prr' pooling, a norm
in the patch embedding) raise a ValueError naming the argument and the supported values. Prefix tokens (class
token, ``reg_tokens`` register tokens, DeiT's distillation token in ``VisionTransformerDistilled``) are
written by the fused patch embedding; ``global_pool='map'`` (SigLIP) is an attention-pool head on the fused
attention op (vitkernels/nn/attention_pool.py). The methods around the forward
(``pretrained_cfg``, ``forward_intermediates``, ``get_intermediate_layers``, ``prune_intermediate_layers``,
``feature_info``, ``group_matcher``, ``set_input_size``, ``init_weights`` modes, ``device=`` / ``dtype=``
construction) behave as timm's. Graph capture: torch.export and torch.fx symbolic tracing work (the ops are
leaf calls); TorchScript cannot compile the Python-dispatched ops, so ``torch.jit.script`` raises one error
saying so (see ``__prepare_scriptable__``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitkernels import ops
from vitkernels.backends import check_name, prepare
from vitkernels.nn.attention_pool import AttentionPoolLatent, attention_pool_forward
from vitkernels.nn.block import Block
from vitkernels.nn.mlp import ACTIVATIONS, Mlp, epilogue_activation, mlp_factory
from vitkernels.nn.model_api import set_backend, zero_head
from vitkernels.nn.norm import norm_factory
from vitkernels.nn.patch_dropout import PatchDropout
from vitkernels.nn.patch_embed import PatchEmbed, check_images, is_fx_tracing, pad_images
from vitkernels.nn.pos_embed import resample_pos_embed
from vitkernels.pretrained import default_cfg_for

torch.fx.wrap("resample_pos_embed")  # a leaf call under torch.fx (it reads sizes to decide what to do)

POOLS = ("", "avg", "avgmax", "max", "token")
FP32_RESIDUAL_FX = ("torch.fx cannot trace a model built with fp32_residual=True: which dtype the residual stream "
                    "has depends on autocast when the model runs, not when it is traced. Trace it with "
                    "fp32_residual=False, or capture it with torch.export.export / torch.compile")


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _check_layer(arg: str, value, accepted: dict, what: str) -> None:
    """Raise unless ``value`` is None or one of ``accepted`` (qualified names or strings -> description)."""
    if value is None:
        return
    key = value.lower() if isinstance(value, str) else _qualname(value)
    if key not in accepted:
        raise ValueError(f"{arg}={value!r} is not supported: vitkernels computes {what} "
                         f"(accepted: {', '.join(sorted(set(accepted.values())))}); other {arg}s are not "
                         "implemented yet")


def embed_tokens(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """images (B, C, H, W) -> tokens (B, prefix + N, D) in one fused op (patchify, project, class token,
    position embedding), then position dropout (as timm, none without a position embedding); for any model
    with timm's VisionTransformer attribute names (this one, and timm's under ``vitkernels.patch_timm``).
    Proxy-safe: under torch.fx the input checks are skipped and the position embedding is resampled by a leaf
    call."""
    pe = model.patch_embed
    proj = pe.proj
    P = proj.kernel_size[0]
    tracing = is_fx_tracing()
    if not tracing:
        check_images(pe, x)
    x = pad_images(pe, x)
    pos_embed = model.pos_embed
    if model.dynamic_img_size and pos_embed is not None:
        grid = (x.shape[-2] // P, x.shape[-1] // P)
        if tracing or grid != tuple(pe.grid_size):
            pos_embed = resample_pos_embed(
                pos_embed, grid, old_size=pe.grid_size,
                num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
            )
    x = ops.patch_embed(x, proj.weight, proj.bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens(model),
                        backend=backend)
    if getattr(model, "fp32_residual", False):
        if tracing:
            raise RuntimeError(FP32_RESIDUAL_FX)
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()  # the stream starts fp32 (timm: bf16 patch GEMM + fp32 position embedding)
    if model.pos_embed is None:
        return x  # timm applies position dropout only with a position embedding (pos_embed='none': none)
    return model.pos_drop(x)


def prefix_tokens(model: nn.Module) -> torch.Tensor | None:
    """The model's prefix tokens in timm's order, (1, K, D): class token, register tokens, distillation token
    (each when present), or None. A concatenation of K x D values; its backward splits the patch embedding's
    prefix gradient back onto each parameter."""
    parts = [t for t in (model.cls_token, getattr(model, "reg_token", None), getattr(model, "dist_token", None))
             if t is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def global_pool_nlc(x: torch.Tensor, pool_type: str = "token", num_prefix_tokens: int = 1,
                    reduce_include_prefix: bool = False) -> torch.Tensor:
    """timm's pooling of tokens (B, T, D) -> (B, D): class token, mean, max or (mean + max) / 2 of the patch
    tokens (or of every token with ``reduce_include_prefix``); '' returns the tokens."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    x = x if reduce_include_prefix else x[:, num_prefix_tokens:]
    if pool_type == "avg":
        return x.mean(dim=1)
    if pool_type == "avgmax":
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))
    if pool_type == "max":
        return x.amax(dim=1)
    raise ValueError(f"unknown pool type {pool_type!r}; one of {POOLS}")


def _check_pool(global_pool: str, class_token: bool) -> None:
    if global_pool == "prr":
        raise ValueError(f"global_pool='prr' (timm's AttentionPoolPrr) is not supported yet; use one of "
                         f"{', '.join(repr(p) for p in POOLS + ('map',))}")
    if global_pool not in POOLS + ("map",):
        raise ValueError(f"global_pool must be one of {', '.join(repr(p) for p in POOLS + ('map',))}, "
                         f"got {global_pool!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True")


class VisionTransformer(nn.Module):
    """Vision Transformer, a drop-in for ``timm.models.vision_transformer.VisionTransformer`` (timm 1.0.31).

    Args (timm's names, order and defaults):
        img_size, patch_size, in_chans, num_classes, global_pool ('token' | 'avg' | 'max' | 'avgmax' | 'map' |
        ''),
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_norm, scale_attn_norm (False only),
        scale_mlp_norm (a norm over the MLP's hidden width), proj_bias, init_values (LayerScale), class_token, pos_embed ('learn' | 'none'),
        no_embed_class, reg_tokens (register tokens after the class token), pre_norm, final_norm, fc_norm (None: on for avg / max pooling),
        pool_include_prefix, dynamic_img_size, dynamic_img_pad, drop_rate (head), pos_drop_rate,
        patch_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, weight_init ('' | 'jax' |
        'jax_nlhb' | 'moco' | 'reset' | 'skip'), fix_init, embed_layer (PatchEmbed), embed_norm_layer (None
        only), norm_layer (LayerNorm variants, RmsNorm: ``vitkernels.nn.norm.norm_factory``), act_layer
        ('gelu' (exact), 'gelu_tanh', 'quick_gelu', 'silu', or their module classes; a gated MLP's gate: 'silu',
        'gelu', 'gelu_tanh', 'sigmoid'), mlp_layer (Mlp, GluMlp / SwiGLUPacked, SwiGLU: vitkernels/nn/mlp.py),
        block_fn / attn_layer (timm's or vitkernels' Block / Attention),
        device, dtype.
        norm_eps: LayerNorm eps when norm_layer is None or a name (timm and the paper: 1e-6; HF checkpoints
            use their config's, often 1e-12).
        backend: 'auto' | 'triton' | 'cuda' | 'torch' for every op of the model.
        lean_blocks: run the memory-lean fused blocks (LayerNorm fused into the qkv GEMM, norm2 + MLP as one
            op; the backward keeps 10 C values per token and block instead of 16; see vitkernels/nn/block.py).
            False: the per-op path, every submodule called (forward hooks on norm1 / norm2 / mlp fire).
        fp32_residual: under autocast keep the residual stream in fp32, as timm does (default False: the
            stream is in the autocast dtype and the residual adds are fused into GEMM epilogues); see
            vitkernels/nn/block.py.

    Input: images (B, in_chans, H, W); H, W = img_size unless ``dynamic_img_size``, then any multiple of P
    (any size with ``dynamic_img_pad``).
    Output: logits (B, num_classes), or features (B, embed_dim) when num_classes == 0.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_norm=False,
                 scale_attn_norm=False, scale_mlp_norm=False, proj_bias=True, init_values=None, class_token=True,
                 pos_embed="learn", no_embed_class=False, reg_tokens=0, pre_norm=False, final_norm=True,
                 fc_norm=None, pool_include_prefix=False, dynamic_img_size=False, dynamic_img_pad=False,
                 drop_rate=0.0, pos_drop_rate=0.0, patch_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, weight_init="", fix_init=False, embed_layer=None, embed_norm_layer=None,
                 norm_layer=None, act_layer=None, block_fn=None, mlp_layer=None, attn_layer=None, device=None,
                 dtype=None, norm_eps=1e-6, backend="auto", lean_blocks=True, fp32_residual=False):
        super().__init__()
        _check_pool(global_pool, class_token)
        if weight_init not in ("", "jax", "jax_nlhb", "moco", "reset", "skip"):
            raise ValueError(f"weight_init must be '', 'jax', 'jax_nlhb', 'moco', 'reset' or 'skip', "
                             f"got {weight_init!r}")
        if pos_embed not in ("", "none", "learn"):
            raise ValueError(f"pos_embed must be 'learn' or 'none', got {pos_embed!r}")
        if scale_attn_norm:
            raise ValueError("scale_attn_norm=True is not supported yet: the fused attention has no inner norm "
                             "(use scale_attn_norm=False)")
        if embed_norm_layer is not None:
            raise ValueError(f"embed_norm_layer={embed_norm_layer!r} is not supported yet: the fused patch "
                             "embedding has no norm (use None)")
        _check_layer("embed_layer", embed_layer, {"vitkernels.nn.patch_embed.PatchEmbed": "PatchEmbed",
                                                  "timm.layers.patch_embed.PatchEmbed": "PatchEmbed"},
                     "timm's PatchEmbed (a Conv2d with kernel = stride)")
        _check_layer("block_fn", block_fn, {"vitkernels.nn.block.Block": "Block",
                                            "timm.models.vision_transformer.Block": "Block"},
                     "timm's pre-norm Block")
        mlp_cls, mlp_kwargs = mlp_factory(mlp_layer)
        _check_layer("attn_layer", attn_layer, {"vitkernels.nn.attention.Attention": "Attention",
                                                "timm.layers.attention.Attention": "Attention",
                                                "attn": "'attn'"}, "timm's Attention")
        if mlp_cls is Mlp and epilogue_activation(act_layer) not in ACTIVATIONS:
            raise ValueError(f"act_layer={act_layer!r} is not supported: the fused MLP epilogue computes exact-erf "
                             "GELU, tanh-GELU, QuickGELU and SiLU (accepted: None, 'gelu', 'gelu_tanh', "
                             "'quick_gelu', 'silu', 'swish', nn.GELU (either approximate), nn.SiLU, timm's GELU / "
                             "GELUTanh / QuickGELU)")
        backend = check_name(backend)
        prepare(backend)
        dd = dict(device=device, dtype=dtype)
        make_norm = norm_factory(norm_layer, eps=norm_eps, backend=backend)
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.checkpoint_mode = "full"  # or "selective": see set_grad_checkpointing
        self.fp32_residual = fp32_residual
        self.backend = backend

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm,
                                      strict_img_size=not dynamic_img_size, backend=backend,
                                      dynamic_img_pad=dynamic_img_pad, **dd)
        num_patches = self.patch_embed.num_patches
        reduction = self.patch_embed.feat_ratio()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim, **dd)) if pos_embed == "learn" else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens) \
            if patch_drop_rate > 0 else nn.Identity()
        self.norm_pre = make_norm(embed_dim, **dd) if pre_norm else nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                  proj_bias=proj_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                  init_values=init_values, drop_path=dpr[i], norm_eps=norm_eps, backend=backend,
                  lean=lean_blocks, fp32_residual=fp32_residual, norm_layer=make_norm, act_layer=act_layer,
                  mlp_layer=(mlp_cls, mlp_kwargs), scale_mlp_norm=scale_mlp_norm, **dd)
            for i in range(depth)
        ])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = make_norm(embed_dim, **dd) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                             norm_layer=make_norm, act_layer=act_layer, backend=backend, **dd) \
            if global_pool == "map" else None
        self.fc_norm = make_norm(embed_dim, **dd) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        self.fix_init = fix_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)
        # timm's metadata: create_model replaces pretrained_cfg with the name's (and tag's) config.
        self.pretrained_cfg = self.default_cfg = default_cfg_for(self)
        self.pretrained_model_args = {}

    # -- initialisation ----------------------------------------------------------------------------------
    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's init (vitkernels/nn/init.py): mode '' (trunc-normal(0.02) Linear weights, zero biases),
        'jax' / 'jax_nlhb' (xavier, lecun-normal patch projection, zero head), 'moco', 'reset'; position
        embedding trunc-normal(0.02), class token N(0, 1e-6); ``needs_reset``: other modules'
        ``reset_parameters()`` too (after ``to_empty`` from the meta device). Same RNG draws as timm."""
        from vitkernels.nn.init import init_vit

        init_vit(self, mode or self.weight_init_mode, needs_reset=needs_reset, fix_init=self.fix_init)

    def fix_init_weight(self) -> None:
        from vitkernels.nn.init import fix_init_weight

        fix_init_weight(self)

    def _init_weights(self, m: nn.Module) -> None:
        from vitkernels.nn.init import init_timm

        init_timm(m)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """timm's: load an original JAX/Flax .npz checkpoint (``vitkernels.load_npz``)."""
        from vitkernels.convert import load_npz

        load_npz(self, checkpoint_path, prefix=prefix)

    # -- timm API ---------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise LR decay): the stem, then one group per block."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, selective: bool = False) -> None:
        """Checkpoint every block in training (timm's API). ``selective``: keep GEMM and attention outputs,
        recompute the rest (``vitkernels.nn.checkpoint``); else the whole block is recomputed."""
        self.grad_checkpointing = enable
        self.checkpoint_mode = "selective" if selective else "full"

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a zero-initialised (embed_dim x num_classes) layer, as for fine-tuning in the
        paper (section 3.2): weight and bias all zero, so the new head starts at uniform predictions (timm's
        new head keeps nn.Linear's random init). ``global_pool``: as timm's."""
        if global_pool is not None:
            _check_pool(global_pool, self.has_class_token)
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("reset_classifier cannot add attention pooling (as timm): build the model with "
                                 "global_pool='map'")
            if global_pool != "map":
                self.attn_pool = None  # as timm: another pooling removes the attention pool
            self.global_pool = global_pool
            self._model_args = dict(getattr(self, "_model_args", {}), fc_norm=not isinstance(self.fc_norm, nn.Identity))
        self.num_classes = num_classes
        self.head = zero_head(self, num_classes)
        self.head.train(self.training)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's: a new input resolution (and patch size); the position embedding is resampled (2-D,
        bicubic, as timm) to the new grid."""
        prev = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        if self.pos_embed is not None:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            if self.patch_embed.num_patches + prefix != self.pos_embed.shape[1] or self.patch_embed.grid_size != prev:
                self.pos_embed = nn.Parameter(
                    resample_pos_embed(self.pos_embed.detach(), self.patch_embed.grid_size, old_size=prev,
                                       num_prefix_tokens=prefix),
                    requires_grad=self.pos_embed.requires_grad)
        self._traits = dict(getattr(self, "_traits", {}), img_size=self.patch_embed.img_size)
        args = dict(getattr(self, "_model_args", {}), img_size=self.patch_embed.img_size)
        if patch_size is not None:
            args["patch_size"] = patch_size
        self._model_args = args

    def set_backend(self, backend: str) -> "VisionTransformer":
        """Run every op of the model on ``backend`` from now on."""
        return set_backend(self, backend)

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: TorchScript cannot compile vitkernels' ops (Python functions that
        pick a backend per call and launch Triton / C++ kernels through torch.library with Python autograd),
        so scripting stops here with the alternatives."""
        raise RuntimeError(
            "torch.jit.script cannot compile a vitkernels VisionTransformer: its ops are Python (backend dispatch, "
            "Triton launchers, torch.library custom ops with Python autograd), which TorchScript does not "
            "support. Use torch.export.export(model, (images,)) or torch.compile(model) for a graph, "
            "torch.fx.symbolic_trace(model) for an FX graph, or a timm model (vitkernels.patch_timm keeps a "
            "timm model scriptable: scripting it compiles timm's own code)."
        )

    # -- forward ----------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, prefix + N, D) in one fused op."""
        return embed_tokens(self, x, self.backend)

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """timm's: block outputs at ``indices`` (None: all; n: the last n; a list) as (B, C, H, W) ('NCHW')
        or (B, N, C) ('NLC'), with the final norm (``norm``), prefix tokens split off (and returned with
        ``return_prefix_tokens``); returns (forward_features output, intermediates), or the intermediates
        only. The same code path as ``forward_features``: equal bit for bit (vitkernels/features.py)."""
        from vitkernels.features import forward_intermediates

        return forward_intermediates(self, x, self._embed, indices, return_prefix_tokens, norm, stop_early,
                                     output_fmt, intermediates_only, output_dict, attn_mask, is_causal)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """timm's: remove the blocks after the last of ``indices`` (and the final norm / the head)."""
        from vitkernels.features import prune_intermediate_layers

        return prune_intermediate_layers(self, indices, prune_norm, prune_head)

    def get_intermediate_layers(self, x: torch.Tensor, n=1, reshape: bool = False, return_prefix_tokens: bool = False,
                                norm: bool = False, attn_mask: torch.Tensor | None = None):
        """The DINO / DINOv2 API (timm's): the outputs of the last ``n`` blocks (or of blocks ``n``)."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
                                          attn_mask=attn_mask)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        """images (B, C, H, W) -> normalised tokens (B, prefix + N, D)."""
        from vitkernels.features import trunk

        x, _ = trunk(self, x, self._embed, attn_mask=attn_mask, is_causal=is_causal)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        if self.attn_pool is not None:  # timm: the attention pool reads the patch tokens (or every token)
            x = x if self.pool_include_prefix else x[:, self.num_prefix_tokens:]
            return attention_pool_forward(self.attn_pool, x, self.backend)
        return global_pool_nlc(x, self.global_pool if pool_type is None else pool_type,
                               num_prefix_tokens=self.num_prefix_tokens,
                               reduce_include_prefix=self.pool_include_prefix)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, T, D) -> logits (B, num_classes), or the pooled features with ``pre_logits``."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))


ViT = VisionTransformer


def load_pretrained(model: VisionTransformer, state_dict: dict, strict: bool = True,
                    interpolation: str = "bicubic"):
    """Load a timm-keyed state_dict, resampling position embeddings made at another resolution.

    A checkpoint whose ``pos_embed`` has a different number of patch positions (pre-trained at 224,
    fine-tuned at 384, say) is interpolated in 2-D to the model's grid first. With ``strict``, missing or
    unexpected keys raise a KeyError naming them. Returns ``load_state_dict``'s result.
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"state_dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    pe = state_dict.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        old_n = pe.shape[1] - prefix
        hw = math.isqrt(old_n)
        if hw * hw != old_n:
            raise ValueError(f"checkpoint pos_embed has {old_n} patch positions, not a square grid")
        state_dict["pos_embed"] = resample_pos_embed(pe, model.patch_embed.grid_size, old_size=(hw, hw),
                                                     num_prefix_tokens=prefix, interpolation=interpolation)
    return model.load_state_dict(state_dict, strict=strict)

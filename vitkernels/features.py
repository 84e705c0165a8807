"""Feature extraction as timm does it: ``forward_intermediates``, ``feature_info``, ``features_only=True``.

``forward_intermediates`` here is the one implementation behind ``VisionTransformer.forward_intermediates``
and the patched ``forward_intermediates`` of a timm model under ``vitkernels.patch_timm``; it runs the same
embedding and block calls as the model's ``forward_features`` (``trunk`` below), so an intermediate equals
the corresponding internal tensor of ``forward_features`` bit for bit on every backend, and its last output
with ``norm=True`` is ``forward_features``' output.

``FeatureGetterNet`` and ``FeatureInfo`` mirror timm's classes (timm/models/_features.py): what
``create_model(..., features_only=True, out_indices=...)`` returns, a module whose forward gives the list of
intermediates, with the same state_dict keys (``model.<...>``) and ``feature_info`` accessors.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Callable

import torch
from torch import nn

from vitkernels.nn.checkpoint import checkpointed

__all__ = ["FeatureGetterNet", "FeatureInfo", "feature_take_indices", "forward_intermediates", "trunk"]


def feature_take_indices(num_features: int, indices=None) -> tuple[list[int], int]:
    """timm's: None -> every index; an int n -> the last n; a sequence -> those (negative from the end).
    Returns (absolute indices, the largest)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_features - 1})")
            take.append(idx)
    if not take:
        raise ValueError("indices selects no feature")
    return take, max(take)


def run_block(model: nn.Module, blk: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
    """One block as the model's forward runs it: masked, checkpointed (training with grad checkpointing) or
    plain."""
    if attn_mask is not None or is_causal:
        return blk(x, attn_mask=attn_mask, is_causal=is_causal)
    if model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpointed(blk, x, getattr(model, "checkpoint_mode", "full"))
    return blk(x)


def trunk(model: nn.Module, x: torch.Tensor, embed: Callable, take=(), stop: int | None = None,
          attn_mask=None, is_causal: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """images -> (tokens after block ``stop - 1`` (all blocks when None), [block i's output for i in take]):
    embed, patch dropout, norm_pre, blocks. ``model.forward_features`` is ``model.norm(trunk(...)[0])``."""
    x = embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    blocks = model.blocks if stop is None else model.blocks[:stop]
    taken = []
    if not take and stop is None and attn_mask is None and not is_causal and not (
            model.grad_checkpointing and torch.is_grad_enabled()):
        return blocks(x), taken  # the Sequential itself: hooks on model.blocks fire, as in timm
    for i, blk in enumerate(blocks):
        x = run_block(model, blk, x, attn_mask, is_causal)
        if i in take:
            taken.append(x)
    return x, taken


def forward_intermediates(model: nn.Module, x: torch.Tensor, embed: Callable, indices=None,
                          return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                          output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                          attn_mask=None, is_causal: bool = False):
    """timm's ``VisionTransformer.forward_intermediates`` for ``model`` whose embedding is ``embed``.

    Returns (final normalised tokens, [intermediates]), the list alone with ``intermediates_only``, or timm's
    dict with ``output_dict`` ('image_intermediates', 'image_intermediates_prefix', 'image_features').
    Intermediates are block outputs (``norm``: through the final norm), prefix tokens split off, as
    (B, C, H, W) with ``output_fmt='NCHW'`` or (B, N, C) with 'NLC'.
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    take, max_index = feature_take_indices(len(model.blocks), indices)
    B, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    x, intermediates = trunk(model, x, embed, take=take, stop=max_index + 1 if stop_early else None,
                             attn_mask=attn_mask, is_causal=is_causal)
    if norm:
        intermediates = [model.norm(y) for y in intermediates]
    prefix = model.num_prefix_tokens
    prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
    if prefix:
        intermediates = [y[:, prefix:] for y in intermediates]
    if output_fmt == "NCHW":
        H, W = model.patch_embed.dynamic_feat_size((height, width))
        intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
    if output_dict:
        out = {"image_intermediates": intermediates}
        if prefix_tokens is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix_tokens
        if not intermediates_only:
            out["image_features"] = model.norm(x)
        return out
    if return_prefix_tokens and prefix_tokens is not None:
        intermediates = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return intermediates
    return model.norm(x), intermediates


def prune_intermediate_layers(model: nn.Module, indices=1, prune_norm: bool = False, prune_head: bool = True):
    """timm's: drop the blocks after the last index taken, and the final norm / head when asked."""
    take, max_index = feature_take_indices(len(model.blocks), indices)
    model.blocks = model.blocks[:max_index + 1]
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        model.fc_norm = nn.Identity()
        model.reset_classifier(0, "")
    return take


def _out_indices_as_tuple(x) -> tuple:
    if isinstance(x, int):
        return tuple(range(-x, 0))
    return tuple(x)


class FeatureInfo:
    """timm's FeatureInfo: per feature (block) {'module', 'num_chs', 'reduction', 'index'}, and accessors
    ``channels()``, ``reduction()``, ``module_name()`` over ``out_indices`` (or given indices)."""

    def __init__(self, feature_info: list[dict], out_indices):
        out_indices = _out_indices_as_tuple(out_indices)
        prev = 1
        for i, fi in enumerate(feature_info):
            if not ("num_chs" in fi and fi["num_chs"] > 0 and "module" in fi and fi.get("reduction", 0) >= prev):
                raise ValueError(f"malformed feature_info entry {fi}")
            prev = fi["reduction"]
            fi.setdefault("index", i)
        self.out_indices = out_indices
        self.info = feature_info

    def from_other(self, out_indices):
        return FeatureInfo(deepcopy(self.info), out_indices)

    def get(self, key: str, idx=None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys=None, idx=None):
        if idx is None:
            idx = list(self.out_indices)
        if isinstance(idx, (tuple, list)):
            return [self.info[i] if keys is None else {k: self.info[i][k] for k in keys} for i in idx]
        return self.info[idx] if keys is None else {k: self.info[idx][k] for k in keys}

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self):
        return len(self.info)


class FeatureGetterNet(nn.ModuleDict):
    """timm's FeatureGetterNet: ``forward(x)`` -> the list of ``model.forward_intermediates(x, out_indices,
    norm=norm, output_fmt=output_fmt, intermediates_only=True)``; with ``prune`` the blocks past the last
    index (and the head, and the final norm unless ``norm``) are removed first."""

    def __init__(self, model: nn.Module, out_indices=4, out_map=None, return_dict: bool = False,
                 output_fmt: str = "NCHW", norm: bool = False, prune: bool = True):
        super().__init__()
        if out_map is not None or return_dict:
            raise ValueError("out_map / return_dict are not supported (nor by timm's FeatureGetterNet)")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if prune and hasattr(model, "prune_intermediate_layers"):
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        self.feature_info = FeatureInfo(deepcopy(model.feature_info), out_indices)
        self.model = model
        self.out_indices = out_indices
        self.out_map = out_map
        self.return_dict = return_dict
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)

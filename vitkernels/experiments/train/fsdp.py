"""FSDP2 for ``vitkernels train --fsdp``: shard the model, and save / load / export its sharded state.

Sharding (``shard``): ``torch.distributed.fsdp.fully_shard`` on every block, then on the root (patch
embedding, class token, position embedding, final norm and head). Each rank then holds 1/W of every
parameter, of its gradient and of the AdamW states (fp32: 4 + 4 + 8 bytes per parameter, divided by W); a
block's full weights exist only while it runs (all-gathered in its forward, again in its backward, freed
after), gradients are reduce-scattered. Under ``--amp bf16|fp16`` a ``MixedPrecisionPolicy`` takes the place
of autocast: the all-gathered weights, and so every op of the forward and backward, are in the low
precision, gradients are reduced in fp32, the sharded master weights and AdamW stay fp32. ``--fsdp-offload``
adds ``CPUOffloadPolicy``: sharded weights, gradients and AdamW states live in host memory and the optimizer
step runs on the CPU; the GPU holds only the gathered blocks and the activations.

State (``sharded_state`` / ``load_sharded``): ``torch.distributed.checkpoint.state_dict.get_state_dict``
gives the model and optimizer state keyed by parameter names (the same names with or without sharding), as
DTensors holding this rank's shard; ``torch.distributed.checkpoint`` (DCP) writes every rank's shards in
parallel and reloads them onto any number of ranks (resharding). The atomic directory protocol around a save
lives in ``checkpoint.py``.

Export (``full_state_dict``): the plain, timm-keyed state dict of the whole model on rank 0's CPU, gathered
one tensor at a time (``StateDictOptions(full_state_dict=True, cpu_offload=True)``): a rank's GPU never holds
more than one full parameter beyond its shards.

Needs torch >= 2.6 (``torch.distributed.fsdp.fully_shard``); written against 2.11-2.14.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels.experiments.env import DTYPES, precision


def mixed_precision(amp: str):
    """The MixedPrecisionPolicy for train's ``--amp``: low-precision compute weights, fp32 gradient
    reductions; ``none``: everything fp32 (the default policy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = DTYPES[precision(amp)]
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(model: nn.Module, device: torch.device, *, amp: str = "none", offload: bool = False) -> nn.Module:
    """Shard ``model`` (a VisionTransformer, its weights on ``device``) over every rank of the default
    process group, in place: ``fully_shard`` on each of ``model.blocks``, then on the root. Returns ``model``,
    now also an ``FSDPModule``; its parameters are DTensors (build the optimizer after this).

    Each block is its own unit so that only one block's full weights are gathered at a time; the root unit
    holds the rest (embeddings, final norm, head), gathered once for the whole step.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # Pinned host memory needs a CUDA driver; on a CPU-only run the policy is kept (same code path) unpinned.
    offload_policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mixed_precision(amp), offload_policy=offload_policy)
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model": ..., "optimizer": ...}: this rank's shards, keyed by parameter name (what DCP saves and,
    as a template of the right shapes, loads into). On an optimizer that has not stepped yet, torch
    initialises its states first (one step with zero gradients and lr 0: no weight changes)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Every rank writes its shards of the model and optimizer state to ``directory`` (collective). When it
    returns on any rank, all ranks' files and the global ``.metadata`` are written and fsynced (DCP gathers
    each rank's write results on the coordinator, which writes the metadata last)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=directory)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load the model and optimizer state of the DCP checkpoint ``directory`` into the sharded ``model`` and
    its ``optimizer`` (collective). The checkpoint may come from another number of ranks: each rank reads
    the pieces of the saved shards that overlap its own."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict (plain fp32 CPU tensors, timm keys) on rank 0; ``{}`` on other ranks.
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

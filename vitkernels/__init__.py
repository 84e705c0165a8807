"""vitkernels: Vision Transformers on fused Triton kernels (with a CUDA C++ fallback), drop-in for timm.

    import vitkernels
    model = vitkernels.create_model("vit_base_patch16_224", backend="auto")
    y = vitkernels.ops.layer_norm(x, w, b, residual=r)            # functional ops, any backend
    vitkernels.available_backends()                                 # which backends run here, and why not
"""

from vitkernels import ops
from vitkernels.attention_maps import attention_maps, attention_rollout
from vitkernels.convert import from_hf, from_timm, from_torchvision, load_npz
from vitkernels.backends import BackendError, available_backends
from vitkernels.models import create_model, list_models, load_checkpoint, model_config
from vitkernels.nn import Beit, Eva, VisionTransformer, VisionTransformerDistilled, ViT, load_pretrained, resample_pos_embed
from vitkernels.patch_timm import patch_timm, unpatch_timm
from vitkernels.pretrained import PretrainedWeightsError, get_pretrained_cfg, list_pretrained

__version__ = "0.1.0"

__all__ = ["BackendError", "Beit", "Eva", "PretrainedWeightsError", "VisionTransformer", "VisionTransformerDistilled", "ViT", "attention_maps", "attention_rollout",
           "available_backends", "create_model", "from_hf", "from_timm", "from_torchvision", "get_pretrained_cfg",
           "list_models", "list_pretrained", "load_checkpoint", "load_npz", "load_pretrained", "model_config", "ops",
           "patch_timm", "resample_pos_embed", "unpatch_timm", "__version__"]


def __getattr__(name):
    if name == "flops":  # imported on first use: it registers FLOP formulas for the fused ops
        import importlib

        return importlib.import_module("vitkernels.flops")
    raise AttributeError(f"module 'vitkernels' has no attribute {name!r}")

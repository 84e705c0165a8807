"""vitkernels: Vision Transformers on fused Triton kernels (with a CUDA C++ fallback), drop-in for timm.

    import vitkernels
    model = vitkernels.create_model("vit_base_patch16_224", backend="auto")
    y = vitkernels.ops.layer_norm(x, w, b, residual=r)            # functional ops, any backend
    vitkernels.available_backends()                                 # which backends run here, and why not
"""

from vitkernels import ops
from vitkernels.attention_maps import attention_maps, attention_rollout
from vitkernels.backends import BackendError, available_backends
from vitkernels.models import create_model, list_models, model_config
from vitkernels.nn import VisionTransformer, ViT, load_pretrained, resample_pos_embed

__version__ = "0.1.0"

__all__ = ["BackendError", "VisionTransformer", "ViT", "attention_maps", "attention_rollout", "available_backends", "create_model", "list_models",
           "load_pretrained", "model_config", "ops", "resample_pos_embed", "__version__"]


def __getattr__(name):
    # Optional parts import lazily so `import vitkernels` stays light and never fails on an optional piece.
    lazy = {
        "from_timm": "vitkernels.convert", "from_torchvision": "vitkernels.convert", "from_hf": "vitkernels.convert",
        "load_npz": "vitkernels.convert", "patch_timm": "vitkernels.patch_timm",
        "flops": "vitkernels.flops",
    }
    if name in lazy:
        import importlib

        module = importlib.import_module(lazy[name])
        return module if name == "flops" else getattr(module, name)
    raise AttributeError(f"module 'vitkernels' has no attribute {name!r}")

"""nn modules with timm's class, argument and parameter names, running vitkernels ops."""

from vitkernels.nn.attention import Attention
from vitkernels.nn.attention_pool import AttentionPoolLatent
from vitkernels.nn.beit import Beit
from vitkernels.nn.block import Block, DropPath, LayerScale
from vitkernels.nn.deit import VisionTransformerDistilled
from vitkernels.nn.eva import Eva
from vitkernels.nn.mlp import Mlp
from vitkernels.nn.norm import LayerNorm, RmsNorm
from vitkernels.nn.patch_dropout import PatchDropout
from vitkernels.nn.patch_embed import PatchEmbed
from vitkernels.nn.pos_embed import resample_pos_embed
from vitkernels.nn.vision_transformer import ViT, VisionTransformer, load_pretrained

__all__ = ["Attention", "AttentionPoolLatent", "Beit", "Block", "Eva", "DropPath", "LayerScale", "LayerNorm", "Mlp", "PatchDropout", "PatchEmbed", "RmsNorm",
           "ViT", "VisionTransformer", "VisionTransformerDistilled", "load_pretrained", "resample_pos_embed"]

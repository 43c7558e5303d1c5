"""Model sizes and the options that change how (not what) the model computes."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ACCELERATORS = ("gpu", "tpu")

# name: (patch, D, depth, heads, decoder D, decoder depth, decoder heads)
_SIZES = {
    "tiny": (4, 64, 2, 4, 32, 1, 4),
    "base": (16, 768, 12, 12, 512, 8, 16),
    "large": (16, 1024, 24, 16, 512, 8, 16),
    "huge": (14, 1280, 32, 16, 512, 8, 16),
}
_DEFAULT_IMG = {"tiny": 32, "base": 224, "large": 224, "huge": 224}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture (first block) and execution options (second block).

  Execution options never change the parameters: `scan_layers` runs the same
  stacked block weights under lax.scan (one compiled block) or unrolled;
  `dtype` is the compute dtype (parameters stay float32; 'auto' = bfloat16 on
  a GPU or TPU, float32 on the CPU, resolved when the model is built, so a
  config never initialises a backend); `attention` picks an explicit einsum
  softmax, jax.nn.dot_product_attention's XLA path, its cuDNN fused kernel
  (GPU only), or 'auto': cuDNN where the backend and shape allow it (sequences
  padded to a supported length, padded keys masked), XLA elsewhere.
  """
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  decoder_mlp_ratio: Optional[float] = None   # None: the encoder's mlp_ratio (MAE's models)
  norm_pix_loss: bool = True
  in_chans: int = 3

  dtype: str = "float32"
  scan_layers: bool = True
  attention: str = "xla"
  remat: bool = False

  def __post_init__(self):
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
    for dim, heads, what in ((self.embed_dim, self.num_heads, "embed_dim"),
                             (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim")):
      if dim % heads:
        raise ValueError(f"{what} {dim} is not divisible by its number of heads {heads}")
    if self.embed_dim % 4 or self.decoder_embed_dim % 4:
      raise ValueError("2-D sin-cos position tables need embed dims divisible by 4")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")

  @property
  def compute_dtype(self) -> str:
    """`dtype` with 'auto' resolved for the backend in use."""
    if self.dtype != "auto":
      return self.dtype
    import jax  # pylint: disable=g-import-not-at-top
    return "bfloat16" if jax.default_backend() in ACCELERATORS else "float32"

  @property
  def decoder_ratio(self) -> float:
    """The decoder blocks' MLP ratio (some checkpoints differ from the encoder's)."""
    return self.mlp_ratio if self.decoder_mlp_ratio is None else self.decoder_mlp_ratio

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.in_chans


def model_config(size: str, **overrides: Any) -> ModelConfig:
  """ModelConfig for 'tiny' | 'base' | 'large' | 'huge', with field overrides."""
  if size not in _SIZES:
    raise ValueError(f"unknown model size {size!r}; choose from {sorted(_SIZES)}")
  p, d, depth, heads, dd, ddepth, dheads = _SIZES[size]
  fields = dict(img_size=_DEFAULT_IMG[size], patch_size=p, embed_dim=d, depth=depth,
                num_heads=heads, decoder_embed_dim=dd, decoder_depth=ddepth,
                decoder_num_heads=dheads)
  fields.update(overrides)
  return ModelConfig(**fields)


SIZES = tuple(_SIZES)

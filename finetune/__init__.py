"""voicefoundry's fine-tuning engine and model runtime (never imports Litestar)."""

from finetune.runtime import early_preload as _early_preload

# The optimised BLAS has to be in the global scope before anything imports mlx.core.
_early_preload()

"""voicefoundry's speech service (Litestar)."""

import finetune  # noqa: F401  (loads the optimised BLAS before anything imports mlx.core)

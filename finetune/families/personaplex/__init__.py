"""NVIDIA PersonaPlex (Moshi-based full-duplex speech-to-speech) on mlx-audio Moshi + Mimi."""

"""Qwen3-TTS (12 Hz, 0.6B / 1.7B) on mlx-audio."""

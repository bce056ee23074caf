"""Sesame CSM (llama backbone + depth decoder over Mimi codes) on mlx-audio's `sesame` model."""

"""The MLX side of the service: one worker thread, batched generation, the adapter bank."""

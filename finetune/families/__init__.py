"""One package per model family: checkpoint loading, tiny models, layout, loss, LoRA scope, bake."""

"""InternVL checkpoints on disk, the tiling rule, and the generated tiny models."""

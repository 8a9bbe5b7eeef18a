"""Embedding photos: the Embedder (no Ray), sources, the Ray Data pipeline, the embedding store."""

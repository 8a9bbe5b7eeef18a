"""The faiss index: choice (pure), faiss operations, build (Ray), publish, search (Catalogue)."""

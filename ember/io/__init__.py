"""Reading and writing the files models come in: safetensors checkpoints, GGUF files, tokenizers.

Submodules are imported on demand (``from ember.io import gguf``) so that using one format never
pays for the others' dependencies.
"""

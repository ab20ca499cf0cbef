"""What runs in the engine process on the GPU: the only code that imports torch, exllamav2 or
triton."""

"""The runtime behind one door (engine.types): engine processes, their client and pool, the
download and load; engine.gpu holds everything that imports torch, exllamav2 or triton."""

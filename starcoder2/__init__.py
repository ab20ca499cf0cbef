"""StarCoder2-15B-Instruct's own facts, in plain Python: its prompt format, tokens, sampling
settings, the EXL2 branch catalogue and the domain errors (no torch, no engine, no web)."""

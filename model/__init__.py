"""StarCoder2-15B-Instruct (EXL2) chat: prompt, branches, settings, download and engine."""

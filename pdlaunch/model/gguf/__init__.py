"""GGUF files as checkpoints: the header read and checked (metadata.py, check.py), the vocabulary rebuilt as
tokenizer.json (tokenizer.py, sentencepiece.py), llama3 rope from rope_freqs (rope.py), and the conversion
into a local HF-format directory that the engine loads like any other (convert.py)."""

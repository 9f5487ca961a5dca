"""Checkpoint conversion: Hugging Face Llama / Mistral / Qwen2 directories <-> params."""

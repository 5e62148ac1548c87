"""Talking to models: one Generator protocol over transformers, llama.cpp and OpenAI-compatible APIs."""

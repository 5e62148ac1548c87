"""Export: Hugging Face models to GGUF for llama.cpp, quantized and verified."""

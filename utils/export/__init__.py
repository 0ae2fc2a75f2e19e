"""What export_checkpoint.py merges and writes with: the adapter read and merged tensor by tensor (adapters.py),
HF safetensors shards (shards.py), Meta's Llama layout (meta_layout.py), llama.cpp's GGUF and Ollama (gguf.py)."""

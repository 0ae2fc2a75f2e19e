"""Code the stage scripts share; what only one stage uses lives in a subpackage named for it.

Shared by every stage (import what you need):
- cli.py: run_cli, the fire entry point that turns a CodeUpError into a one-line message
- errors.py: CodeUpError
- files.py: the one reader and writer of every file a stage reads or writes (errors name the file and line)
- logs.py: logger, the one notice channel (warning: ... on stderr, rank 0 only)
- prompter.py: prompt templates (build a prompt, cut the response out of generated text)
- chat_data.py: chat-format records (Alpaca, messages, ShareGPT), chat templates, assistant-only labels
- tokenization.py: tokenization and label masking for training
- model_loading.py: models and tokenizers from a hub id, a folder, a .gguf file or `smollm2-135m`
- precision.py: the one policy for dtypes (bf16/fp16/fp32, 8-bit and 4-bit)

Subpackages, one per stage's concern:
- train/: what finetune.py and finetune_rl.py train with (per-example attention, the chunked loss,
  checkpoints, the RL reward and trainer, speedups/)
- serve/: what answers prompts (generation; the OpenAI-compatible API generate.py serves)
- eval/: what evaluate.py scores with (its scorer, benchmarks, programs per language, the sandbox, an API
  client); finetune_rl.py's reward and finetune.py's pass@1 while training run through the same
  programs and sandbox
- export/: what export_checkpoint.py writes with (the adapter merge, safetensors shards, GGUF)
The data stage's own helpers (language detection, syntax check) live beside it in data/.

Modules import their heavy libraries themselves, so that e.g. the data stage never loads torch.
"""

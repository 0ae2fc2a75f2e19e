"""Code shared by the CodeUp stage scripts, one module per concern (import what you need):

- cli.py: run_cli, the fire entry point that turns a CodeUpError into a one-line message
- errors.py: CodeUpError
- prompter.py: prompt templates (build a prompt, cut the response out of generated text)
- tokenization.py: tokenization and label masking for training
- model_loading.py: models and tokenizers from a hub id, a folder, a .gguf file or `smollm2-135m`
- generation.py: Generator, prompt in and response out (greedy, sampled, streamed, batched)
- chat_data.py: chat-format records (Alpaca, messages, ShareGPT), chat templates, assistant-only labels
- openai_api.py: the OpenAI-compatible routes generate.py serves beside the page
- api_generation.py: generation through any OpenAI-compatible server (evaluate.py --api_base)
- language_detection.py: Guesslang's programming-language model, batched
- benchmarks.py: HumanEval and MBPP problems; the benchmark texts decontamination checks
- multilingual.py: HumanEval-X and MultiPL-E: problems, the programs they run, toolchains
- sandbox.py: compiles and runs untrusted programs (model-written code) in isolated, limited subprocesses
- logs.py: logger, the one notice channel (warning: ... on stderr, rank 0 only)
- files.py: the one reader of every file a stage reads (text, JSON, JSON Lines): errors name the file and line

Modules import their heavy libraries themselves, so that e.g. the data stage never loads torch.
"""

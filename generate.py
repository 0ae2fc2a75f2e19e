"""Inference stage: answer an instruction with a base model (+ optional LoRA adapter).

    python generate.py --instruction "Write a Python function that reverses a string."

The Gradio web demo, streaming and batch files arrive with the inference issue; this is the
scripted single-answer mode, built on the shared loading and prompt code.
"""

import torch

from utils.cli import run_cli
from utils.errors import CodeUpError
from utils.model_loading import DEFAULT_BASE_MODEL, load_model_and_tokenizer
from utils.prompter import Prompter


def main(
    base_model: str = DEFAULT_BASE_MODEL,  # hub id, local HF folder, .gguf file, or smollm2-135m
    lora_weights: str | None = None,  # a LoRA adapter folder trained by finetune.py
    prompt_template: str = "alpaca",  # template name in templates/ or a JSON path
    instruction: str | None = None,  # the task to answer
    input: str | None = None,  # optional context for the task
    max_new_tokens: int = 256,
    load_8bit: bool = False,
):
    """Print the model's answer to --instruction (greedy decoding)."""
    if not instruction or not str(instruction).strip():
        raise CodeUpError("give an instruction: python generate.py --instruction 'Write ...'")
    prompter = Prompter(prompt_template)
    model, tokenizer = load_model_and_tokenizer(base_model, padding_side="left", load_in_8bit=load_8bit)
    if lora_weights:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora_weights)
    model.eval()
    prompt = prompter.generate_prompt(str(instruction), input)
    batch = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    print(prompter.response_from_continuation(text))


if __name__ == "__main__":
    run_cli(main)

"""Generation shared by the inference and evaluation stages: prompt in, response out.

A Generator holds a model, its tokenizer and prompt template. It generates greedily when the
temperature is 0, stops at EOS or where the model starts the template's next section, streams
with transformers' TextIteratorStreamer, batches with left padding, and runs one request at a
time (a lock), so a web page and a script can share it.
"""

import threading
from pathlib import Path

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from utils.errors import CodeUpError
from utils.model_loading import DEFAULT_BASE_MODEL, load_model_and_tokenizer
from utils.prompter import Prompter, resolve_prompt_template

# The page's controls: (minimum, maximum, default); values from the API are clamped to them.
TEMPERATURE = (0.0, 1.0, 0.1)
TOP_P = (0.0, 1.0, 0.75)
TOP_K = (0, 100, 40)
BEAMS = (1, 4, 1)
MAX_NEW_TOKENS = (1, 2000, 512)


def clamp(value, limits, cast):
    low, high, default = limits
    try:
        value = cast(value)
    except (TypeError, ValueError):
        return default
    return min(max(value, low), high)


class CancelOnEvent(StoppingCriteria):
    """Stops a generation when its event is set (the page's user left, or the CLI was interrupted)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generator:
    """A model, its tokenizer and template; generates one request at a time."""

    def __init__(self, base_model=DEFAULT_BASE_MODEL, lora_weights=None, load_8bit=False, prompt_template=None):
        # None: the template the adapter was trained with (recorded by finetune.py), else alpaca.
        self.prompter = Prompter(resolve_prompt_template(prompt_template, lora_weights))
        self.model, self.tokenizer = load_model_and_tokenizer(base_model, padding_side="left", load_in_8bit=load_8bit)
        if lora_weights:
            self.model = load_adapter(self.model, lora_weights, base_model)
        self.model.eval()
        self.lock = threading.Lock()

    def settings(self, temperature=TEMPERATURE[2], top_p=TOP_P[2], top_k=TOP_K[2], num_beams=BEAMS[2],
                 max_new_tokens=MAX_NEW_TOKENS[2]) -> GenerationConfig:
        temperature = clamp(temperature, TEMPERATURE, float)
        sample = temperature > 0  # temperature 0 means greedy
        return GenerationConfig(
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=clamp(top_p, TOP_P, float) if sample else None,
            top_k=clamp(top_k, TOP_K, int) if sample else None,
            num_beams=clamp(num_beams, BEAMS, int),
            max_new_tokens=clamp(max_new_tokens, MAX_NEW_TOKENS, int),
            # Stop at EOS, or where the model starts the template's next section.
            stop_strings=self.prompter.section_headers,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _inputs(self, prompts):
        return self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)

    def answer(self, instruction, input=None, **settings) -> str:
        return self.answer_batch([(instruction, input)], **settings)[0]

    def answer_batch(self, records, **settings) -> list[str]:
        """Responses to (instruction, input) pairs, generated together (left padding)."""
        prompts = [self.prompter.generate_prompt(instruction, input) for instruction, input in records]
        inputs = self._inputs(prompts)
        with self.lock, torch.no_grad():
            output = self.model.generate(**inputs, generation_config=self.settings(**settings), tokenizer=self.tokenizer)
        continuations = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [self.prompter.response_from_continuation(text) for text in continuations]

    def stream(self, instruction, input=None, **settings):
        """Yields the response as it grows, token by token."""
        inputs = self._inputs([self.prompter.generate_prompt(instruction, input)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        cancel = threading.Event()
        failure = []

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(**inputs, generation_config=self.settings(**settings), tokenizer=self.tokenizer,
                                        streamer=streamer, stopping_criteria=StoppingCriteriaList([CancelOnEvent(cancel)]))
            except Exception as error:  # surfaced in the caller's thread below
                failure.append(error)
                streamer.end()

        with self.lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    yield self.visible_response(text)
            finally:
                cancel.set()  # the consumer stopped early: end the generation too
                worker.join()
        if failure:
            raise failure[0]
        yield self.prompter.response_from_continuation(text)

    def visible_response(self, text: str) -> str:
        """The response so far, without a trailing half-written section header ("### Ins")."""
        response = self.prompter.response_from_continuation(text)
        last_line = response.rsplit("\n", 1)[-1].strip()
        if last_line.startswith("#") and any(h.startswith(last_line) for h in self.prompter.section_headers):
            response = response[: len(response) - len(last_line)].rstrip()
        return response


def load_adapter(model, lora_weights: str, base_model: str):
    from peft import PeftModel

    folder = Path(lora_weights).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise CodeUpError(f"--lora_weights {folder}: no adapter_config.json (train one with finetune.py)")
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (ValueError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CodeUpError(f"the LoRA adapter in {folder} does not fit base model {base_model}: {first_line}") from None

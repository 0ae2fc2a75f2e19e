"""Generation shared by the inference and evaluation stages: prompt in, response out.

A Generator holds a model, its tokenizer and prompt template. It generates greedily when the
temperature is 0, stops at EOS or where the model starts the template's next section, streams
with transformers' TextIteratorStreamer, batches with left padding, and runs one request at a
time (a lock), so a web page, the OpenAI-compatible API and a script can share it. A chat-tuned
adapter (--prompt_template chat) is prompted with the base tokenizer's own chat template.
"""

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from utils.errors import CodeUpError
from utils.model_loading import DEFAULT_BASE_MODEL, load_model_and_tokenizer
from utils.chat_data import CHAT, ChatPrompter, resolve_prompt_format
from utils.prompter import Prompter

# The page's controls: (minimum, maximum, default); values from the API are clamped to them.
TEMPERATURE = (0.0, 1.0, 0.1)
TOP_P = (0.0, 1.0, 0.75)
TOP_K = (0, 100, 40)
BEAMS = (1, 4, 1)
MAX_NEW_TOKENS = (1, 2000, 512)


def clamp(value, *, limits, cast):
    """`value` as `cast`, within (minimum, maximum, default) `limits`; the default when it is not a number."""
    low, high, default = limits
    try:
        value = cast(value)
    except (TypeError, ValueError):
        return default
    return min(max(value, low), high)


def clamp_settings(*, temperature=TEMPERATURE[2], top_p=TOP_P[2], top_k=TOP_K[2], num_beams=BEAMS[2],
                   max_new_tokens=MAX_NEW_TOKENS[2]) -> dict:
    """The page's settings, clamped to its controls' ranges (the CLI's and the form's values)."""
    return dict(temperature=clamp(temperature, limits=TEMPERATURE, cast=float),
                top_p=clamp(top_p, limits=TOP_P, cast=float),
                top_k=clamp(top_k, limits=TOP_K, cast=int),
                num_beams=clamp(num_beams, limits=BEAMS, cast=int),
                max_new_tokens=clamp(max_new_tokens, limits=MAX_NEW_TOKENS, cast=int))


class CancelOnEvent(StoppingCriteria):
    """Stops a generation when its event is set (the page's user left, or the CLI was interrupted)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Completion:
    """One finished request of the API: the text, token counts, and why it ended (stop or length)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Generator:
    """A model, its tokenizer and template; generates one request at a time."""

    def __init__(self, base_model=DEFAULT_BASE_MODEL, lora_weights=None, load_in_8bit=False, prompt_template=None):
        # None: the template the adapter was trained with (recorded by finetune.py), else alpaca;
        # CHAT: the base tokenizer's chat template (the prompter needs the tokenizer).
        prompt_format = resolve_prompt_format(prompt_template, lora_weights)
        self.chat = prompt_format == CHAT
        self.prompter = None if self.chat else Prompter(prompt_format)
        self.model, self.tokenizer = load_model_and_tokenizer(base_model, padding_side="left", load_in_8bit=load_in_8bit)
        if self.chat:
            self.prompter = ChatPrompter(self.tokenizer)
        if lora_weights:
            self.model = load_adapter(self.model, lora_weights=lora_weights, base_model=base_model,
                                      merge=not load_in_8bit)
        self.model.eval()
        self.lock = threading.Lock()

    @classmethod
    def around(cls, model, *, tokenizer, prompt_template: str):
        """A Generator over a model already in memory (finetune.py's, in training, for its pass@k):
        the caller puts it in eval mode and back. tokenizer: one that pads on the left."""
        generator = cls.__new__(cls)
        generator.chat = prompt_template == CHAT
        generator.model, generator.tokenizer = model, tokenizer
        generator.prompter = ChatPrompter(tokenizer) if generator.chat else Prompter(prompt_template)
        generator.lock = threading.Lock()
        return generator

    def settings(self, **settings) -> GenerationConfig:
        """The page's settings (clamp_settings), as a generation config."""
        return self.config(**clamp_settings(**settings))

    def config(self, *, temperature, top_p, top_k=0, num_beams=1, max_new_tokens, stop=()) -> GenerationConfig:
        sample = temperature > 0  # temperature 0 means greedy
        return GenerationConfig(
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=top_k if sample else None,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            # Stop at EOS, where the model starts the template's next section, or at a caller's stop.
            stop_strings=[*self.prompter.section_headers, *stop] or None,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,  # a model in training has it off in its config
        )

    def _inputs(self, prompts, *, add_special_tokens=None):
        # Chat text carries its special tokens already (the template writes them).
        if add_special_tokens is None:
            add_special_tokens = not self.chat
        return self.tokenizer(prompts, return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(self.model.device)

    def count_tokens(self, prompt: str, *, add_special_tokens=None) -> int:
        """The prompt's length in tokens, as generation will see it."""
        if add_special_tokens is None:
            add_special_tokens = not self.chat
        return len(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def context_length(self) -> int | None:
        """The longest sequence (prompt + answer) the model was built for; None: not recorded."""
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt for a conversation ({"role", "content"} messages, the last one the user's):
        the chat template for chat-tuned models; with an instruction template, each earlier
        exchange is a prompt followed by its answer, system text opens the first instruction,
        and a single user message is exactly the prompt of `--instruction`."""
        if self.chat:
            return self.prompter.chat_prompt(messages)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        parts, pending = [], None
        for message in turns:
            if message["role"] == "user":
                pending = message["content"] if pending is None else f"{pending}\n\n{message['content']}"
            elif pending is not None:
                parts.append(self.prompter.generate_prompt(pending, label=message["content"]))
                pending = None
        if system:
            first = parts[0] if parts else None
            if first is None:
                pending = f"{system}\n\n{pending}"
            else:  # rebuild the first exchange with the system text in its instruction
                user, answer = turns[0]["content"], turns[1]["content"]
                parts[0] = self.prompter.generate_prompt(f"{system}\n\n{user}", label=answer)
        return "\n\n".join([*parts, self.prompter.generate_prompt(pending or "")])

    def stream_completion(self, prompt: str, *, temperature: float, top_p: float, max_new_tokens: int, top_k=0,
                          num_beams=1, stop=(), seed=None, cancel: threading.Event | None = None,
                          add_special_tokens=None, strip=True):
        """The one streaming generation (the API's, and the page's through `stream`): yields text
        deltas, then one Completion. The deltas join to the Completion's text: text that may still
        become a stop string or a template section, or trailing space that the final answer strips,
        is held back until it is certain, so what was shown never has to be taken back. `cancel`
        ends it early (the client left); a request cancelled while it waits for the lock does not
        generate at all. strip: the answer without surrounding space, as the page's (False for raw
        completions)."""
        stop = [s for s in stop if s]
        cancel = cancel or threading.Event()
        inputs = self._inputs([prompt], add_special_tokens=add_special_tokens)
        prompt_tokens = inputs["input_ids"].shape[1]
        config = self.config(temperature=temperature, top_p=top_p, top_k=top_k, num_beams=num_beams,
                             max_new_tokens=max_new_tokens, stop=stop)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outcome = {}

        def run():
            try:
                with torch.no_grad():
                    output = self.model.generate(**inputs, generation_config=config, tokenizer=self.tokenizer,
                                                 streamer=streamer, stopping_criteria=StoppingCriteriaList([CancelOnEvent(cancel)]))
                outcome["tokens"] = output.shape[1] - prompt_tokens
            except Exception as error:  # surfaced in the caller's thread below
                outcome["error"] = error
                streamer.end()

        with self.lock:
            if cancel.is_set():
                return
            if seed is not None:
                torch.manual_seed(seed)
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            text, sent = "", ""
            try:
                for piece in streamer:
                    text += piece
                    visible = self._settled(text, stop=stop, strip=strip)
                    if len(visible) > len(sent):
                        yield visible[len(sent):]
                        sent = visible
            finally:
                cancel.set()  # the consumer stopped early: end the generation too
                worker.join()
        if "error" in outcome:
            raise outcome["error"]
        answer = self._cut(text, stop=stop)
        final = answer.strip() if strip else answer
        if final[len(sent):]:
            yield final[len(sent):]
        stopped = len(answer) < len(text) or outcome["tokens"] < max_new_tokens
        yield Completion(text=final, prompt_tokens=prompt_tokens, completion_tokens=outcome["tokens"],
                         finish_reason="stop" if stopped else "length")

    def _cut(self, text: str, *, stop) -> str:
        """The answer in generated text: up to the template's next section or a caller's stop string."""
        for marker in [*self.prompter.section_headers, *stop]:
            text = text.split(marker, 1)[0]
        return text

    def _settled(self, text: str, *, stop, strip: bool) -> str:
        """The part of the answer so far that no later token can change."""
        answer = self._cut(text, stop=stop).lstrip() if strip else self._cut(text, stop=stop)
        for marker in [*self.prompter.section_headers, *stop]:  # a stop string may be half-written
            for size in range(min(len(marker) - 1, len(answer)), 0, -1):
                if answer.endswith(marker[:size]):
                    answer = answer[:-size]
                    break
        return answer.rstrip() if strip else answer

    def answer(self, instruction, input=None, **settings) -> str:
        """The response to one instruction (the page's settings: clamp_settings)."""
        return self.answer_batch([(instruction, input)], **settings)[0]

    def answer_batch(self, records, *, max_time: float | None = None, **settings) -> list[str]:
        """Responses to (instruction, input) pairs, generated together (left padding). max_time:
        seconds after which generation stops (the answers so far are returned)."""
        prompts = [self.prompter.generate_prompt(instruction, input=input) for instruction, input in records]
        inputs = self._inputs(prompts)
        config = self.settings(**settings)
        config.max_time = max_time
        with self.lock, torch.no_grad():
            output = self.model.generate(**inputs, generation_config=config, tokenizer=self.tokenizer)
        continuations = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [self.prompter.response_from_continuation(text) for text in continuations]

    def stream(self, instruction, input=None, **settings):
        """Yields the response as it grows, then the whole response (the page's Instruction form):
        stream_completion's deltas joined, with the page's settings (clamp_settings)."""
        prompt = self.prompter.generate_prompt(instruction, input=input)
        text = ""
        for piece in self.stream_completion(prompt, **clamp_settings(**settings)):
            if isinstance(piece, Completion):
                yield piece.text
            else:
                text += piece
                yield text


def load_adapter(model, *, lora_weights: str, base_model: str, merge: bool):
    """The model with the LoRA adapter in `lora_weights`. merge: add the adapter into the base
    weights in memory (a full-precision base): generation then runs the base's matmuls only, not
    the adapter's extra two per adapted layer and token; a quantized base keeps it beside them."""
    from peft import PeftModel

    folder = Path(lora_weights).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise CodeUpError(f"--lora_weights {folder}: no adapter_config.json (train one with finetune.py)")
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except (ValueError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CodeUpError(f"the LoRA adapter in {folder} does not fit base model {base_model}: {first_line}") from error
    return model.merge_and_unload() if merge else model

"""Generation through any OpenAI-compatible server (ours, llama.cpp's llama-server,
llama-cpp-python's server) for evaluate.py --api_base: the same prompts as a local Generator.

With an instruction template the prompt text is built here, exactly as the Generator builds it,
and sent to /v1/completions (the server adds BOS where the model's tokenizer does, as the local
tokenizer does); the template's section headers are stop strings, and the answer is cut as
locally. With the chat template (--prompt_template chat, or a chat-tuned adapter's record) the record goes to
/v1/chat/completions as one user message, and the server renders it with its model's chat
template.

The sampling is the local one too: llama.cpp's servers have samplers beyond OpenAI's, on by
default, and they are turned off here (see SAME_SAMPLING_AS_LOCAL).
"""

import threading
from concurrent.futures import ThreadPoolExecutor

from utils.chat_data import CHAT, resolve_prompt_format, user_message
from utils.errors import CodeUpError
from utils.logs import logger
from utils.prompter import Prompter

MAX_STOPS = 4  # OpenAI's limit on stop strings

# Sent with every request, in the names llama.cpp's servers read (vLLM reads top_k and min_p too;
# servers that know none of them ignore them): what local generation does. llama-cpp-python's
# server penalizes repeated tokens by default (repeat_penalty 1.1), at temperature 0 too, so its
# "greedy" answers differ from greedy ones after a few tokens (a HumanEval answer that repeats the
# prompt's signature turns into another one); and its top_k 40 and min_p 0.05 cut the tail that
# local top-p sampling keeps. 0 turns top_k and min_p off.
SAME_SAMPLING_AS_LOCAL = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}


class ApiGenerator:
    def __init__(self, *, api_base: str, api_model: str = "", api_key: str = "", prompt_template: str | None = None,
                 lora_weights: str = "", concurrency: int = 4, timeout: float = 600, http_client=None):
        """prompt_template and lora_weights as for a local Generator: the adapter's recorded
        template (the server serves that adapter) unless --prompt_template names one, else alpaca."""
        import openai

        if concurrency < 1:
            raise CodeUpError("--api_concurrency must be at least 1")
        self.client = openai.OpenAI(base_url=api_base.rstrip("/"), api_key=api_key or "none", timeout=timeout, max_retries=2,
                                    http_client=http_client)
        self.api_base, self.concurrency = api_base, concurrency
        prompt_format = resolve_prompt_format(prompt_template, lora_weights or None)
        self.chat = prompt_format == CHAT
        self.prompter = None if self.chat else Prompter(prompt_format)
        self.extra_sampling = dict(SAME_SAMPLING_AS_LOCAL)
        self.extra_sampling_lock = threading.Lock()
        try:
            served = [model.id for model in self.client.models.list().data]
        except openai.OpenAIError as error:
            raise CodeUpError(f"--api_base {api_base}: no OpenAI-compatible server answers there ({error})") from error
        if api_model and served and api_model not in served:
            raise CodeUpError(f"--api_model {api_model!r}: the server at {api_base} serves {', '.join(served)}")
        if not api_model and not served:
            raise CodeUpError(f"the server at {api_base} lists no model: pass --api_model")
        self.model = api_model or served[0]

    def prompt(self, instruction: str, input: str | None) -> str | None:
        """The prompt text sent (None for chat: the server renders it)."""
        return None if self.chat else self.prompter.generate_prompt(instruction, input)

    def answer(self, instruction: str, input: str | None, *, temperature: float, top_p: float, max_new_tokens: int,
               seed: int | None = None) -> str:
        import openai

        sampling = dict(model=self.model, temperature=temperature, max_tokens=max_new_tokens,
                        **({"top_p": top_p, "seed": seed} if temperature > 0 else {}))
        try:
            if self.chat:
                reply = self._create(self.client.chat.completions, messages=[user_message(instruction, input)], **sampling)
                return (reply.choices[0].message.content or "").strip()
            reply = self._create(self.client.completions, prompt=self.prompt(instruction, input),
                                 stop=self.prompter.section_headers[:MAX_STOPS] or None, **sampling)
            return self.prompter.response_from_continuation(reply.choices[0].text)
        except openai.OpenAIError as error:
            raise CodeUpError(f"the server at {self.api_base} failed a request: {error}") from error

    def _create(self, endpoint, **request):
        """endpoint.create with the local sampling's extra settings; a server that refuses them
        (OpenAI's own rejects fields it does not know) is asked again without, once for the run."""
        import openai

        extra = self.extra_sampling
        try:
            return endpoint.create(**request, extra_body=extra or None)
        except openai.BadRequestError as error:
            if not extra or not any(name in str(error) for name in extra):
                raise
            with self.extra_sampling_lock:
                if self.extra_sampling:
                    logger.warning(f"the server at {self.api_base} refuses {', '.join(extra)} ({error}); asking without: "
                                   "its own defaults for them may make its answers differ from local generation")
                    self.extra_sampling = {}
        return endpoint.create(**request)

    def answer_all(self, records, *, on_done=None, **settings) -> list[str]:
        """Answers to (instruction, input, seed) triples, `concurrency` requests in flight, in order."""
        def one(record):
            instruction, input, seed = record
            response = self.answer(instruction, input, seed=seed, **settings)
            if on_done:
                on_done()
            return response

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, records))

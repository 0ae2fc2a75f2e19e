"""Generation through any OpenAI-compatible server (ours, llama.cpp's llama-server,
llama-cpp-python's server) for evaluate.py --api_base: the same prompts as a local Generator.

With an instruction template the prompt text is built here, exactly as the Generator builds it,
and sent to /v1/completions (the server adds BOS, as the local tokenizer does); the template's
section headers are stop strings, and the answer is cut as locally. With the chat template
(--prompt_template chat) the record goes to /v1/chat/completions as one user message, and the
server renders it with its model's chat template.
"""

from concurrent.futures import ThreadPoolExecutor

from utils.chat_data import CHAT, user_message
from utils.errors import CodeUpError
from utils.prompter import Prompter, load_template

MAX_STOPS = 4  # OpenAI's limit on stop strings


class ApiGenerator:
    def __init__(self, *, api_base: str, api_model: str = "", api_key: str = "", prompt_template: str | None = None,
                 concurrency: int = 4, timeout: float = 600):
        import openai

        if concurrency < 1:
            raise CodeUpError("--api_concurrency must be at least 1")
        self.client = openai.OpenAI(base_url=api_base.rstrip("/"), api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.api_base, self.concurrency = api_base, concurrency
        self.chat = prompt_template == CHAT
        self.prompter = None if self.chat else Prompter(load_template(prompt_template or "alpaca"))
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
                reply = self.client.chat.completions.create(messages=[user_message(instruction, input)], **sampling)
                return (reply.choices[0].message.content or "").strip()
            reply = self.client.completions.create(prompt=self.prompt(instruction, input),
                                                   stop=self.prompter.section_headers[:MAX_STOPS] or None, **sampling)
            return self.prompter.response_from_continuation(reply.choices[0].text)
        except openai.OpenAIError as error:
            raise CodeUpError(f"the server at {self.api_base} failed a request: {error}") from error

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

"""Inference stage: chat with a model in a Gradio page, or answer instructions from the command line.

    python generate.py                                   # web demo on http://127.0.0.1:7860
    python generate.py --lora_weights ./lora-codeup      # base model + your adapter
    python generate.py --instruction "Reverse a string in Python."          # print one answer
    python generate.py --prompts_file in.jsonl --output_file out.jsonl      # answer a file, batched
    python generate.py --api_key_file ~/.codeup-key      # page + API, both asking for the key
    python generate.py --api_only --api_key_file KEYFILE # only the OpenAI-compatible API (/v1/...)

The page and the OpenAI-compatible API (utils/serve/openai_api.py: /v1/models, /v1/chat/completions,
/v1/completions) share one port, one model and one queue. One Generator (utils/serve/generation.py) serves all: it builds the prompt from the template,
generates (greedy when temperature is 0; streamed with transformers' TextIteratorStreamer), stops
at EOS or where the model starts a new template section, and returns only the response.

With a key (--api_key_file, CODEUP_API_KEY or --api_key) one check guards every route of the port
(utils/serve/openai_api.py's KeyGate): the page asks for the key before anything loads (a login form
that sets a cookie), its Gradio API and queue need the cookie or `Authorization: Bearer KEY`
(gradio_client: `Client(url, headers={"Authorization": "Bearer KEY"})`), and /v1 the bearer header.
"""

import json
from pathlib import Path

from utils.logs import logger  # first: it silences known-harmless notices before the libraries print them

import torch

from utils.cli import resolve_api_key, run_cli
from utils.errors import CodeUpError
from utils.files import read_jsonl
from utils.model_loading import DEFAULT_BASE_MODEL
from utils.serve.display import page_markdown
from utils.serve.generation import BEAMS, MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, Generator, clamp
from utils.serve.openai_api import API_KEY_ENV, KeyGate

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EMPTY_INSTRUCTION = "Please enter an instruction."
BEAMS_DO_NOT_STREAM = "Beam search cannot stream: the answer appears when it is complete."


# ---- the web page -------------------------------------------------------------------------

def build_demo(generator: Generator, *, base_model: str = DEFAULT_BASE_MODEL, lora_weights: str = ""):
    """The page: a single-turn Instruction form (its /generate API unchanged) and a Chat tab, both
    answering in Markdown (copy buttons; code as highlighted code, fenced by the model or not:
    utils/serve/display.py); one generation at a time."""
    import gradio as gr

    # Gradio calls this with the form's values in order and names the /generate API's parameters
    # after these: they stay positional (and their names unchanged) for the API's clients.
    def generate(instruction, input, temperature, top_p, top_k, num_beams, max_new_tokens, stream_output):
        if not instruction or not str(instruction).strip():
            yield EMPTY_INSTRUCTION
            return
        settings = dict(temperature=temperature, top_p=top_p, top_k=top_k, num_beams=num_beams,
                        max_new_tokens=max_new_tokens)
        if stream_output and clamp(num_beams, limits=BEAMS, cast=int) > 1:
            gr.Warning(BEAMS_DO_NOT_STREAM)
            stream_output = False
        answers = (generator.stream(instruction, input=input, **settings) if stream_output
                   else [generator.answer(instruction, input=input, **settings)])
        for answer in answers:
            yield page_markdown(answer, instruction=str(instruction))

    def chat(message, history, temperature, max_new_tokens):
        if not str(message).strip():
            yield EMPTY_INSTRUCTION
            return
        for answer in chat_answers(generator, message=str(message), history=history, temperature=temperature,
                                   max_new_tokens=max_new_tokens):
            yield page_markdown(answer, instruction=str(message))

    instruction_form = gr.Interface(
        fn=generate,
        inputs=[
            gr.Textbox(lines=2, label="Instruction", placeholder="Write a Python function that reverses a string."),
            gr.Textbox(lines=2, label="Input", placeholder="none"),
            gr.Slider(*TEMPERATURE[:2], value=TEMPERATURE[2], step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(*TOP_P[:2], value=TOP_P[2], step=0.05, label="Top p"),
            gr.Slider(*TOP_K[:2], value=TOP_K[2], step=1, label="Top k"),
            gr.Slider(*BEAMS[:2], value=BEAMS[2], step=1, label="Beams"),
            gr.Slider(*MAX_NEW_TOKENS[:2], value=MAX_NEW_TOKENS[2], step=1, label="Max tokens"),
            gr.Checkbox(value=True, label="Stream output"),
        ],
        outputs=gr.Markdown(label="Output", buttons=["copy"], elem_id="answer", min_height=120),
        flagging_mode="never",
        api_name="generate",
        concurrency_limit=1,  # one generation at a time per model; the rest wait in the queue
    )
    prompt_name = "the base's chat template" if generator.chat else "an instruction template"
    with gr.Blocks(title="CodeUp") as demo:
        gr.Markdown(
            f"# CodeUp\nServing **{base_model}**" + (f" with the LoRA adapter **{lora_weights}**" if lora_weights else "")
            + f", prompted with {prompt_name}. Also an OpenAI-compatible API at `/v1` (editors, the `openai` client).")
        with gr.Tab("Instruction"):
            instruction_form.render()
        with gr.Tab("Chat"):
            gr.ChatInterface(
                fn=chat,
                chatbot=gr.Chatbot(label="Conversation", height=480, buttons=["copy", "copy_all"]),
                additional_inputs=[
                    gr.Slider(*TEMPERATURE[:2], value=TEMPERATURE[2], step=0.05, label="Temperature (0: greedy)"),
                    gr.Slider(*MAX_NEW_TOKENS[:2], value=MAX_NEW_TOKENS[2], step=1, label="Max tokens"),
                ],
                api_name="chat",
                concurrency_limit=1,
            )
    return demo


def chat_answers(generator: Generator, *, message: str, history, temperature, max_new_tokens):
    """The Chat tab's answer to `message` after `history` (Gradio's messages), growing as it streams,
    then whole: the conversation rendered with the model's prompt (its chat template for chat-tuned
    models)."""
    messages = [{"role": turn["role"], "content": message_text(turn["content"])} for turn in history
                if turn.get("role") in ("user", "assistant")] + [{"role": "user", "content": message}]
    answer = ""
    for piece in generator.stream_completion(
            generator.chat_prompt(messages), temperature=clamp(temperature, limits=TEMPERATURE, cast=float),
            top_p=TOP_P[2], max_new_tokens=clamp(max_new_tokens, limits=MAX_NEW_TOKENS, cast=int)):
        if isinstance(piece, str):
            answer += piece
            yield answer
    yield answer


def message_text(content) -> str:
    """A chat message's text (Gradio hands content as a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return str(content)


# ---- batch files ----------------------------------------------------------------------------

def read_prompts(path: Path) -> list[tuple[str, str]]:
    records = []
    for number, record in read_jsonl(path, what="--prompts_file"):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise CodeUpError(f"{path} line {number}: expected an object with an instruction string")
        records.append((record["instruction"], record.get("input") or ""))
    return records


def answer_file(generator, *, records, output_file, batch_size, settings):
    """Answers `records` in batches of `batch_size`, one JSONL line each (instruction, input,
    response) written as its batch ends."""
    from tqdm.auto import tqdm

    output = Path(output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as lines, tqdm(total=len(records), desc="Generating", unit="prompt") as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            for (instruction, input), response in zip(batch, generator.answer_batch(batch, **settings)):
                lines.write(json.dumps({"instruction": instruction, "input": input, "response": response},
                                       ensure_ascii=False) + "\n")
            bar.update(len(batch))
    print(f"Wrote {len(records)} answers to {output}")


def main(
    base_model: str = DEFAULT_BASE_MODEL,
    lora_weights: str = "",
    load_in_8bit: bool = False,
    prompt_template: str | None = None,
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    share_gradio: bool = False,
    instruction: str = "",
    input: str = "",
    prompts_file: str = "",
    output_file: str = "",
    batch_size: int = 8,
    temperature: float = TEMPERATURE[2],
    top_p: float = TOP_P[2],
    top_k: int = TOP_K[2],
    num_beams: int = BEAMS[2],
    max_new_tokens: int = MAX_NEW_TOKENS[2],
    seed: int | None = None,
    api_only: bool = False,
    api_key: str | None = None,
    api_key_file: str = "",
    api_model_name: str = "",
    max_queue: int = 64,
    max_prompt_tokens: int | None = None,
):
    """Start the web demo, or answer --instruction or a --prompts_file and exit.

    Args:
        base_model: hub id, local HF folder (e.g. a merged export), .gguf file, or smollm2-135m.
        lora_weights: a LoRA adapter folder from finetune.py (none: the base model alone).
        load_in_8bit: load the base model in 8-bit (bitsandbytes).
        prompt_template: a template in templates/ or a JSON file; default: the one the adapter was
            trained with (finetune.py records it), else alpaca. Another one works, with a warning.
        server_name: address the page listens on; 127.0.0.1 keeps it on this machine.
        server_port: port of the page.
        share_gradio: also open a public gradio.live link (anyone with it can use your model).
        instruction: answer this instruction, print the response and exit (no page).
        input: optional context for --instruction.
        prompts_file: answer every line of this JSONL file ({"instruction", "input"}) and exit.
        output_file: where --prompts_file's answers go (JSONL: instruction, input, response).
        batch_size: prompts generated together in --prompts_file mode.
        temperature: sampling temperature; 0 means greedy decoding (CLI modes).
        top_p: nucleus sampling threshold (CLI modes).
        top_k: top-k sampling (CLI modes).
        num_beams: beam search width (CLI modes).
        max_new_tokens: the longest answer in tokens (CLI modes).
        seed: seeds sampling, for repeatable answers.
        api_only: serve only the OpenAI-compatible API (/v1/...), without the page.
        api_key: require this key on every route: the page asks for it, its Gradio API and /v1
            need "Authorization: Bearer KEY" (default: the CODEUP_API_KEY environment variable;
            unset: no key, fine on 127.0.0.1). On the command line `ps` shows it to every user:
            prefer --api_key_file or the variable.
        api_key_file: read the key from this file (one line; keep it chmod 600).
        api_model_name: the model name the API serves and expects in requests (default: the
            adapter's folder name, else the base model's name).
        max_queue: requests that may wait for the model; the API answers 429 beyond it.
        max_prompt_tokens: the longest prompt the API accepts, in tokens (default: the model's
            context minus the request's max_tokens); longer ones get a 400.
    """
    check_flags(prompts_file=prompts_file, output_file=output_file, batch_size=batch_size, max_queue=max_queue,
                max_prompt_tokens=max_prompt_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    settings = dict(temperature=temperature, top_p=top_p, top_k=top_k, num_beams=num_beams, max_new_tokens=max_new_tokens)
    # A bad prompts file is reported before the model loads (minutes for a large one).
    records = read_prompts(Path(prompts_file)) if prompts_file else None
    scripted = bool(str(instruction).strip()) or bool(prompts_file)
    key = None if scripted else resolve_api_key(api_key=api_key, api_key_file=api_key_file, environment_variable=API_KEY_ENV)
    if not scripted:
        warn_about_exposure(key=key, server_name=server_name, server_port=server_port, share_gradio=share_gradio,
                            api_only=api_only)
    generator = Generator(base_model, lora_weights=lora_weights or None, load_in_8bit=load_in_8bit,
                          prompt_template=prompt_template)
    # The scripted modes print and write the model's text as it is: fencing its code is for the page alone.
    if prompts_file:
        return answer_file(generator, records=records, output_file=output_file, batch_size=batch_size, settings=settings)
    if str(instruction).strip():
        print(generator.answer(str(instruction), input=str(input), **settings))
        return None
    if share_gradio:
        launch_page(build_demo(generator, base_model=base_model, lora_weights=lora_weights).queue(max_size=max_queue),
                    api_key=key, server_name=server_name, server_port=server_port, share=True)
        return None
    serve(generator, base_model=base_model, lora_weights=lora_weights, api_only=api_only, api_key=key,
          api_model_name=api_model_name, max_queue=max_queue, server_name=server_name, server_port=server_port,
          max_prompt_tokens=max_prompt_tokens)
    return None


def check_flags(*, prompts_file, output_file, batch_size, max_queue, max_prompt_tokens) -> None:
    """The flags' values that cannot work, refused in one line before anything loads."""
    if prompts_file and not output_file:
        raise CodeUpError("--prompts_file needs --output_file")
    if batch_size < 1:
        raise CodeUpError("--batch_size must be at least 1")
    if max_queue < 1:
        raise CodeUpError("--max_queue must be at least 1")
    if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise CodeUpError("--max_prompt_tokens must be a whole number of at least 1")


def launch_page(demo, *, api_key, server_name, server_port, share, **launch_options):
    """The page on Gradio's own server (--share_gradio: its public link needs it), behind the same
    KeyGate as serve()'s app: a middleware of the app Gradio builds. One path stays open: the one
    launch() itself calls (without the key) to start the queue."""
    from starlette.middleware import Middleware

    gate = Middleware(KeyGate, api_key=api_key, open_paths=["/gradio_api/startup-events"])
    return demo.launch(server_name=server_name, server_port=server_port, share=share,
                       app_kwargs={"middleware": [gate]} if api_key else None, **launch_options)


def warn_about_exposure(*, key, server_name, server_port, share_gradio, api_only) -> None:
    """One warning naming what other machines can reach, when the server listens beyond loopback."""
    routes = ("the OpenAI-compatible API (/v1)" if api_only else
              "the page, its Gradio API (/generate, /chat, the queue) and the OpenAI-compatible API (/v1)")
    if share_gradio:
        routes = "the page and its Gradio API (/generate, /chat, the queue)"  # no /v1 behind the link
    if key:
        if share_gradio or server_name not in LOOPBACK:
            where = "a public gradio.live link (72 hours)" if share_gradio else f"{server_name}:{server_port}"
            logger.warning(f"{routes}: reachable through {where}, every route behind the API key")
        return
    if share_gradio:
        logger.warning(f"--share_gradio without an API key: anyone with the public gradio.live link can use {routes} "
                       "for 72 hours; set a key with --api_key_file")
    elif server_name not in LOOPBACK:
        logger.warning(f"no API key and the server listens on {server_name}: anyone who can reach port {server_port} "
                       f"can use {routes}; set a key with --api_key_file")


def served_model_name(base_model: str, *, lora_weights: str) -> str:
    return Path(str(lora_weights or base_model).rstrip("/")).name or str(base_model)


def serve(generator, *, base_model, lora_weights, api_only, api_key, api_model_name, max_queue, server_name, server_port,
          max_prompt_tokens=None):
    """The OpenAI-compatible API, and the page mounted on the same FastAPI app (one port, one model),
    all behind one KeyGate (with a key: every route needs it)."""
    import uvicorn

    from utils.serve.openai_api import OpenAIServer, build_app

    name = api_model_name or served_model_name(base_model, lora_weights=lora_weights)
    app = build_app(OpenAIServer(generator, model_name=name, api_key=api_key, max_queue=max_queue,
                                 max_prompt_tokens=max_prompt_tokens))
    if not api_only:
        import gradio as gr

        demo = build_demo(generator, base_model=base_model, lora_weights=lora_weights).queue(max_size=max_queue)
        app = gr.mount_gradio_app(app, demo, path="/", server_name=server_name, server_port=server_port)
    where = f"http://{server_name}:{server_port}"
    print(("" if api_only else f"The page: {where}/\n") + f"OpenAI-compatible API: {where}/v1 (model {name!r}"
          + (", the key required on every route)" if api_key else ")"), flush=True)
    uvicorn.run(KeyGate(app, api_key=api_key), host=server_name, port=server_port, log_level="warning")


if __name__ == "__main__":
    run_cli(main, aliases={"load_8bit": "load_in_8bit"})

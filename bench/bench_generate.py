"""Inference speed: generate.py's Generator against plain model.generate, in the same process.

    .venv/bin/python bench/bench_generate.py [--max_new_tokens 128] [--repeats 3]

1. Streaming (what the page does) vs model.generate with the same GenerationConfig (same stop rules,
   same seed): tokens/s and time to first token, greedy and sampled. Our overhead (prompt building,
   the streaming thread, incremental decoding, response cutting) should stay under 10%.
2. The batched file mode: 32 prompts answered in batches of 8 (left padding) vs one at a time.
3. The OpenAI-compatible API: tokens/s streamed through /v1/chat/completions (uvicorn in this
   process, the official openai client) vs Generator.stream_completion called directly, the same
   prompt and settings (target: at most 10% overhead). `--api_row_only` runs this part alone.
Tokens are counted the same way for both sides: the new tokens each call produced.
Prints a Markdown table for bench/RESULTS.md.
"""

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fire  # noqa: E402
import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from utils.serve.generation import Generator  # noqa: E402

INSTRUCTION = "Write a Python class for a bank account with deposit, withdraw and balance methods, and explain it."
BATCH_INSTRUCTIONS = [f"Write a Python function that returns the {n}th power of a number." for n in range(2, 34)]


class FirstTokenClock(BaseStreamer):
    """Notes when model.generate hands over its first new token (the first put() is the prompt)."""

    def __init__(self):
        self.puts, self.first_token_at = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def plain_generate(generator, *, settings, seed):
    """model.generate on the same prompt and GenerationConfig; (new tokens, seconds, time to first token)."""
    prompt = generator.prompter.generate_prompt(INSTRUCTION)
    inputs = generator.tokenizer([prompt], return_tensors="pt")
    clock = FirstTokenClock()
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        output = generator.model.generate(**inputs, generation_config=generator.settings(**settings),
                                          tokenizer=generator.tokenizer, streamer=clock)
    seconds = time.perf_counter() - started
    return output.shape[1] - inputs["input_ids"].shape[1], seconds, clock.first_token_at - started


def ours_stream(generator, *, settings, seed):
    """Generator.stream as the page uses it; (new tokens, seconds, time to first visible text)."""
    new_tokens = []
    original = generator.model.generate

    def counting_generate(**kwargs):  # count what generate produced, as for the plain side
        output = original(**kwargs)
        new_tokens.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    generator.model.generate = counting_generate
    torch.manual_seed(seed)
    started, first = time.perf_counter(), None
    for update in generator.stream(INSTRUCTION, **settings):
        if update and first is None:
            first = time.perf_counter() - started
    seconds = time.perf_counter() - started
    generator.model.generate = original
    return new_tokens[0], seconds, first


def batched_throughput(generator, *, batch_size, max_new_tokens):
    records = [(instruction, "") for instruction in BATCH_INSTRUCTIONS]
    settings = dict(temperature=0, max_new_tokens=max_new_tokens)
    count = lambda answers: sum(len(generator.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    started = time.perf_counter()
    answers = [a for i in range(0, len(records), batch_size) for a in generator.answer_batch(records[i:i + batch_size], **settings)]
    batched = (count(answers), time.perf_counter() - started)
    started = time.perf_counter()
    answers = [generator.answer(instruction, input=input, **settings) for instruction, input in records]
    single = (count(answers), time.perf_counter() - started)
    return batched, single


def direct_stream(generator, *, prompt, settings):
    """Generator.stream_completion as the API calls it; (new tokens, seconds)."""
    started = time.perf_counter()
    completion = [item for item in generator.stream_completion(prompt, **settings) if not isinstance(item, str)][0]
    return completion.completion_tokens, time.perf_counter() - started


def api_stream(client, *, messages, settings):
    """The same request through /v1/chat/completions, streamed; (new tokens from usage, seconds to [DONE])."""
    started = time.perf_counter()
    tokens = None
    for chunk in client.chat.completions.create(model="bench", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, temperature=settings["temperature"],
                                                top_p=settings["top_p"], max_tokens=settings["max_new_tokens"],
                                                seed=settings["seed"]):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, time.perf_counter() - started


def api_row(generator, *, max_new_tokens, repeats):
    import socket

    import uvicorn
    from openai import OpenAI

    from utils.serve.openai_api import OpenAIServer, build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(OpenAIServer(generator, model_name="bench")), host="127.0.0.1", port=port,
                                           log_level="warning"))
    import threading

    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": INSTRUCTION}]
    prompt = generator.chat_prompt(messages)
    rows = []
    for name, settings in (("greedy", dict(temperature=0.0, top_p=1.0)), ("sampled (T=0.7, top-p 0.9)", dict(temperature=0.7, top_p=0.9))):
        settings.update(max_new_tokens=max_new_tokens, seed=0)
        direct_stream(generator, prompt=prompt, settings=settings)  # warm-up
        direct, api = [], []
        for repeat in range(repeats):  # alternate, so that drift hits both
            settings["seed"] = repeat
            direct.append(direct_stream(generator, prompt=prompt, settings=settings))
            api.append(api_stream(client, messages=messages, settings=settings))
        direct_tps = statistics.median(tokens / seconds for tokens, seconds in direct)
        api_tps = statistics.median(tokens / seconds for tokens, seconds in api)
        rows.append((name, statistics.median(tokens for tokens, _ in api), direct_tps, api_tps, 1 - api_tps / direct_tps))
    server.should_exit = True
    return rows


def print_api_rows(rows):
    print("| decoding | new tokens | Generator direct tokens/s | /v1/chat/completions streamed tokens/s | overhead |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, tokens, direct_tps, api_tps, overhead in rows:
        print(f"| {name} | {tokens:.0f} | {direct_tps:.1f} | {api_tps:.1f} | {overhead:.1%} |")


def main(base_model: str = "smollm2-135m", max_new_tokens: int = 128, repeats: int = 3, batch_size: int = 8,
         batch_max_new_tokens: int = 64, api_row_only: bool = False):
    generator = Generator(base_model)
    if api_row_only:
        rows = api_row(generator, max_new_tokens=max_new_tokens, repeats=repeats)
        print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, model {base_model} (float32), "
              f"max_new_tokens {max_new_tokens}, {repeats} alternating repeats (medians)\n")
        print_api_rows(rows)
        return
    rows = []
    for name, settings in (("greedy", dict(temperature=0)), ("sampled (T=0.7, top-p 0.9)", dict(temperature=0.7, top_p=0.9))):
        settings["max_new_tokens"] = max_new_tokens
        plain_generate(generator, settings=settings, seed=0)  # warm-up
        plain, ours = [], []
        for repeat in range(repeats):  # alternate, so that drift hits both
            plain.append(plain_generate(generator, settings=settings, seed=repeat))
            ours.append(ours_stream(generator, settings=settings, seed=repeat))
        median = lambda runs, f: statistics.median(f(r) for r in runs)
        plain_tps, ours_tps = median(plain, lambda r: r[0] / r[1]), median(ours, lambda r: r[0] / r[1])
        rows.append((name, median(plain, lambda r: r[0]), plain_tps, ours_tps, 1 - ours_tps / plain_tps,
                     median(plain, lambda r: r[2]), median(ours, lambda r: r[2])))
    (batched_tokens, batched_s), (single_tokens, single_s) = batched_throughput(
        generator, batch_size=batch_size, max_new_tokens=batch_max_new_tokens)

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, model {base_model} (float32), "
          f"max_new_tokens {max_new_tokens}, {repeats} alternating repeats (medians)")
    print()
    print("| decoding | new tokens | model.generate tokens/s | generate.py stream tokens/s | overhead | "
          "time to first token: generate / ours (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, tokens, plain_tps, ours_tps, overhead, plain_ttft, ours_ttft in rows:
        print(f"| {name} | {tokens:.0f} | {plain_tps:.1f} | {ours_tps:.1f} | {overhead:.1%} | {plain_ttft:.2f} / {ours_ttft:.2f} |")
    print()
    print(f"| batch mode, {len(BATCH_INSTRUCTIONS)} prompts, greedy, max {batch_max_new_tokens} new tokens | answer tokens | seconds | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| batches of {batch_size} (left padding) | {batched_tokens} | {batched_s:.1f} | {batched_tokens / batched_s:.1f} |")
    print(f"| one at a time | {single_tokens} | {single_s:.1f} | {single_tokens / single_s:.1f} |")
    print(f"\nbatching speed-up: {(batched_tokens / batched_s) / (single_tokens / single_s):.2f}x")
    print()
    print_api_rows(api_row(generator, max_new_tokens=max_new_tokens, repeats=repeats))


if __name__ == "__main__":
    fire.Fire(main)

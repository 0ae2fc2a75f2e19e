"""generate.py's OpenAI-compatible API, driven by the official `openai` client (servers on 127.0.0.1)."""

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ROOT, build_tiny_llama, start_generate_server, stop_generate_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # each module server loads a model and serves it

INSTRUCTION = "Write a Python function that adds two numbers."
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    process, port = start_generate_server()
    yield {"base": f"http://127.0.0.1:{port}", "port": port, "model": "smollm2-135m"}
    stop_generate_server(process)


MAX_PROMPT_TOKENS = 128


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A tiny random model with a 4096-token context (room for long answers), a key required, one
    request waiting at most, prompts of at most MAX_PROMPT_TOKENS tokens."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("long-context") / "tiny-llama-4k")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=4096)))
    process, port = start_generate_server("--base_model", folder, "--api_only", "--max_queue", 1,
                                          "--max_prompt_tokens", MAX_PROMPT_TOKENS, env_extra={"CODEUP_API_KEY": KEY})
    yield {"base": f"http://127.0.0.1:{port}", "model": folder.name}
    stop_generate_server(process)


def client(server, key="unused", timeout=300):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=key, max_retries=0, timeout=timeout)


def chat(server, content=INSTRUCTION, **settings):
    return client(server).chat.completions.create(
        model=server["model"], messages=[{"role": "user", "content": content}], **settings)


def streamed_text(stream):
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            if getattr(choice, "delta", None) is not None and choice.delta.content:
                parts.append(choice.delta.content)
            elif getattr(choice, "text", None):
                parts.append(choice.text)
            finish = choice.finish_reason or finish
    return parts, finish


# ---- answers ------------------------------------------------------------------------------------

def test_models_lists_the_served_model(smollm2_server):
    models = client(smollm2_server).models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]


def test_greedy_chat_answer_equals_the_cli_and_streams_to_the_same_text(smollm2_server):
    answer = chat(smollm2_server, temperature=0, max_tokens=32)
    cli = subprocess.run([sys.executable, "generate.py", "--instruction", INSTRUCTION, "--temperature", "0",
                          "--max_new_tokens", "32"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    text = answer.choices[0].message.content
    assert text and text == cli.stdout.rstrip("\n")
    assert answer.usage.completion_tokens <= 32 and answer.usage.prompt_tokens > 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    parts, finish = streamed_text(chat(smollm2_server, temperature=0, max_tokens=32, stream=True))
    assert len(parts) >= 3 and "".join(parts) == text
    assert finish == answer.choices[0].finish_reason


def test_completions_stop_length_and_seed(smollm2_server):
    api = client(smollm2_server)
    long = api.completions.create(model="smollm2-135m", prompt="def fibonacci(n):", temperature=0, max_tokens=12)
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 12
    assert long.choices[0].text.startswith("\n")  # raw completions keep their leading space
    parts, finish = streamed_text(api.completions.create(model="smollm2-135m", prompt="def fibonacci(n):",
                                                         temperature=0, max_tokens=12, stream=True))
    assert "".join(parts) == long.choices[0].text and finish == "length"
    word = long.choices[0].text.split()[1]
    stopped = api.completions.create(model="smollm2-135m", prompt="def fibonacci(n):", temperature=0, max_tokens=12, stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text
    assert long.choices[0].text.startswith(stopped.choices[0].text)
    sampled = [chat(smollm2_server, temperature=0.9, top_p=0.9, max_tokens=16, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_eight_streaming_clients_finish_while_the_page_answers(smollm2_server):
    results = [None] * 8

    def ask(i):
        results[i] = streamed_text(chat(smollm2_server, content=f"Task number {i}: print {i} in Python.",
                                        temperature=0, max_tokens=16, stream=True))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    page = httpx.get(smollm2_server["base"] + "/", timeout=60)  # the page is served meanwhile
    assert page.status_code == 200 and "gradio" in page.text.lower()
    from gradio_client import Client

    answer = Client(smollm2_server["base"] + "/", analytics_enabled=False, verbose=False).predict(
        "Say hi.", "", 0, 0.75, 40, 1, 8, False, api_name="/generate")
    assert isinstance(answer, str)
    for thread in threads:
        thread.join(timeout=600)
    assert all(result is not None and result[1] in ("stop", "length") for result in results)


def test_a_client_that_leaves_mid_stream_frees_the_worker(smollm2_server):
    # Counting without end: 2000 tokens would keep a CPU busy far longer than this test waits.
    with httpx.stream("POST", smollm2_server["base"] + "/v1/completions", timeout=60,
                      json={"model": "smollm2-135m", "prompt": "1, 2, 3, 4, 5,", "temperature": 0,
                            "max_tokens": 2000, "stream": True}) as response:
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines)]
    assert any(line.startswith("data: {") for line in received)
    started = time.time()
    quick = client(smollm2_server, timeout=30).completions.create(model="smollm2-135m", prompt="x =", max_tokens=2,
                                                                   temperature=0)
    assert quick.usage.completion_tokens <= 2 and time.time() - started < 30


def test_the_stream_ends_with_done(smollm2_server):
    with httpx.stream("POST", smollm2_server["base"] + "/v1/chat/completions", timeout=120,
                      json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "smollm2-135m", "messages": []}, 400, "messages"),
    ({"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_bad_requests_get_openai_errors(smollm2_server, body, status, param):
    url = smollm2_server["base"] + "/v1/chat/completions"
    response = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_unknown_route_and_oversized_body(smollm2_server):
    response = httpx.get(smollm2_server["base"] + "/v1/embeddings")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
    big = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    response = httpx.post(smollm2_server["base"] + "/v1/chat/completions", json=big, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError):
        chat(dict(smollm2_server, model="no-such-model"))


def test_prompts_beyond_the_context_or_max_prompt_tokens_get_400(smollm2_server, keyed_server):
    """SmolLM2's context is 8192 tokens: a longer prompt, or one that leaves no room for max_tokens,
    is refused before it takes the model; --max_prompt_tokens refuses shorter ones."""
    url = smollm2_server["base"] + "/v1/completions"
    for prompt, max_tokens in (("hello " * 9000, None), ("hello " * 7000, 2000)):
        body = {"model": "smollm2-135m", "prompt": prompt, **({"max_tokens": max_tokens} if max_tokens else {})}
        response = httpx.post(url, json=body, timeout=120)
        assert response.status_code == 400, response.text[:500]
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt" and "8192" in error["message"]
    api = client(keyed_server, key=KEY)
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=keyed_server["model"], messages=[{"role": "user", "content": "add " * 200}],
                                    max_tokens=2)
    assert refused.value.body["code"] == "context_length_exceeded" and str(MAX_PROMPT_TOKENS) in refused.value.body["message"]
    short = api.completions.create(model=keyed_server["model"], prompt="def add(a, b):", max_tokens=2, temperature=0)
    assert short.usage.prompt_tokens <= MAX_PROMPT_TOKENS and short.usage.completion_tokens <= 2


def test_a_non_streaming_client_that_leaves_frees_the_worker(smollm2_server):
    """Its generation (2000 tokens: long on a CPU) stops when it goes away, so the next
    request is answered at once."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(smollm2_server["base"] + "/v1/completions", timeout=httpx.Timeout(60, read=3),
                   json={"model": "smollm2-135m", "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 2000})
    started = time.time()
    quick = client(smollm2_server, timeout=60).completions.create(model="smollm2-135m", prompt="x =", max_tokens=2,
                                                                   temperature=0)
    assert quick.usage.completion_tokens <= 2 and time.time() - started < 30


def test_the_key_is_required_and_checked(keyed_server):
    for key in ("", "wrong-key"):
        response = httpx.get(keyed_server["base"] + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, key="wrong-key").models.list()
    assert [m.id for m in client(keyed_server, key=KEY).models.list().data] == [keyed_server["model"]]


def test_a_full_queue_answers_429(keyed_server):
    """One request generating and one waiting (--max_queue 1): a third is refused at once."""
    api = client(keyed_server, key=KEY)
    body = dict(model=keyed_server["model"], messages=[{"role": "user", "content": "go"}], temperature=0,
                max_tokens=2000, stream=True)
    first = api.chat.completions.create(**body)
    next(iter(first))  # generating
    second = api.chat.completions.create(**body)  # admitted: waits for the model
    with pytest.raises(openai.RateLimitError) as refused:
        api.chat.completions.create(**dict(body, stream=False))
    assert refused.value.status_code == 429
    first.close()
    second.close()


# ---- evaluate.py through the API ---------------------------------------------------------------------

@pytest.mark.timeout(3600)
def test_evaluate_through_our_server_equals_loading_the_model(smollm2_server, tmp_path):
    """Same prompts, same greedy completions, same pass@1 on 10 HumanEval problems."""
    common = ["--task", "humaneval", "--limit", 10, "--max_new_tokens", 64, "--temperature", 0, "--k", 1]
    runs = {}
    for name, extra in (("local", ["--batch_size", 1]), ("api", ["--api_base", smollm2_server["base"] + "/v1",
                                                                 "--api_concurrency", 4])):
        output = tmp_path / name
        run = subprocess.run([sys.executable, "evaluate.py", *map(str, common), "--output_dir", output, *map(str, extra)],
                             cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = (json.loads((output / "humaneval_results.json").read_text()),
                      [json.loads(line) for line in (output / "humaneval_samples.jsonl").read_text().splitlines()])
    (local, local_samples), (api, api_samples) = runs["local"], runs["api"]
    assert [s["prompt"] for s in api_samples] == [s["prompt"] for s in local_samples]
    assert [s["response"] for s in api_samples] == [s["response"] for s in local_samples]
    assert api["pass@1"] == local["pass@1"] and api["problems"] == 10
    assert api["model"] == {"api_base": smollm2_server["base"] + "/v1", "api_model": "smollm2-135m"}

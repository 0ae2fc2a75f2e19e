"""evaluate.py --api_base against llama-cpp-python's OpenAI-compatible server on the exported GGUF:
the model people deploy answers and scores as the `hf` export loaded in transformers does."""

import json
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT, free_port

pytest.importorskip("openai")


# ---- what evaluate.py --api_base asks a server for (a fake server: fast) ------------------------

def fake_server(requests, refuse=()):
    """An OpenAI-compatible server in-process: records each request body; answers 400 (as OpenAI
    does for fields it does not know) to a completion request with a field named in `refuse`."""
    def handle(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake.gguf", "object": "model", "owned_by": "me"}]})
        body = json.loads(request.content)
        requests.append(body)
        refused = [name for name in refuse if name in body]
        if refused:
            return httpx.Response(400, json={"error": {"message": f"Unrecognized request argument supplied: {refused[0]}",
                                                       "type": "invalid_request_error", "param": None, "code": None}})
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(200, json={"id": "chat-1", "object": "chat.completion", "created": 0, "model": body["model"],
                                             "choices": [{"index": 0, "finish_reason": "stop",
                                                          "message": {"role": "assistant", "content": " print(1)\n"}}]})
        return httpx.Response(200, json={"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                                         "choices": [{"index": 0, "text": " def f():\n    return 1\n\n### Instruction:\nmore",
                                                      "finish_reason": "stop", "logprobs": None}]})
    return httpx.Client(transport=httpx.MockTransport(handle))


def test_requests_ask_for_the_local_greedy_sampling():
    from utils.eval.api_generation import ApiGenerator

    requests = []
    generator = ApiGenerator(api_base="http://fake/v1", http_client=fake_server(requests))
    answer = generator.answer("Add.", "def f():", temperature=0, top_p=0.95, max_new_tokens=64)
    assert answer == "def f():\n    return 1"  # cut where the model starts the template's next section
    (body,) = requests
    assert body["prompt"] == generator.prompter.generate_prompt("Add.", "def f():") and body["model"] == "fake.gguf"
    assert body["temperature"] == 0 and body["max_tokens"] == 64 and "seed" not in body
    # llama-cpp-python's server penalizes repeats by default (1.1), even at temperature 0:
    # without these, its greedy answers are not greedy.
    assert body["repeat_penalty"] == 1.0 and body["top_k"] == 0 and body["min_p"] == 0.0
    assert set(body["stop"]) == {"### Input:", "### Instruction:", "### Response:"}


def test_a_server_that_refuses_the_extra_settings_is_asked_without_them(capsys):
    from utils.eval.api_generation import ApiGenerator

    requests = []
    generator = ApiGenerator(api_base="http://fake/v1", http_client=fake_server(requests, refuse=("repeat_penalty",)))
    answers = [generator.answer("Add.", None, temperature=0.8, top_p=0.95, max_new_tokens=8, seed=3) for _ in range(2)]
    assert answers == ["def f():\n    return 1"] * 2
    assert ["repeat_penalty" in body for body in requests] == [True, False, False]  # refused once, then never sent
    assert requests[1]["seed"] == 3 and requests[1]["top_p"] == 0.95
    assert capsys.readouterr().err.count("refuses repeat_penalty, top_k, min_p") == 1  # said once


def test_a_chat_tuned_adapter_is_asked_through_the_chat_endpoint(tmp_path):
    """--lora_weights with --api_base: the adapter the server serves; its record picks the prompt."""
    from utils.eval.api_generation import ApiGenerator
    from utils.prompter import TEMPLATE_RECORD

    (tmp_path / TEMPLATE_RECORD).write_text(json.dumps({"name": "chat", "template": None}))
    requests = []
    generator = ApiGenerator(api_base="http://fake/v1", lora_weights=str(tmp_path), http_client=fake_server(requests))
    assert generator.answer("Print one.", "", temperature=0, top_p=0.95, max_new_tokens=8) == "print(1)"
    assert requests[0]["messages"] == [{"role": "user", "content": "Print one."}] and "stop" not in requests[0]
    assert generator.prompt("Print one.", "") is None


# ---- the real thing: llama-cpp-python's server on the exported GGUF --------------------------------


def start_llama_server(gguf, log_path, timeout=180):
    """`python -m llama_cpp.server` on the GGUF, as a user runs it (the GGUF's own chat template,
    the server's defaults), on a free loopback port once /v1/models answers; (process, base URL)."""
    import httpx

    port = free_port()
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                                "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama_cpp.server exited: {open(log_path).read()[-3000:]}")
        try:
            if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    process.wait()
    pytest.fail(f"llama_cpp.server did not start in {timeout} s: {open(log_path).read()[-3000:]}")


@pytest.fixture(scope="module")
def exports(smollm2_dir, tmp_path_factory):
    from test_export import make_adapter, run_export

    """SmolLM2 with a LoRA adapter (non-zero: the export's merge matters), exported in float32 as
    an `hf` folder and as a GGUF (what llama.cpp computes in: no rounding on either side)."""
    folder = tmp_path_factory.mktemp("llama-server")
    make_adapter(str(smollm2_dir), folder / "adapter", targets=("q_proj", "v_proj"))
    for kind in ("hf", "gguf"):
        result = run_export("--base_model", smollm2_dir, "--lora_weights", folder / "adapter", "--export_dir",
                            folder / "out", "--checkpoint_type", kind, "--dtype", "float32")
        assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out" / "hf_ckpt", folder / "out" / "gguf" / "ggml-model-f32.gguf"


@pytest.fixture(scope="module")
def llama_server(exports, tmp_path_factory):
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    log_path = tmp_path_factory.mktemp("llama-server-log") / "server.log"
    process, base = start_llama_server(exports[1], log_path)
    yield base
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.poll() is not None  # nothing left behind


def evaluate(output, *args):
    common = ["--task", "humaneval", "--limit", 10, "--max_new_tokens", 96, "--temperature", 0, "--k", 1]
    run = subprocess.run([sys.executable, "evaluate.py", *map(str, common), "--output_dir", output, *map(str, args)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return (json.loads((output / "humaneval_results.json").read_text()),
            [json.loads(line) for line in (output / "humaneval_samples.jsonl").read_text().splitlines()])


@pytest.mark.slow  # two exports, a llama.cpp server and two evaluations of SmolLM2
@pytest.mark.timeout(3600)
def test_evaluate_through_llama_cpp_server_on_the_gguf_equals_the_hf_export(exports, llama_server, tmp_path):
    """Same prompts, same greedy completions, same pass@1 on 10 HumanEval problems: the GGUF in
    llama.cpp (f32) and the hf export in transformers (float32 on a CPU) are the same model, and
    evaluate.py prompts and decodes both alike (BOS, stop strings, no repetition penalty)."""
    hf_folder, gguf = exports
    local, local_samples = evaluate(tmp_path / "local", "--base_model", hf_folder, "--batch_size", 1)
    api, api_samples = evaluate(tmp_path / "api", "--api_base", llama_server, "--api_concurrency", 2)
    assert [s["prompt"] for s in api_samples] == [s["prompt"] for s in local_samples]
    assert [s["response"] for s in api_samples] == [s["response"] for s in local_samples]
    assert api["pass@1"] == local["pass@1"] and api["problems"] == 10
    assert api["model"]["api_base"] == llama_server and api["model"]["api_model"]
    assert sum(len(s["response"]) > 0 for s in api_samples) >= 8  # the model answered: the equality proves something

"""The inference stage: CLI and batch modes, the Gradio API, and a real browser."""

import json
import os
import subprocess
import sys
import threading

import psutil
import pytest
import torch

from conftest import ROOT, build_tiny_llama, start_generate_server, stop_generate_server
from utils.model_loading import load_model_and_tokenizer
from utils.prompter import Prompter

INSTRUCTIONS = [
    ("Write a Python function that adds two numbers.", ""),
    ("Sort the list.", "[3, 1, 2]"),
    ("Print hello in Java.", ""),
    ("Explain recursion.", ""),
    ("Write SQL for all users.", "table: users"),
]


def plain_greedy(model, tokenizer, *, instruction, input, max_new_tokens):
    """model.generate on one unpadded prompt, the response cut as the template says."""
    prompter = Prompter()
    batch = tokenizer(prompter.generate_prompt(instruction, input=input), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    text = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return prompter.response_from_continuation(text)


def run_generate(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_answer_equals_plain_greedy_generate(tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir))
    instruction, input = INSTRUCTIONS[1]
    result = run_generate("--base_model", tiny_llama_dir, "--instruction", instruction, "--input", input,
                          "--temperature", 0, "--max_new_tokens", 16)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip("\n") == plain_greedy(model, tokenizer, instruction=instruction, input=input, max_new_tokens=16)


def test_batched_file_mode_equals_one_by_one_greedy(tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": i, "input": x}) for i, x in INSTRUCTIONS) + "\n")
    answers = tmp_path / "out" / "answers.jsonl"
    result = run_generate("--base_model", tiny_llama_dir, "--prompts_file", prompts, "--output_file", answers,
                          "--batch_size", 2, "--temperature", 0, "--max_new_tokens", 12)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir))
    assert [(line["instruction"], line["input"]) for line in lines] == INSTRUCTIONS
    expected = [plain_greedy(model, tokenizer, instruction=i, input=x, max_new_tokens=12) for i, x in INSTRUCTIONS]
    assert [line["response"] for line in lines] == expected


@pytest.mark.parametrize("content, message", [
    (None, "--prompts_file not found"),
    ('{"instruction": "ok"}\nnot json\n', "line 2: not valid JSON"),
    ('{"input": "no instruction"}\n', "line 1: expected an object with an instruction string"),
])
@pytest.mark.slow
def test_bad_prompts_files_fail_in_one_line(tiny_llama_dir, tmp_path, content, message):
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_text(content)
    result = run_generate("--base_model", tiny_llama_dir, "--prompts_file", prompts, "--output_file", tmp_path / "o.jsonl")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_lora_from_another_model_is_a_clear_startup_error(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    other = build_tiny_llama(tmp_path / "wider", hidden_size=32)
    model, _ = load_model_and_tokenizer(str(other))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    result = run_generate("--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter", "--instruction", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not fit base model" in result.stderr.strip().splitlines()[-1]
    result = run_generate("--base_model", tiny_llama_dir, "--lora_weights", tmp_path, "--instruction", "hi")
    assert "no adapter_config.json" in result.stderr.strip().splitlines()[-1]


# ---- the web page ---------------------------------------------------------------------------

PAGE_KEY = "page-test-key-7d2a"


@pytest.fixture(scope="module")
def server(smollm2_dir):
    """The page on the real SmolLM2-135M: its answers are text a person can read, and stream word
    by word. With a key, as a served page should be: the browser signs in, gradio_client sends it."""
    process, port = start_generate_server(timeout=180, env_extra={"CODEUP_API_KEY": PAGE_KEY})
    yield {"url": f"http://127.0.0.1:{port}/", "port": port, "pid": process.pid}
    stop_generate_server(process)


def client(server):
    from gradio_client import Client

    return Client(server["url"], analytics_enabled=False, verbose=False, download_files=False,
                  headers={"Authorization": f"Bearer {PAGE_KEY}"})


ARGS = dict(input="", temperature=0, top_p=0.75, top_k=40, num_beams=1, max_new_tokens=24)


@pytest.mark.slow
def test_predict_answers_greedily(server):
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    instruction = INSTRUCTIONS[0][0]
    answer = client(server).predict(instruction, *ARGS.values(), False, api_name="/generate")
    assert answer == plain_greedy(model, tokenizer, instruction=instruction, input="", max_new_tokens=24)


def test_streamed_job_grows_and_ends_with_the_result(server):
    job = client(server).submit(INSTRUCTIONS[3][0], *ARGS.values(), True, api_name="/generate")
    result = job.result(timeout=120)
    updates = [update for update in job.outputs() if update]
    assert len(updates) >= 3
    assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))
    assert len(set(updates)) >= 3  # it really grew, token by token
    assert updates[-1] == result


def test_empty_instruction_and_out_of_range_values_get_answers(server):
    api = client(server)
    assert api.predict("   ", *ARGS.values(), True, api_name="/generate") == "Please enter an instruction."
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="greater than maximum value 1.0"):  # refused with a message
        api.predict("Hello", "", 0, 5.0, 40, 1, 8, False, api_name="/generate")
    beams = api.predict("Hello", "", 0, 0.75, 40, 2, 8, True, api_name="/generate")  # falls back to non-streamed
    assert isinstance(beams, str)


@pytest.mark.slow
def test_eight_concurrent_clients_are_all_answered(server):
    answers = [None] * 8

    def ask(i):
        answers[i] = client(server).predict(f"Task number {i}", *ARGS.values(), True, api_name="/generate")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(isinstance(answer, str) for answer in answers)


def test_page_listens_on_loopback_only_by_default(server):
    listening = [c.laddr for c in psutil.Process(server["pid"]).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server["port"]]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)


@pytest.mark.slow
def test_a_real_browser_streams_an_answer_and_chats(server, tmp_path):
    """The page asks for the key before anything loads; then the Instruction form answers in
    Markdown (code rendered as code), the page names its model, and the Chat tab answers."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium"):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server["url"])
        key_box = page.get_by_label("API key")
        key_box.wait_for(timeout=60_000)
        asks_for_the_key = page.get_by_role("textbox", name="Instruction").count() == 0 and "smollm2" not in page.content()
        key_box.fill("not-the-key")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Wrong key").wait_for(timeout=60_000)
        page.get_by_label("API key").fill(PAGE_KEY)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("textbox", name="Instruction").wait_for(timeout=120_000)
        assert "smollm2-135m" in page.locator("body").inner_text()  # the page names what it serves
        page.get_by_role("textbox", name="Instruction").fill("Write a Python function that adds two numbers.")
        page.get_by_role("button", name="Submit").click()
        answer = page.locator("#answer")
        answer.locator("pre code").first.wait_for(timeout=300_000)  # SmolLM2 answers with a fenced block
        page.wait_for_timeout(3000)
        page.screenshot(path=str(artifacts / "generate_page.png"), full_page=True)
        text = answer.inner_text()
        highlighted = answer.locator("pre code").count()

        page.get_by_role("tab", name="Chat").click()
        box = page.locator("textarea:visible").last
        box.fill("Write a Python function that reverses a string.")
        box.press("Enter")
        page.wait_for_function("() => [...document.querySelectorAll('.bot-row')].some(row => row.innerText.trim().length > 0)",
                               timeout=300_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(artifacts / "generate_chat.png"), full_page=True)
        bot_messages = page.locator(".bot-row").all_inner_texts()
        browser.close()
    assert asks_for_the_key
    assert text and text != "Please enter an instruction."
    assert highlighted >= 1  # SmolLM2 answers with a fenced code block, rendered as code
    assert any(m.strip() for m in bot_messages)
    assert (artifacts / "generate_page.png").stat().st_size > 10_000


def test_the_pages_stream_grows_to_the_cli_answer(tiny_llama_dir):
    """The page's stream is the API's (Generator.stream_completion) with the page's settings: it
    only grows, and ends with the answer the CLI prints.
    (The tiny model's text has no word breaks to stream at: the server test sees it grow.)"""
    from utils.serve.generation import Generator

    generator = Generator(str(tiny_llama_dir))
    instruction, input = INSTRUCTIONS[1]
    updates = list(generator.stream(instruction, input=input, temperature=0, max_new_tokens=24))
    assert updates and updates[-1]
    assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))
    assert updates[-1] == generator.answer(instruction, input=input, temperature=0, max_new_tokens=24)


def test_adapter_is_merged_in_memory_on_a_full_precision_base(tiny_llama_dir, tmp_path):
    """No LoRA matmuls left per generated token, and the same model: logits equal the unmerged adapter's."""
    from peft import PeftModel

    from test_export_adapters import PROBE_IDS, perturbed_adapter
    from utils.serve.generation import Generator

    unmerged = perturbed_adapter(tiny_llama_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    generator = Generator(str(tiny_llama_dir), str(tmp_path / "adapter"))
    assert not isinstance(generator.model, PeftModel)
    assert not any("lora" in name for name, _ in generator.model.named_modules())
    with torch.no_grad():
        ours = generator.model(torch.tensor(PROBE_IDS)).logits
        theirs = unmerged(torch.tensor(PROBE_IDS)).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_adapter_stays_beside_an_8bit_base(tiny_llama_dir, tmp_path):
    from peft import PeftModel, get_peft_model, LoraConfig

    from utils.serve.generation import Generator

    model, _ = load_model_and_tokenizer(str(tiny_llama_dir))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    generator = Generator(str(tiny_llama_dir), str(tmp_path / "adapter"), load_in_8bit=True)
    assert isinstance(generator.model, PeftModel)

"""The page shows code as code (utils/serve/display.py), whether or not the model fenced it; the
CLI modes and the OpenAI-compatible API return the model's text unchanged. A fake generator answers
the way a model tuned on Code Alpaca does: raw code, no fence."""

import json
import os

import pytest

from conftest import ROOT, free_port
from utils.serve.display import code_and_prose, fence_label, page_markdown
from utils.serve.generation import Completion

CODE = """def is_prime(n):
    if n <= 1:
        return False
    max_num = int(n ** 0.5) + 1
    for i in range(2, max_num):
        if n % i == 0:
            return False

    return True"""
INTRO = "Here is a function that checks whether a number is prime:"
OUTRO = "It tries every divisor up to the square root of n."
MIXED = f"{INTRO}\n{CODE}\n\n{OUTRO}"
INSTRUCTION = "Write a Python function that checks whether a number is prime."


# ---- the display rule ---------------------------------------------------------------------------

def test_unfenced_code_becomes_a_block_labelled_with_the_instructions_language():
    assert page_markdown(CODE, instruction=INSTRUCTION) == f"```python\n{CODE}\n```"


def test_only_the_code_of_a_mixed_answer_is_fenced():
    assert page_markdown(MIXED, instruction=INSTRUCTION) == f"{INTRO}\n\n```python\n{CODE}\n```\n\n{OUTRO}"
    assert code_and_prose(MIXED) == [(False, INTRO), (True, CODE), (False, OUTRO)]


@pytest.mark.parametrize("answer", [
    f"Sure:\n\n```python\n{CODE}\n```\n\n{OUTRO}",  # the model fenced it: its Markdown stays
    "Recursion is when a function calls itself.\n\nEach call works on a smaller part of the problem.",
    "- a list item\n- another one",
    "42",
    "",
])
def test_fenced_answers_and_prose_stay_as_they_are(answer):
    assert page_markdown(answer, instruction=INSTRUCTION) == answer


def test_without_a_named_language_the_block_is_plain():
    sql = "SELECT name\nFROM users\nWHERE age > 30;"
    assert page_markdown(sql, instruction="List the users older than 30.") == f"```\n{sql}\n```"


@pytest.mark.parametrize("instruction, label", [
    ("Write a JavaScript function that sums an array.", "javascript"),  # not Java
    ("Write a Java class for a stack.", "java"),
    ("Write a C++ program that prints hello.", "cpp"),
    ("Write a C program that prints hello.", "c"),
    ("Write a C# method that reverses a string.", "csharp"),
    ("Write a Go function that adds two numbers.", "go"),
    ("Good morning! Reverse a string.", ""),  # "Go" only as a word of its own
    ("Write a bash script that lists files.", "bash"),
    ("Translate this Python code to Rust.", "python"),  # the first the data stage's list names
])
def test_the_label_is_the_language_the_instruction_names(instruction, label):
    assert fence_label(instruction) == label


def test_every_language_the_data_stage_names_has_a_label_for_it():
    """The names are data/preprocess.py's; each label reads back as the same language in the data
    stage's fence labels (data/syntax.py)."""
    import preprocess
    import syntax

    for keyword, language in preprocess.KEYWORDS:
        label = fence_label(f"Do it in {keyword.strip()} please.")
        assert syntax.FENCE_LABELS.get(label) == language, (keyword, label)


# ---- the CLI and the API return the model's text --------------------------------------------------

class FakeGenerator:
    """Answers every request with `answer`, streamed line by line, as a Generator does."""

    chat = False

    def __init__(self, *args, answer=CODE, **kwargs):
        self.text = answer

    def answer(self, instruction, input=None, **settings):
        return self.text

    def answer_batch(self, records, **settings):
        return [self.text for _ in records]

    def stream(self, instruction, input=None, **settings):
        lines = self.text.splitlines(keepends=True)
        for end in range(1, len(lines) + 1):
            yield "".join(lines[:end]).rstrip()
        yield self.text

    def chat_prompt(self, messages):
        return messages[-1]["content"]

    def count_tokens(self, prompt, *, add_special_tokens=None):
        return len(prompt.split())

    def context_length(self):
        return None

    def stream_completion(self, prompt, *, max_new_tokens, cancel=None, **settings):
        yield from self.text.splitlines(keepends=True)
        yield Completion(text=self.text, prompt_tokens=self.count_tokens(prompt),
                         completion_tokens=len(self.text.split()), finish_reason="stop")


def test_the_cli_modes_print_and_write_the_raw_answer(monkeypatch, capsys, tmp_path):
    import generate
    from utils.cli import run_cli

    monkeypatch.setattr(generate, "Generator", FakeGenerator)
    run_cli(generate.main, argv=["--instruction", INSTRUCTION])
    assert capsys.readouterr().out == CODE + "\n"
    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text(json.dumps({"instruction": INSTRUCTION}) + "\n")
    run_cli(generate.main, argv=["--prompts_file", str(prompts), "--output_file", str(answers)])
    assert [json.loads(line)["response"] for line in answers.read_text().splitlines()] == [CODE]


def test_the_api_returns_the_raw_answer_streamed_or_not():
    from fastapi.testclient import TestClient

    from utils.serve.openai_api import OpenAIServer, build_app

    api = TestClient(build_app(OpenAIServer(FakeGenerator(), model_name="fake")))
    chat = {"model": "fake", "messages": [{"role": "user", "content": INSTRUCTION}]}
    answer = api.post("/v1/chat/completions", json=chat).json()
    assert answer["choices"][0]["message"]["content"] == CODE
    completion = api.post("/v1/completions", json={"model": "fake", "prompt": INSTRUCTION}).json()
    assert completion["choices"][0]["text"] == CODE
    with api.stream("POST", "/v1/chat/completions", json=dict(chat, stream=True)) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(event["choices"][0]["delta"].get("content", "") for event in events) == CODE


# ---- the page ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page():
    """The page on a fake generator that answers with raw code (the Chat tab: prose, code, prose)."""
    import generate

    class Fake(FakeGenerator):
        def stream_completion(self, prompt, **settings):
            yield from FakeGenerator(answer=MIXED).stream_completion(prompt, **settings)

    port = free_port()
    demo = generate.build_demo(Fake(), base_model="fake-model").queue()
    generate.launch_page(demo, api_key=None, server_name="127.0.0.1", server_port=port, share=False,
                         prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_the_pages_api_answers_with_the_code_fenced(page):
    from gradio_client import Client

    client = Client(page, analytics_enabled=False, verbose=False, download_files=False)
    for stream in (False, True):
        answer = client.predict(INSTRUCTION, "", 0, 0.75, 40, 1, 64, stream, api_name="/generate")
        assert answer == f"```python\n{CODE}\n```"
    reply = client.predict(INSTRUCTION, 0, 64, api_name="/chat")
    assert reply == f"{INTRO}\n\n```python\n{CODE}\n```\n\n{OUTRO}"


@pytest.mark.slow
def test_a_real_browser_shows_unfenced_code_with_its_lines_and_indentation(page):
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
        view = browser.new_page(viewport={"width": 1280, "height": 1000})
        view.goto(page)
        view.get_by_role("textbox", name="Instruction").fill(INSTRUCTION)
        view.get_by_role("button", name="Submit").click()
        code = view.locator("#answer pre code")
        view.wait_for_function("() => document.querySelector('#answer pre code')?.innerText.includes('return True')",
                               timeout=60_000)
        form_code = code.first.inner_text()
        form_highlighted = code.first.locator(".token").count()  # Prism's spans: highlighted as Python
        view.screenshot(path=str(artifacts / "page_unfenced_code.png"), full_page=True)

        view.get_by_role("tab", name="Chat").click()
        box = view.locator("textarea:visible").last
        box.fill(INSTRUCTION)
        box.press("Enter")
        view.wait_for_function("() => [...document.querySelectorAll('.bot-row')].some(row => "
                               "row.innerText.includes('square root'))", timeout=60_000)
        bot = view.locator(".bot-row").last
        chat_code = bot.locator("pre code").first.inner_text()
        chat_paragraphs = bot.locator("p").all_inner_texts()
        view.screenshot(path=str(artifacts / "page_unfenced_chat.png"), full_page=True)
        browser.close()
    assert form_code.rstrip("\n") == CODE  # every line break and indent, as the model wrote them
    assert form_highlighted > 0
    assert chat_code.rstrip("\n") == CODE
    assert INTRO in chat_paragraphs and OUTRO in chat_paragraphs  # the prose stays prose

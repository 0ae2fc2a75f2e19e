"""One key, every route: generate.py with a key refuses the page, its Gradio API (gradio_client),
its queue and /v1 without it, and answers all of them with it. Real servers on 127.0.0.1, real clients."""

import os
import subprocess
import sys

import httpx
import pytest

from conftest import ROOT, start_generate_server, stop_generate_server

pytestmark = pytest.mark.slow  # a server loads a model and serves it

KEY = "security-test-key-5f1c0e"
REFUSED_STATUSES = (401, 403)


@pytest.fixture(scope="module")
def keyed_page(tiny_llama_dir, tmp_path_factory):
    """The page and the API on the tiny model, the key read from a file (as the README shows first)."""
    key_file = tmp_path_factory.mktemp("key") / "codeup.key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, 0o600)
    process, port = start_generate_server("--base_model", tiny_llama_dir, "--api_key_file", key_file)
    yield {"url": f"http://127.0.0.1:{port}/", "base": f"http://127.0.0.1:{port}", "model": tiny_llama_dir.name}
    stop_generate_server(process)


def gradio_client(server, **kwargs):
    from gradio_client import Client

    return Client(server["url"], analytics_enabled=False, verbose=False, download_files=False, **kwargs)


FORM = ("Write a Python function that adds two numbers.", "", 0, 0.75, 40, 1, 8, False)


def test_gradio_client_without_the_key_is_refused(keyed_page):
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        gradio_client(keyed_page).predict(*FORM, api_name="/generate")
    with pytest.raises(AuthenticationError):
        gradio_client(keyed_page, headers={"Authorization": "Bearer not-the-key"}).predict(*FORM, api_name="/generate")


@pytest.mark.parametrize("method, path", [
    ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/gradio_api/openapi.json"),
    ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/queue/data?session_hash=x"),
    ("POST", "/gradio_api/call/generate"), ("POST", "/gradio_api/call/chat"), ("POST", "/gradio_api/run/generate"),
    ("POST", "/gradio_api/upload"), ("GET", "/gradio_api/file=/etc/passwd"), ("GET", "/theme.css"),
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1"), ("GET", "/anything/else"),
])
def test_every_route_refuses_a_request_without_the_key(keyed_page, method, path):
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Cookie": "codeup_session=forged"}):
        response = httpx.request(method, keyed_page["base"] + path, headers=headers, json={"data": list(FORM)},
                                 timeout=30)
        assert response.status_code in REFUSED_STATUSES, (path, headers, response.status_code)
        assert KEY not in response.text


def test_the_page_asks_for_the_key_and_the_login_sets_a_cookie_that_opens_it(keyed_page):
    page = httpx.get(keyed_page["url"], headers={"Accept": "text/html"})
    assert page.status_code == 401 and 'type="password"' in page.text and "API key" in page.text
    assert "gradio" not in page.text.lower()  # nothing of the app before the key
    wrong = httpx.post(keyed_page["base"] + "/codeup-login", data={"key": "not-the-key"})
    assert wrong.status_code == 401 and "Wrong key" in wrong.text and "set-cookie" not in wrong.headers
    right = httpx.post(keyed_page["base"] + "/codeup-login", data={"key": KEY})
    assert right.status_code == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    with httpx.Client(base_url=keyed_page["base"], cookies=right.cookies) as browser:
        assert browser.get("/", headers={"Accept": "text/html"}).status_code == 200
        assert browser.get("/config").status_code == 200
        assert browser.get("/v1/models").status_code == 200  # the same check: the cookie is the key


def test_gradio_client_with_the_key_in_a_header_uses_the_form_and_the_chat(keyed_page):
    client = gradio_client(keyed_page, headers={"Authorization": f"Bearer {KEY}"})
    answer = client.predict(*FORM, api_name="/generate")
    assert isinstance(answer, str)
    streamed = client.submit(FORM[0], *FORM[1:-1], True, api_name="/generate")  # the queue, streamed
    assert isinstance(streamed.result(timeout=120), str)
    reply = client.predict("Say hi.", 0, 8, api_name="/chat")
    assert isinstance(reply, str)


def test_v1_with_the_key_answers(keyed_page):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=keyed_page["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in api.models.list().data] == [keyed_page["model"]]
    answer = api.chat.completions.create(model=keyed_page["model"], messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_page["base"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_the_page_behind_a_share_link_has_the_same_gate(unused_tcp_port_or_free):
    """--share_gradio serves the page from Gradio's own server (the public link cannot be opened
    offline: the same launch without it), with the same gate in front."""
    import generate

    class NoModel:
        chat = False

    demo = generate.build_demo(NoModel(), base_model="no-model").queue()
    generate.launch_page(demo, api_key=KEY, server_name="127.0.0.1", server_port=unused_tcp_port_or_free, share=False,
                         prevent_thread_lock=True, quiet=True)
    base = f"http://127.0.0.1:{unused_tcp_port_or_free}"
    try:
        assert httpx.get(base + "/config").status_code == 401
        assert httpx.post(base + "/gradio_api/call/generate", json={"data": list(FORM)}).status_code == 401
        assert 'type="password"' in httpx.get(base + "/", headers={"Accept": "text/html"}).text
        assert httpx.get(base + "/config", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(base + "/gradio_api/startup-events").json() is False  # launch() started it; nothing else open
        assert httpx.post(base + "/gradio_api/startup-events").status_code == 401
    finally:
        demo.close()


@pytest.fixture
def unused_tcp_port_or_free():
    from conftest import free_port

    return free_port()


# ---- warnings and key sources, before any model loads (nothing listens beyond loopback) -----------

def generate_until_the_model_loads(*args, env_extra=None):
    """generate.py with a base model that does not exist: it warns about what it would expose,
    then stops at loading the model (exit 2), so no server ever listens."""
    env = {key: value for key, value in os.environ.items() if key != "CODEUP_API_KEY"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "generate.py", "--base_model", "/nonexistent/model", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_all_interfaces_without_a_key_warn_naming_what_is_exposed():
    result = generate_until_the_model_loads("--server_name", "0.0.0.0")
    assert result.returncode == 2
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: no API key")]
    assert warning and all(route in warning[0] for route in ("0.0.0.0", "/generate", "/v1", "the page"))
    shared = generate_until_the_model_loads("--share_gradio")
    assert any(line.startswith("warning: --share_gradio without an API key") and "/generate" in line
               for line in shared.stderr.splitlines())
    keyed = generate_until_the_model_loads("--server_name", "0.0.0.0", env_extra={"CODEUP_API_KEY": KEY})
    assert "no API key" not in keyed.stderr and "behind the API key" in keyed.stderr
    local = generate_until_the_model_loads()
    assert "warning: no API key" not in local.stderr  # 127.0.0.1: nothing to warn about


def test_key_sources(tmp_path):
    on_the_command_line = generate_until_the_model_loads("--api_key", "visible-in-ps")
    assert "every user of this machine can read it (ps)" in on_the_command_line.stderr
    missing = generate_until_the_model_loads("--api_key_file", tmp_path / "none.key")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: --api_key_file")
    readable = tmp_path / "readable.key"
    readable.write_text(KEY)
    os.chmod(readable, 0o644)
    assert "other users of this machine can read it" in generate_until_the_model_loads("--api_key_file", readable).stderr
    both = generate_until_the_model_loads("--api_key_file", readable, "--api_key", "x")
    assert both.returncode == 2 and "give one of them" in both.stderr
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    assert "expected one line" in generate_until_the_model_loads("--api_key_file", empty).stderr

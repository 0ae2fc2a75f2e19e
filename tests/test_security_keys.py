"""The key's one check (presents_key), the gate in front of an app (KeyGate), and where the key
comes from (resolve_api_key): fast, without a model."""

import os

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from utils.cli import resolve_api_key
from utils.errors import CodeUpError
from utils.serve.openai_api import LOGIN_PATH, SESSION_COOKIE, KeyGate, presents_key, session_token

KEY = "unit-test-key-31c7"


def test_presents_key_accepts_the_bearer_header_or_the_session_cookie_only():
    assert presents_key({"authorization": f"Bearer {KEY}"}, KEY)
    assert presents_key({"authorization": f"bearer  {KEY} "}, KEY)
    assert presents_key({"cookie": f"other=1; {SESSION_COOKIE}={session_token(KEY)}"}, KEY)
    assert not presents_key({}, KEY)
    assert not presents_key({"authorization": f"Basic {KEY}"}, KEY)
    assert not presents_key({"authorization": "Bearer " + KEY[:-1]}, KEY)
    assert not presents_key({"cookie": f"{SESSION_COOKIE}={KEY}"}, KEY)  # the cookie is not the key itself
    assert not presents_key({"cookie": f"{SESSION_COOKIE}={session_token('another key')}"}, KEY)
    assert presents_key({}, None) and presents_key({}, "")  # no key configured: open


@pytest.fixture
def gated():
    app = Starlette(routes=[Route("/{path:path}", lambda request: PlainTextResponse("the app"), methods=["GET", "POST"])])
    return TestClient(KeyGate(app, api_key=KEY), follow_redirects=False)


def test_the_gate_refuses_every_path_and_method_without_the_key(gated):
    for method, path in (("GET", "/"), ("GET", "/config"), ("POST", "/gradio_api/queue/join"), ("GET", "/v1/models"),
                         ("GET", "//config"), ("GET", "/v1/../config"), ("POST", LOGIN_PATH + "/x")):
        response = gated.request(method, path)
        assert response.status_code == 401 and "the app" not in response.text, (method, path)
    with pytest.raises(Exception):  # a websocket is closed before it opens
        with gated.websocket_connect("/gradio_api/queue"):
            pass


def test_the_gate_shows_browsers_the_login_form_and_lets_the_key_through(gated):
    form = gated.get("/", headers={"Accept": "text/html"})
    assert form.status_code == 401 and 'name="key"' in form.text and "the app" not in form.text
    assert gated.get("/v1/models", headers={"Accept": "text/html"}).json()["error"]["code"] == "invalid_api_key"
    assert gated.get("/x", headers={"Authorization": f"Bearer {KEY}"}).text == "the app"
    assert gated.post(LOGIN_PATH, content=b"key=" + b"x" * 5000).status_code == 413
    wrong = gated.post(LOGIN_PATH, data={"key": "nope"})
    assert wrong.status_code == 401 and SESSION_COOKIE not in wrong.headers.get("set-cookie", "")
    right = gated.post(LOGIN_PATH, data={"key": KEY})
    assert right.status_code == 303 and right.headers["location"] == "/"
    assert gated.get("/x", cookies={SESSION_COOKIE: right.cookies[SESSION_COOKIE]}).text == "the app"


def test_without_a_key_the_gate_passes_everything():
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("the app"))])
    assert TestClient(KeyGate(app, api_key=None)).get("/").text == "the app"


def test_resolve_api_key_prefers_the_file_and_warns_about_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CODEUP_API_KEY", "from-the-environment")
    key_file = tmp_path / "key"
    key_file.write_text(" from-the-file \n")
    os.chmod(key_file, 0o600)
    assert resolve_api_key(api_key=None, api_key_file=str(key_file), environment_variable="CODEUP_API_KEY") == "from-the-file"
    assert resolve_api_key(api_key=None, api_key_file="", environment_variable="CODEUP_API_KEY") == "from-the-environment"
    assert capsys.readouterr().err == ""
    assert resolve_api_key(api_key="typed", api_key_file="", environment_variable="CODEUP_API_KEY") == "typed"
    assert "(ps)" in capsys.readouterr().err
    monkeypatch.delenv("CODEUP_API_KEY")
    assert resolve_api_key(api_key="", api_key_file="", environment_variable="CODEUP_API_KEY") is None
    with pytest.raises(CodeUpError, match="give one of them"):
        resolve_api_key(api_key="typed", api_key_file=str(key_file), environment_variable="CODEUP_API_KEY")
    key_file.write_text("two\nlines\n")
    with pytest.raises(CodeUpError, match="expected one line"):
        resolve_api_key(api_key=None, api_key_file=str(key_file), environment_variable="CODEUP_API_KEY")

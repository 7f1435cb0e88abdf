"""chat.py's chat page in a real browser: headless Chromium, driven through chromedriver's WebDriver HTTP API, types a
question into the page and sends it; the page's script asks the streaming API, and the reply appears piece by
piece. Then the server wants an API key: the page asks for it once and sends it. A fake model writes the reply slowly enough that the pieces arrive apart. tests/run.sh installs Debian's
chromium and chromium-driver when they are missing; without them this test is skipped."""
import shutil
import socket
import subprocess
import threading
import time

import pytest
import requests

import chat
import model
from test_chat import REPLY, REPLY_TEXT
from test_engine import FakeModel, FakeTokenizer, fake_generate, script

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
DRIVER = shutil.which("chromedriver")
# this machine's network is closed: Chromium's own background connections (updates, sync, field trials) must not
# be tried, and a fresh profile keeps one run from seeing another's state
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference
# every text the reply's bubble shows, recorded by the page itself as it changes
RECORD = """window.seen = [];
new MutationObserver(() => {
  const reply = document.querySelector(".msg.assistant");
  if (reply) window.seen.push(reply.textContent);
}).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});"""


def slow_generate(*args, **kwargs):
    for step in fake_generate(*args, **kwargs):
        time.sleep(0.03)  # a token at a time, as a real model on a CPU
        yield step


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few WebDriver commands the test needs (https://www.w3.org/TR/webdriver2/), over HTTP."""

    def __init__(self, url, browser, user_data_dir):
        self.url = url
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": browser, "args": CHROMIUM_ARGS + [f"--user-data-dir={user_data_dir}"]}}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def call(self, method, path, body=None):
        if body is None and method == "POST":
            body = {}  # a command without parameters still sends an (empty) JSON object
        r = requests.request(method, self.url + path, json=body, timeout=60)
        value = r.json()["value"]
        if r.status_code != 200:
            raise AssertionError(f"webdriver {method} {path}: {value}")
        return value

    def do(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def element(self, css):
        return self.do("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def run(self, js):
        return self.do("POST", "/execute/sync", {"script": js, "args": []})


def wait_for_reply(browser, seconds=30):
    """The page's state once a reply has come in (the send button is enabled again)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = browser.run("""return {seen: window.seen, sending: document.getElementById("send").disabled,
            log: [...document.querySelectorAll(".msg")].map(d => [d.className, d.textContent])};""")
        if state["log"] and not state["sending"]:
            break
        time.sleep(0.1)
    return state


@pytest.mark.skipif(BROWSER is None or DRIVER is None, reason="no Chromium and chromedriver installed")
def test_chat_page_in_browser(monkeypatch, tmp_path):
    monkeypatch.setattr(model, "generate", slow_generate)
    server = chat.ChatServer(model.Engine(FakeModel(script(*REPLY)), FakeTokenizer()), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = free_port()
    driver_proc = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if requests.get(f"{url}/status", timeout=1).json()["value"]["ready"]:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        browser = WebDriver(url, BROWSER, tmp_path / "profile")
        try:
            browser.do("POST", "/url", {"url": f"http://127.0.0.1:{server.server_address[1]}/"})
            browser.run(RECORD)
            browser.do("POST", f"/element/{browser.element('#input')}/value", {"text": "What is 6*7?"})
            browser.do("POST", f"/element/{browser.element('#send')}/click")
            state = wait_for_reply(browser)
            # started with --api_key, the server answers 401: the page asks for the key once, then sends it
            monkeypatch.setattr(chat, "api_key", "sesame")
            browser.do("POST", f"/element/{browser.element('#clear')}/click")
            browser.do("POST", f"/element/{browser.element('#input')}/value", {"text": "And 6*8?"})
            browser.do("POST", f"/element/{browser.element('#send')}/click")
            for _ in range(300):
                try:
                    question = browser.do("GET", "/alert/text")
                    break
                except AssertionError:  # no prompt yet
                    time.sleep(0.1)
            browser.do("POST", "/alert/text", {"text": "sesame"})
            browser.do("POST", "/alert/accept")
            keyed = wait_for_reply(browser)
        finally:
            browser.do("DELETE", "")
    finally:
        driver_proc.terminate()
        driver_proc.wait(timeout=10)
        server.shutdown()
        server.server_close()
    assert state["log"] == [["msg user", "What is 6*7?"], ["msg assistant", REPLY_TEXT]]
    assert "API key" in question and keyed["log"] == [["msg user", "And 6*8?"], ["msg assistant", REPLY_TEXT]]
    # streamed: the bubble showed growing parts of the reply before the whole of it
    shown = [t for t in state["seen"] if t]
    assert shown[-1] == REPLY_TEXT
    parts = [t for t in shown if t != REPLY_TEXT]
    assert len(set(parts)) >= 3 and all(REPLY_TEXT.startswith(t) for t in parts), shown

"""chat.py's chat page in a real browser: headless Chromium opens /?q=..., the page's script asks the question
through the streaming API and renders the reply. Skipped when no Chromium is installed
(Debian: apt-get install chromium)."""
import html
import shutil
import subprocess
import threading

import pytest

import chat
import model
from test_chat import REPLY, REPLY_TEXT
from test_engine import FakeModel, FakeTokenizer, fake_generate, script

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")
def test_chat_page_in_browser(monkeypatch, tmp_path):
    monkeypatch.setattr(model, "generate", fake_generate)
    server = chat.ChatServer(model.Engine(FakeModel(script(*REPLY)), FakeTokenizer()), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/?q=What%20is%206*7%3F"
        # --virtual-time-budget lets the page's fetch and stream finish before the DOM is dumped
        dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                              f"--user-data-dir={tmp_path}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=50).stdout
    finally:
        server.shutdown()
        server.server_close()
    assert '<div class="msg user">What is 6*7?</div>' in dom
    assert f'<div class="msg assistant">{html.escape(REPLY_TEXT, quote=False)}</div>' in dom

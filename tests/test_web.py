"""The web page at ``/``, in a real headless Chromium against a real server (loopback only).

The page is opened with ``?prompt=p1&input=...&run=1`` so it fills the form and runs the
comparison by itself; the rendered DOM must show the plain model's and the tuned prompt's
answers, equal to the engine's own answers, plus the table of stored prompts. A screenshot must
be a real picture (PNG, not blank). Without the ``chromium`` binary these tests are skipped
(``scripts/install_chromium.sh`` installs it on Debian/Ubuntu).
"""

from __future__ import annotations

import html
import io
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from urllib.parse import urlencode

import pytest
from serving import PROMPTS, TEXTS, engine_chat, running, single

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (scripts/install_chromium.sh installs it)")


@pytest.fixture(scope="module")
def base(lm, home):
    with running(lm, home) as (url, _, _):
        yield url


def chromium(tmp_path: Path, url: str, *mode: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
           "--virtual-time-budget=5000", *mode, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path)


def element_text(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.S)
    assert m, f"#{element_id} not in the page"
    return html.unescape(m.group(1))


def test_page_and_assets_are_served_without_a_key(lm, home):
    import httpx

    with running(lm, home, api_key="k") as (url, _, _):
        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for element in ('id="prompt"', 'id="input"', 'id="out-base"', 'id="out-tuned"', 'id="prompts"'):
            assert element in page.text
        assert httpx.get(url + "/web/app.js").status_code == 200
        assert httpx.get(url + "/web/style.css").status_code == 200
        assert httpx.get(url + "/v1/prompts").status_code == 401  # the data still needs the key


@pytest.mark.slow
@needs_chromium
def test_browser_shows_plain_and_tuned_answers_side_by_side(base, ref, tmp_path):
    query = urlencode({"prompt": "p1", "input": TEXTS[0], "max_tokens": 8, "run": 1})
    res = chromium(tmp_path, f"{base}/?{query}", "--dump-dom")
    dom = res.stdout
    assert 'data-state="done"' in dom, res.stderr[-2000:]
    assert element_text(dom, "out-base") == single(ref, TEXTS[0], None, 8, temperature=0)
    assert element_text(dom, "out-tuned") == single(ref, TEXTS[0], "p1", 8, temperature=0)
    assert element_text(dom, "time-base").endswith(" ms") and element_text(dom, "time-tuned").endswith(" ms")
    assert element_text(dom, "cls-tuned").startswith("label: ")  # p1 classifies: its label is shown too
    table = dom[dom.index('id="prompts"'):]
    for name in PROMPTS:
        assert f"<td>{name}</td>" in table


@pytest.mark.slow
@needs_chromium
def test_browser_screenshot_is_a_real_picture(base, tmp_path):
    query = urlencode({"prompt": "p2", "input": TEXTS[1], "max_tokens": 8, "run": 1})
    shot = tmp_path / "page.png"
    res = chromium(tmp_path, f"{base}/?{query}", f"--screenshot={shot}")
    assert shot.is_file(), res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height, colors = png_summary(data)
    assert (width, height) == (1200, 900)
    assert colors > 50  # a blank (or single-colour) page has a handful


def png_summary(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct colours) of a PNG; without Pillow, distinct bytes of its pixel
    rows after zlib (also a handful for a blank page, and far more for a rendered one)."""
    width, height = struct.unpack(">II", data[16:24])  # IHDR is the first chunk
    try:
        from PIL import Image
    except ImportError:
        pos, idat = 8, b""
        while pos < len(data):
            n, kind = struct.unpack(">I4s", data[pos : pos + 8])
            idat += data[pos + 8 : pos + 8 + n] if kind == b"IDAT" else b""
            pos += 12 + n
        return width, height, len(set(zlib.decompress(idat)))
    with Image.open(io.BytesIO(data)) as im:
        return width, height, len(im.convert("RGB").getcolors(1 << 24))


@pytest.mark.slow
@needs_chromium
def test_browser_uses_chat_for_a_chat_model(chat_srv, chat_ref, tmp_path):
    """A chat model's page sends the input as one user message through /v1/chat/completions."""
    query = urlencode({"prompt": "c0", "input": TEXTS[2], "max_tokens": 8, "run": 1})
    dom = chromium(tmp_path, f"{chat_srv[0]}/?{query}", "--dump-dom").stdout
    msgs = [{"role": "user", "content": TEXTS[2]}]
    tok = chat_ref.lm.tokenizer
    for side, prompt in (("out-base", None), ("out-tuned", "c0")):
        _, out, _ = engine_chat(chat_ref, msgs, prompt, 8)
        assert element_text(dom, side) == tok.decode(out, skip_special_tokens=True)

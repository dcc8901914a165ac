"""Screenshots of the demo page in a real browser (headless Chromium), for a look without a
screen or as evidence that the page works end to end.

    python scripts/demo_screenshots.py --workdir W --out screens/ [--image X.png] [--report "..."]

Installs Debian's chromium with apt-get when no `chromium` is on the PATH (needs root), starts
`launch/demo.py --workdir W --seed 0` on a free local port, opens the page headless and drives it
as a person would, over Chromium's DevTools protocol on a pipe (no driver, no extra package):
types a report and presses Draw, uploads a chest X-ray (default: the first image of W's phantom
world) and presses "Write the report", then presses Draw with the report box empty. Saves

    OUT/1-draw-progress.png   the report tab while the image is being generated (progress bar)
    OUT/2-draw-result.png     the generated image, upscaled, with the seed that reproduces it
    OUT/3-read-result.png     the uploaded image as the model reads it, the report and findings
    OUT/4-empty-report.png    the message an empty report gets

and prints their paths. The first request of each task compiles its program: allow minutes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from llmcxr_jax.parallel.local_cluster import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
VIEWPORT = (1280, 1000)


class ScreenshotError(RuntimeError):
    """A step of the run that failed; the message says which."""


def ensure_chromium() -> str:
    """The chromium binary, installed from Debian's archive when missing."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        raise ScreenshotError("no chromium on the PATH: run `apt-get update && apt-get install -y "
                              "chromium` as root, or run this script as root")
    print("installing chromium: apt-get update && apt-get install -y chromium", flush=True)
    subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("chromium")
    if not found:
        raise ScreenshotError("apt-get installed chromium, but it is not on the PATH")
    return found


class DevTools:
    """Chromium's DevTools protocol over `--remote-debugging-pipe`: JSON messages, each ended by a
    NUL byte, written to the browser's fd 3 and read from its fd 4. One page, one session."""

    def __init__(self, chromium: str, profile: pathlib.Path):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--no-first-run", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"]
        # The shell puts the two pipe ends on the fds the protocol expects (3: in, 4: out).
        command = " ".join(["exec", *map(shlex.quote, [chromium, *flags, "about:blank"]),
                            f"3<&{to_browser}", f"4>&{from_browser}"])
        self.browser = subprocess.Popen(["sh", "-c", command], pass_fds=(to_browser, from_browser),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._ready = threading.Condition()
        try:
            threading.Thread(target=self._reader, daemon=True).start()
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target,
                                     flatten=True)["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=VIEWPORT[0],
                      height=VIEWPORT[1], deviceScaleFactor=1, mobile=False)
        except BaseException:  # no page: no browser left behind (the caller never gets `self`)
            self.browser.kill()
            self.browser.wait()
            raise

    def _reader(self) -> None:
        buffer = b""
        while chunk := os.read(self._read, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._ready:
                        self._replies[message["id"]] = message
                        self._ready.notify_all()

    def call(self, method: str, session: bool = False, timeout: float = 60,
             **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        with self._ready:
            if not self._ready.wait_for(lambda: self._next_id in self._replies, timeout):
                raise ScreenshotError(f"chromium did not answer {method} in {timeout:g} s")
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise ScreenshotError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ScreenshotError(f"in the page: {expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                raise ScreenshotError(f"the page did not show {what} within {timeout:g} s")
            time.sleep(0.25)

    def type_into(self, selector: str, text: str) -> None:
        """Replace a text box's content by typing `text` (as a person would: input events)."""
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                f"e.focus(); e.select(); }})()")
        self.call("Input.dispatchKeyEvent", session=True, type="keyDown", key="Delete",
                  code="Delete", windowsVirtualKeyCode=46)
        self.call("Input.dispatchKeyEvent", session=True, type="keyUp", key="Delete",
                  code="Delete", windowsVirtualKeyCode=46)
        if text:
            self.call("Input.insertText", session=True, text=text)

    def upload(self, selector: str, path: pathlib.Path) -> None:
        node = self.call("Runtime.evaluate", session=True,
                         expression=f"document.querySelector({json.dumps(selector)})")
        object_id = node["result"].get("objectId")
        if object_id is None:
            raise ScreenshotError(f"no file input {selector} on the page")
        self.call("DOM.setFileInputFiles", session=True, files=[str(path)], objectId=object_id)

    def screenshot(self, path: pathlib.Path) -> None:
        """The whole page (taller than the viewport when it needs to be)."""
        height = self.js("document.documentElement.scrollHeight")
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=VIEWPORT[0],
                  height=max(VIEWPORT[1], int(height)), deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=VIEWPORT[0],
                  height=VIEWPORT[1], deviceScaleFactor=1, mobile=False)
        print(f"  {path}", flush=True)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except ScreenshotError:
            pass
        try:
            self.browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.browser.kill()


def start_demo(workdir: str, port: int, log: pathlib.Path) -> subprocess.Popen:
    """`launch/demo.py` on `port`, returned once its page serves (its output goes to `log`)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "demo.py"), "--workdir",
                                 workdir, "--port", str(port), "--seed", "0"],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "(Ctrl-C stops)" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise ScreenshotError(f"the demo did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def default_image(workdir: pathlib.Path) -> pathlib.Path:
    images = sorted((workdir / "world" / "files").rglob("*.jpg"))
    if not images:
        raise ScreenshotError(f"{workdir} has no world/files/**/*.jpg: pass --image")
    return images[0]


def _tab(name: str) -> str:
    return ("[...document.querySelectorAll('button[role=tab]')]"
            f".find(b => b.textContent.includes({json.dumps(name)})).click()")


def drive(page: DevTools, url: str, report: str, image: pathlib.Path, out: pathlib.Path,
          timeout: float) -> list[pathlib.Path]:
    """Submit a report and an image (and an empty report), saving a screenshot of each."""
    shots = [out / name for name in ("1-draw-progress.png", "2-draw-result.png",
                                     "3-read-result.png", "4-empty-report.png")]
    page.call("Page.navigate", session=True, url=url)
    page.wait_for("!!document.querySelector('#draw-button')", "the Draw button", 60)
    page.type_into("#draw-report textarea", report)
    page.js("document.querySelector('#draw-button').click()")
    page.wait_for("document.body.innerText.includes('generating')", "the progress message", 60)
    page.screenshot(shots[0])
    page.wait_for("!!document.querySelector('#draw-image img')", "the generated image", timeout)
    page.wait_for("document.querySelector('#draw-seed input').value !== ''", "the seed", 30)
    time.sleep(1)  # let the image finish painting
    page.screenshot(shots[1])

    page.js(_tab("Image -> report"))
    page.wait_for("!!document.querySelector('#read-upload input[type=file]')", "the upload box", 30)
    page.upload("#read-upload input[type=file]", image)
    page.wait_for(f"document.querySelector('#read-upload').textContent"
                  f".includes({json.dumps(image.name)})", "the uploaded file", 60)
    page.js("document.querySelector('#read-button').click()")
    page.wait_for("document.querySelector('#read-report textarea').value !== ''",
                  "the generated report", timeout)
    page.wait_for("!!document.querySelector('#read-image img')", "the image as read", 30)
    time.sleep(1)
    page.screenshot(shots[2])

    page.js(_tab("Report -> image"))
    page.wait_for("!!document.querySelector('#draw-report textarea')", "the report box", 30)
    page.type_into("#draw-report textarea", "")
    page.js("document.querySelector('#draw-button').click()")
    page.wait_for("document.body.innerText.includes('report is empty')", "the error message", 60)
    time.sleep(1.5)  # the message fades in
    page.screenshot(shots[3])
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="a run workdir, LLM workdir or serving export with a VQ-GAN")
    parser.add_argument("--out", required=True, help="folder for the screenshots")
    parser.add_argument("--image", default=None,
                        help="the chest X-ray to upload (default: W's first world image)")
    parser.add_argument("--report", default="Moderate left pleural effusion. Mild cardiomegaly.",
                        help="the report to draw")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for each result (default: 600)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    try:
        workdir = pathlib.Path(args.workdir)
        image = pathlib.Path(args.image) if args.image else default_image(workdir)
        if not image.is_file():
            raise ScreenshotError(f"--image {image}: no such file")
        chromium = ensure_chromium()
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="demo-screenshots-") as tmp:
            tmp = pathlib.Path(tmp)
            port = free_port()
            demo = start_demo(args.workdir, port, tmp / "demo.log")
            page = None
            try:
                page = DevTools(chromium, tmp / "profile")
                shots = drive(page, f"http://127.0.0.1:{port}/", args.report, image.resolve(),
                              out, args.timeout)
            finally:
                if page is not None:
                    page.close()
                demo.terminate()
                try:
                    demo.wait(timeout=60)
                except subprocess.TimeoutExpired:  # SIGTERM ignored: no server left behind
                    demo.kill()
                    demo.wait()
    except (ScreenshotError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved {len(shots)} screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

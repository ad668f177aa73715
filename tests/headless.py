"""Debian's headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on
descriptor 3, replies on 4, each a JSON message ended by a NUL byte), with nothing but the standard library: open a
page, evaluate JavaScript in it, take a full-page screenshot. No network, a fresh profile each time.

    python -m tests.headless report/report.html --screenshot docs/images/report.png --width 1200 --height 2400
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--remote-debugging-pipe")


def _above(fd: int, low: int = 10) -> int:
    """``fd`` moved to a number of at least ``low`` (clear of the 3 and 4 the child needs)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return moved


class Chromium:
    """One headless Chromium with one page; ``with Chromium() as c: c.open(url); c.evaluate("...")``."""

    def __init__(self, width: int = 1200, height: int = 900, timeout: float = 60.0) -> None:
        self.timeout, self.width, self.height = timeout, width, height
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        to_child, from_child = _above(to_child), _above(from_child)
        # the shell moves the pipes to the child's descriptors 3 and 4, whatever numbers they have here
        wire = f'exec 3<&{to_child} 4>&{from_child} {to_child}<&- {from_child}>&-; exec "$@"'
        self.proc = subprocess.Popen(["bash", "-c", wire, "bash", CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.session = b"", 0, ""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def _recv(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"chromium sent nothing for {self.timeout} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"chromium closed its pipe: {err}")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return dict(json.loads(message))

    def call(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> dict[str, Any]:
        """Send one command (to the page's session unless ``browser``) and return its result."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._recv()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    def open(self, url: str) -> None:
        """Navigate and wait for the page's load event (images included)."""
        self.call("Page.navigate", {"url": url})
        while self._recv().get("method") != "Page.loadEventFired":
            pass

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = True, top: int = 0) -> None:
        """A PNG of the page from ``top`` (its whole height with ``full_page``, else the window's) at the window's
        width."""
        page = int(self.evaluate("document.documentElement.scrollHeight"))
        height = page - top if full_page else min(self.height, page - top)
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": top, "width": self.width, "height": height, "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))

    def top_of(self, heading: str) -> int:
        """The page offset of the first h2 or h3 whose text is ``heading``."""
        found = self.evaluate(f"(() => {{ const h = [...document.querySelectorAll('h2, h3')].find(e => e.textContent "
                              f"=== {json.dumps(heading)}); return h ? h.getBoundingClientRect().top + scrollY : -1; }})()")
        if found is None or found < 0:
            raise ValueError(f"no heading {heading!r} in the page")
        return max(0, int(found) - 8)

    def close(self) -> None:
        try:
            self.call("Browser.close", browser=True)
            self.proc.wait(10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._out)
            os.close(self._in)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", help="an HTML file")
    parser.add_argument("--screenshot", required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=0, help="this many pixels of the page (0: all of it)")
    parser.add_argument("--from-heading", default="", help="start at this section heading (default: the top)")
    args = parser.parse_args()
    with Chromium(args.width, args.height or 900) as chromium:
        chromium.open(Path(args.page).resolve().as_uri())
        top = chromium.top_of(args.from_heading) if args.from_heading else 0
        chromium.screenshot(Path(args.screenshot), full_page=not args.height, top=top)


if __name__ == "__main__":
    main()

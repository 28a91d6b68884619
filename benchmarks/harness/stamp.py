"""The device stamp: who measured (GPU via NVML, versions, git commit, date, host), and
the names derived from it (:func:`short_gpu_name`, :func:`device_key`)."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Callable

import torch

from . import common

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _nvml_value(fn: Callable, *args, scale: float | None = None):
    try:
        value = fn(*args)
    except Exception as exc:  # NVMLError_NotSupported and friends: record, go on
        return f"unavailable: {exc}"
    if isinstance(value, bytes):
        value = value.decode()
    return value / scale if scale else value


def _nvml_handle(pynvml, device_index: int):
    """The NVML handle of CUDA device ``device_index`` (by PCI bus id when torch knows it,
    since CUDA_VISIBLE_DEVICES may renumber devices)."""
    if common.cuda_available():
        try:
            props = torch.cuda.get_device_properties(device_index)
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(device_index)
        bus = getattr(props, "pci_bus_id", None)
        domain = getattr(props, "pci_domain_id", 0)
        device = getattr(props, "pci_device_id", None)
        if bus is not None and device is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08X}:{bus:02X}:{device:02X}.0")
            except Exception:
                pass
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def _torch_device_name(device_index: int) -> str:
    if not common.cuda_available():
        return "no CUDA device"
    try:
        return torch.cuda.get_device_name(device_index)
    except Exception as exc:  # a broken driver must not stop the stamp
        return f"unknown CUDA device ({type(exc).__name__}: {exc})"


def gpu_stamp(device_index: int = 0) -> dict:
    """Name, driver, clocks and power limit of the GPU via nvidia-ml-py (``pynvml``).

    Always returns a dict with ``name`` and ``nvml`` ("ok" or why not).
    """
    fallback_name = _torch_device_name(device_index)
    try:
        import pynvml
    except ImportError as exc:
        return {"name": fallback_name, "nvml": f"unavailable: nvidia-ml-py not installed ({exc})"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"name": fallback_name, "nvml": f"unavailable: {exc}"}
    try:
        handle = _nvml_handle(pynvml, device_index)
        stamp = {
            "name": _nvml_value(pynvml.nvmlDeviceGetName, handle),
            "nvml": "ok",
            "driver": _nvml_value(pynvml.nvmlSystemGetDriverVersion),
            "uuid": _nvml_value(pynvml.nvmlDeviceGetUUID, handle),
            "sm_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "max_memory_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": _nvml_value(pynvml.nvmlDeviceGetPowerManagementLimit, handle, scale=1000.0),
            "enforced_power_limit_w": _nvml_value(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1000.0),
            "temperature_c": _nvml_value(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        memory = _nvml_value(pynvml.nvmlDeviceGetMemoryInfo, handle)
        stamp["memory_total_gib"] = memory.total / 2**30 if hasattr(memory, "total") else memory
    except Exception as exc:
        return {"name": fallback_name, "nvml": f"unavailable: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    if common.cuda_available():
        try:
            stamp["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device_index)))
        except Exception as exc:
            stamp["compute_capability"] = f"unavailable: {exc}"
    return stamp


def git_commit() -> str:
    """``git rev-parse HEAD`` of the repository ("unknown" outside a git checkout).

    ``MMKERNELS_GIT_COMMIT`` overrides it (for copies of the tree without ``.git``).
    """
    override = os.environ.get("MMKERNELS_GIT_COMMIT")
    if override:
        return override
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_stamp(device_index: int = 0) -> dict:
    """Who measured: GPU (via NVML), versions, git commit, date, host."""
    return {
        "gpu": gpu_stamp(device_index),
        "cuda_available": common.cuda_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": _package_version("triton"),
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
    }


def short_gpu_name(stamp: dict) -> str:
    """A folder-friendly GPU name: "NVIDIA H100 80GB HBM3" -> "H100"; "nogpu" without one."""
    if not stamp.get("cuda_available"):
        return "nogpu"
    name = str(stamp.get("gpu", {}).get("name", ""))
    words = [w for w in name.replace("NVIDIA", "").split() if w]
    token = "".join(c for c in (words[0] if words else "") if c.isalnum() or c in "-_")
    return token or "gpu"


def device_key(stamp: dict) -> str:
    """What two runs must share to be compared: the GPU's full name (NVML, or torch's
    when NVML was unavailable) and its memory size when known ("NVIDIA H100 80GB HBM3");
    "no CUDA device" for a run without one. Driver, clocks and versions may differ (they
    are reported beside a comparison, not refused)."""
    if not stamp.get("cuda_available"):
        return "no CUDA device"
    gpu = stamp.get("gpu", {})
    key = str(gpu.get("name", "unknown")).strip()
    memory = gpu.get("memory_total_gib")
    if isinstance(memory, (int, float)):
        key += f" ({memory:.0f} GiB)"
    return key

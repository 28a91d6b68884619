"""Reading the plugin's log lines out of vLLM's output (all processes write to it)."""

from __future__ import annotations

import re

REGISTERED = re.compile(r"mmkernels vLLM plugin \(pid (\d+), backend ([\w-]+)\): registered (.*)")
DISABLED = re.compile(r"mmkernels vLLM plugin \(pid (\d+)\): disabled by MMKERNELS_DISABLE")
RAN = re.compile(r"mmkernels (merge|patch_embed|encoder_attention) ran: backend=([\w-]+)(.*?) \[(\w+), pid (\d+)")
NOT_COVERED = re.compile(r"mmkernels (merge|patch_embed|encoder_attention): .* not covered .*")


def registered(text: str) -> dict[int, str]:
    """pid -> what the plugin registered in that process."""
    return {int(m.group(1)): m.group(3) for m in REGISTERED.finditer(text)}


def disabled_pids(text: str) -> set[int]:
    return {int(m.group(1)) for m in DISABLED.finditer(text)}


def ran(text: str) -> list[tuple[str, str, str, int]]:
    """(replacement, backend, where, pid) of each first call the debug hook logged."""
    return [(m.group(1), m.group(2), m.group(4), int(m.group(5))) for m in RAN.finditer(text)]


def not_covered(text: str) -> list[str]:
    return [m.group(0) for m in NOT_COVERED.finditer(text)]

"""`kvtier demo`: a real model through all three tiers next to DynamicCache (needle.py), or a
tiny random one that needs no download (tiny.py, `kvtier demo --tiny`)."""

from __future__ import annotations

from kvtier.demo.needle import DemoResult, format_demo, run_demo
from kvtier.demo.tiny import TinyDemoResult, format_tiny_demo, run_tiny_demo

__all__ = [
    "DemoResult",
    "TinyDemoResult",
    "format_demo",
    "format_tiny_demo",
    "run_demo",
    "run_tiny_demo",
]

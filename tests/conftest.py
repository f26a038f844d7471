"""Shared pytest setup: never reach the Hugging Face hub (timm models are built with random or local weights)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

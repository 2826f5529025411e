"""Shared test settings: CPU only, few threads, deterministic seeds."""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch

torch.set_num_threads(1)

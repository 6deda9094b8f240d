"""onnxruntime sessions, importable without torch (deployment processes need only onnxruntime + numpy)."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


def create_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; ``threads`` > 0 pins intra-op threads (benchmarks use 1 for comparable numbers). Without
    it, ``MEMC_ORT_THREADS`` (when set) pins them for the whole process, e.g. for several processes sharing cores."""
    threads = threads or int(os.environ.get("MEMC_ORT_THREADS", "0") or 0)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures surface as exceptions that memc turns into one clear message
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

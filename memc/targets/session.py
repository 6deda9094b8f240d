"""onnxruntime sessions, importable without torch (deployment processes need only onnxruntime + numpy)."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from memc.targets import float_env

# what memc's sessions set, recorded in report.json for deployments that build their own (another language's API)
SESSION_CONFIG = {"session.set_denormal_as_zero": "1"}


class Session(ort.InferenceSession):
    """An InferenceSession whose runs flush denormals to zero on the calling thread (memc.targets.float_env: the
    caller's float mode is restored after each run). ``flush_denormals=False`` runs as onnxruntime does by default."""

    flush_denormals = True

    def run(self, *args, **kwargs):
        if not self.flush_denormals:
            return super().run(*args, **kwargs)
        float_env.enter()
        try:
            return super().run(*args, **kwargs)
        finally:
            float_env.leave()

    def run_with_iobinding(self, iobinding, run_options=None):
        if not self.flush_denormals:
            return super().run_with_iobinding(iobinding, run_options)
        float_env.enter()
        try:
            return super().run_with_iobinding(iobinding, run_options)
        finally:
            float_env.leave()


def create_session(path: Path, threads: int = 0, flush_denormals: bool = True) -> Session:
    """A CPU session; ``threads`` > 0 pins intra-op threads (benchmarks use 1 for comparable numbers). Without
    it, ``MEMC_ORT_THREADS`` (when set) pins them for the whole process, e.g. for several processes sharing cores.
    ``flush_denormals``: FTZ / DAZ in every run (float_env says why), also on onnxruntime's pool threads."""
    threads = threads or int(os.environ.get("MEMC_ORT_THREADS", "0") or 0)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures surface as exceptions that memc turns into one clear message
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if flush_denormals:
        for key, value in SESSION_CONFIG.items():
            opts.add_session_config_entry(key, value)
    # the process's first session sets (or clears) the flush mode of the thread creating it, for good: build it
    # inside a scope, so the caller's mode comes back either way
    float_env.enter()
    try:
        session = Session(str(path), opts, providers=["CPUExecutionProvider"])
    finally:
        float_env.leave()
    session.flush_denormals = flush_denormals
    return session

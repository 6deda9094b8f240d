"""Denormals flushed around a session run, and only there: the caller's float mode is its own."""
from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from memc.targets import float_env
from memc.targets.session import Session, create_session

pytestmark = pytest.mark.skipif(not float_env.SUPPORTED, reason="float_env needs glibc fegetmode on x86-64 / aarch64 Linux")

TINY = np.float32(1e-39)  # a denormal float32


def _mul_graph(path):
    graph = helper.make_graph([helper.make_node("Mul", ["x", "y"], ["z"])], "mul",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "y")],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_scope_flushes_and_restores():
    assert not float_env.is_flushing()
    assert TINY * np.float32(1) == TINY
    with float_env.flushed():
        assert float_env.is_flushing()
        assert TINY * np.float32(1) == 0  # DAZ: the denormal operand reads as zero
        with float_env.flushed():  # nested: the inner exit keeps flushing
            pass
        assert float_env.is_flushing()
    assert not float_env.is_flushing()
    assert TINY * np.float32(1) == TINY


def test_scope_is_per_thread():
    """A thread that was running already keeps its own mode while another thread flushes (a thread started inside
    the scope inherits it: POSIX threads start with their creator's float environment)."""
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def other():
        entered.wait(5)
        seen["flushing"] = float_env.is_flushing()
        checked.set()

    t = threading.Thread(target=other)
    t.start()
    with float_env.flushed():
        entered.set()
        checked.wait(5)
    t.join()
    assert seen == {"flushing": False}


def test_session_runs_flushed_and_leaves_the_caller_alone(tmp_path):
    path = _mul_graph(tmp_path / "mul.onnx")
    feeds = {"x": np.full(4, TINY, np.float32), "y": np.ones(4, np.float32)}
    flushed = create_session(path, threads=1)
    assert isinstance(flushed, Session)
    assert not float_env.is_flushing()  # creating it did not change this thread's mode
    np.testing.assert_array_equal(flushed.run(None, feeds)[0], np.zeros(4, np.float32))
    assert not float_env.is_flushing()
    io = flushed.io_binding()
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    io.bind_output("z")
    flushed.run_with_iobinding(io)
    np.testing.assert_array_equal(io.copy_outputs_to_cpu()[0], np.zeros(4, np.float32))
    plain = create_session(path, threads=1, flush_denormals=False)
    np.testing.assert_array_equal(plain.run(None, feeds)[0], feeds["x"])
    assert not float_env.is_flushing()


def test_failed_run_restores_the_mode(tmp_path):
    session = create_session(_mul_graph(tmp_path / "mul.onnx"), threads=1)
    with pytest.raises(Exception):
        session.run(None, {"x": np.ones(3, np.float32)})  # missing input
    assert not float_env.is_flushing()

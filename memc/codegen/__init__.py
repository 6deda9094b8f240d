"""Codegen: lower a Program to deployable graphs (ONNX today)."""

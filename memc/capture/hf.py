"""Hugging Face model directories -> an nn.Module whose forward takes token tensors and returns one tensor.

The wrappers pin ``use_cache=False`` (a DynamicCache in the output breaks torch.export) and load MoE experts with
``experts_implementation="batched_mm"`` (the default grouped_mm exports but its custom op has no ONNX lowering;
eager fails export on data-dependent shapes). See shared/design/ARCHITECTURE.md.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from memc.errors import CaptureError

_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _causal_lm_forward(self: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [batch, seq] -> logits [batch, seq, vocab], no KV cache.

    Position ids are passed per row ([batch, seq]): at opset 23 the exporter emits ONNX RotaryEmbedding, which
    onnxruntime rejects for batch >= 2 when positions are broadcast from [1, seq].
    """
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    return type(self).forward(self, input_ids=input_ids, position_ids=positions, use_cache=False).logits


def _encoder_forward(self: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """input_ids, attention_mask [batch, seq] -> last hidden state [batch, seq, hidden]."""
    return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def graph_forward(model: torch.nn.Module, task: str) -> torch.nn.Module:
    """Give the loaded model (our own instance) a tensor-in, tensor-out forward for torch.export.

    Overriding ``forward`` on the instance instead of wrapping it in another module keeps parameter names and
    ``nn_module_stack`` paths exactly as transformers names them (``model.layers.0.self_attn``).
    """
    fn = _causal_lm_forward if task == "causal-lm" else _encoder_forward
    model.forward = types.MethodType(fn, model)
    return model


@dataclass
class HFModel:
    module: torch.nn.Module
    task: str
    input_names: list[str]
    output_names: list[str]
    vocab_size: int
    max_seq_len: int | None
    architecture: str
    is_moe: bool
    attention: str = "sdpa"


def _task_of(architectures: list[str], requested: str) -> str:
    if requested != "auto":
        return requested
    for arch in architectures:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
    for arch in architectures:
        if arch.endswith("Model"):
            return "encoder"
    raise CaptureError(
        f"cannot tell what to capture for architectures {architectures or '(none listed)'}",
        hint='set [model] task = "causal-lm" or "encoder" in toolchain.toml',
    )


@dataclass
class Pretrained:
    """A Hugging Face model loaded the way memc captures it, its forward untouched."""

    model: torch.nn.Module
    config: object  # transformers.PretrainedConfig
    task: str
    architecture: str
    is_moe: bool
    attention: str = "sdpa"  # the attention implementation loaded (eager where the architecture has no sdpa)

    @property
    def max_seq_len(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)


def load_pretrained(directory: Path, task: str = "auto", dtype: str = "float32") -> Pretrained:
    """Load an HF model directory offline: sdpa attention (eager where the architecture has none), ``dtype``
    weights, MoE experts as ``batched_mm``."""
    directory = Path(directory)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    try:
        import transformers
    except ImportError:
        raise CaptureError(
            f"{directory} is a Hugging Face model directory, but transformers is not installed",
            hint="pip install 'memc[hf]'",
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise CaptureError(f"{directory}/config.json is not a readable Hugging Face config: {exc}") from None
    archs = list(getattr(config, "architectures", None) or [])
    task = _task_of(archs, task)
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls if cls is not None and hasattr(cls, "from_pretrained") else auto
    is_moe = any(getattr(config, k, None) for k in _MOE_KEYS)
    attention = attention_implementation(cls)
    kwargs = {"attn_implementation": attention, "dtype": _DTYPES[dtype], "local_files_only": True}
    if is_moe:
        kwargs["experts_implementation"] = "batched_mm"
    weights = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise CaptureError(f"{directory} has config.json but no weights (*.safetensors or *.bin)")
    try:
        model = cls.from_pretrained(directory, **kwargs).eval()
    except Exception as exc:
        raise CaptureError(f"cannot load the Hugging Face model in {directory}: {type(exc).__name__}: {exc}") from None
    return Pretrained(model, config, task, archs[0] if archs else cls.__name__, is_moe, attention)


def attention_implementation(cls: type) -> str:
    """``sdpa`` where the architecture has it, else ``eager`` (GPT-OSS has no sdpa path in transformers 5.x; its
    eager attention, with sinks, exports as matmul -> softmax -> matmul)."""
    return "eager" if getattr(cls, "_supports_sdpa", True) is False else "sdpa"


def load_hf(directory: Path, task: str, dtype: str) -> HFModel:
    p = load_pretrained(directory, task, dtype)
    if p.task == "causal-lm":
        inputs, outputs = ["input_ids"], ["logits"]
    else:
        inputs, outputs = ["input_ids", "attention_mask"], ["last_hidden_state"]
    return HFModel(
        graph_forward(p.model, p.task), p.task, inputs, outputs, int(p.config.vocab_size), p.max_seq_len,
        p.architecture, p.is_moe, p.attention,
    )

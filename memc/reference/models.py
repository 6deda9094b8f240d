"""Configs of the reference models: small causal LMs of real transformers architectures.

ref-llama reads byte-level BPE tokens (4,096 ids, trained on the train split: memc.reference.tokenizer), so
its 1024-token context spans ~3.5 KB of code and its training compute covers ~3.4x more text than a
byte-level model's. ref-moe stays byte-level (vocab 256, token = byte value, no tokenizer files). Both train
at context 1024 and are small enough (3-5M params) to train on one CPU thread and to commit as checkpoints
of a few MB.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from transformers import LlamaConfig, PreTrainedConfig, Qwen3MoeConfig

from memc.reference.corpus import DOMAINS

VOCAB = 256
BPE_VOCAB = 4096
CONTEXT = 1024


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and data settings (the step count is given separately, see STEPS_PER_MINUTE)."""

    batch_size: int = 4  # 4 x 1024 tokens: tokens/s is flat in batch size here, so prefer more steps
    context: int = CONTEXT
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    prose_fraction: float = 0.2  # prose is 4% of the train bytes; upweight it so both domains are learned
    eval_every: int = 100
    eval_windows: int = 16  # per domain, for the periodic held-out estimate only
    tokenizer_vocab: int | None = None  # a byte-level BPE of this many ids; None: raw bytes
    tokenizer_sample_bytes: int | None = None  # learn the BPE from the first train documents (name order) up to this
    # Corpus domains read (memc.reference.corpus) and each one's share of the batch rows; empty: the stdlib
    # domains with P(prose) = prose_fraction.
    domain_weights: tuple[tuple[str, float], ...] = ()
    autocast: bool = True  # bf16 autocast (fp32 weights); off where bf16 is slower than fp32 (no AVX512-BF16)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.domain_weights) or DOMAINS

    def to_dict(self) -> dict:
        return asdict(self)


def _bpe_llama(**dims) -> LlamaConfig:
    """A Llama on the reference BPE vocabulary with the settings every BPE reference model shares: CONTEXT
    positions, default rotary, tied embeddings, no special token ids; `dims` sets its size."""
    return LlamaConfig(
        vocab_size=BPE_VOCAB,
        max_position_embeddings=CONTEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **dims,
    )


def ref_llama_config() -> LlamaConfig:
    """Dense Llama, 4 layers x hidden 256, GQA (4 query heads, 2 KV heads), BPE vocabulary of 4,096 with
    tied input/output embeddings: 4.2M params."""
    return _bpe_llama(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def ref_moe_config() -> Qwen3MoeConfig:
    """Qwen3-MoE, 4 layers x hidden 256, 16 experts (intermediate 64) with top-2 routing in every
    layer: 4.08M params total, 1.33M active per token. The load-balancing loss is on in training."""
    return Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=768,  # unused: every layer is sparse
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=CONTEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def ref_moe_domains_config() -> Qwen3MoeConfig:
    """Qwen3-MoE on a BPE of 4,096 ids learned from four domains (stdlib prose and code, Vim help, Linux C
    headers), so that its experts can specialise by domain rather than by byte kind: 4 layers x hidden 128,
    16 experts (intermediate 64) with top-2 renormalised routing in every layer, tied embeddings, context 256.
    Sized for ~40 minutes of one CPU thread shared by several jobs (hidden 256 at context 512 ran ~2.5x slower
    per token). The load-balancing loss is on in training."""
    return Qwen3MoeConfig(
        vocab_size=BPE_VOCAB,
        hidden_size=128,
        intermediate_size=512,  # unused: every layer is sparse
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=MOE_DOMAINS_CONTEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def ref_llama_recall_config() -> LlamaConfig:
    """The recall model (memc.reference.recall): a 2-layer Llama on ref-llama's BPE vocabulary, hidden 128,
    4 heads of 32, tied embeddings: 1.02M params. Two layers are the fewest that can
    match a multi-token key (a layer gathering each position's preceding tokens, then one matching them), and
    small enough to train to recall in ~65 minutes (four runs, memc.reference.recall) on one shared CPU thread
    in float32."""
    return _bpe_llama(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
    )


MOE_DOMAINS_CONTEXT = 256

CONFIGS: dict[str, Callable[[], PreTrainedConfig]] = {
    "ref-llama": ref_llama_config, "ref-moe": ref_moe_config, "ref-moe-domains": ref_moe_domains_config,
}

# ref-llama: the BPE makes prose 114K train tokens, so the byte models' 0.2 prose share would repeat it ~28 times
# in a 3,600-step run; 0.06 keeps it near 7 epochs (code: ~5 epochs of 2.9M tokens).
TRAIN: dict[str, TrainSettings] = {
    "ref-llama": TrainSettings(tokenizer_vocab=BPE_VOCAB, prose_fraction=0.06),
    "ref-moe": TrainSettings(),
    # Three large domains evenly; prose is only ~110K train tokens, so an even quarter would repeat it ~15 times
    # in the run and overfit it: 0.1 keeps it near 6 epochs.
    "ref-moe-domains": TrainSettings(
        batch_size=16, context=MOE_DOMAINS_CONTEXT, tokenizer_vocab=BPE_VOCAB, tokenizer_sample_bytes=2_000_000,
        eval_windows=16, warmup_steps=40, eval_every=50, autocast=False,
        domain_weights=(("prose", 0.1), ("code", 0.3), ("vimhelp", 0.3), ("c", 0.3)),
    ),
}

# Training stops on steps, not wall time, so a rerun with the same seed is the same run. --minutes is
# converted with these speeds (4,096 tokens a step, 1 thread, bf16 autocast), measured on the 2 shared cores
# while other work ran: ref-llama (BPE) ~2,950 tok/s in its 3,600-step run, ref-moe ~3,200 tok/s in its
# 1,300-step run. The exact commands are in each checkpoint's train_config.json.
# ref-moe-domains trains in float32: on the AVX2-only EPYC it was trained on, bf16 autocast made a step ~4x slower
# (ref-moe's step: 3.2 s fp32 vs 13.4 s bf16 of CPU time); ~1,550 tok/s (16 x 256 tokens a step) on the shared cores.
STEPS_PER_MINUTE: dict[str, float] = {"ref-llama": 44.0, "ref-moe": 47.2, "ref-moe-domains": 22.7}


def model_config(name: str) -> PreTrainedConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown reference model {name!r}; expected one of {sorted(CONFIGS)}")
    return CONFIGS[name]()

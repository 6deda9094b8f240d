"""detect-attention finds every attention site of real architectures and hand-written models, and nothing else."""
from __future__ import annotations

import math

import pytest
import torch

from memc.passes.attention.detect import detect_attention
from memc.program import Program
from tests.helpers import captured, LAYERS


def _program(source: str) -> Program:
    return captured(source)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_rotary_decoders(tiny_hf, family):
    sites = detect_attention(_program(tiny_hf(family)))
    assert [s.module for s in sites] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    for s in sites:
        assert (s.kind, s.num_heads, s.num_kv_heads, s.head_dim) == ("sdpa", 4, 2, 8)
        assert s.causal and s.mask == "causal" and s.window is None
        assert s.rotary and s.scale == pytest.approx(1 / math.sqrt(8))
        assert s.hidden is not None and s.q_weight.endswith("self_attn.q_proj.weight")
        assert s.k_heads != s.k  # the GQA repeat is seen through


def test_gpt2_has_no_rotary_and_full_heads(tiny_gpt2_dir):
    sites = detect_attention(_program(tiny_gpt2_dir))
    assert [s.module for s in sites] == [f"transformer.h.{i}.attn" for i in range(LAYERS)]
    assert all(s.num_heads == s.num_kv_heads == 4 and not s.rotary and s.causal for s in sites)


def test_bert_is_bidirectional_with_padding(tiny_bert_dir):
    sites = detect_attention(_program(tiny_bert_dir))
    assert len(sites) == LAYERS
    assert all(not s.causal and s.mask == "padding" for s in sites)


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "olmoe"])
def test_moe_routers_are_not_sites(tiny_hf, family):
    sites = detect_attention(_program(tiny_hf(family)))
    assert [s.module.rsplit(".", 1)[-1] for s in sites] == ["self_attn"] * LAYERS


def test_multihead_attention_module():
    (site,) = detect_attention(_program("tests.fixtures.handwritten:mha_model"))
    assert (site.module, site.kind, site.num_heads, site.head_dim, site.mask) == ("attn", "sdpa", 4, 8, "causal")
    assert site.hidden is None  # nn.MultiheadAttention runs seq-first inside


def test_manual_attention_is_eager_causal():
    sites = detect_attention(_program("tests.fixtures.handwritten:causal_attention_model"))
    assert [s.module for s in sites] == ["layers.0", "layers.1"]
    for s in sites:
        assert s.kind == "eager" and s.causal and s.mask == "causal" and not s.rotary
        assert s.scale == pytest.approx(1 / math.sqrt(8)) and s.hidden is not None


def test_sinks_softcap_and_sliding_band():
    (site,) = detect_attention(_program("tests.fixtures.attention_models:sink_softcap_model"))
    assert site.sinks and site.softcap == pytest.approx(30.0)
    assert site.mask == "sliding" and site.window == 4 and site.causal
    assert site.scale == pytest.approx(1 / math.sqrt(8))


def test_router_and_classifier_softmax_are_not_attention():
    assert detect_attention(_program("tests.fixtures.attention_models:router_and_head_model")) == []


def test_eager_llama_matches_sdpa_llama(tiny_llama_dir):
    """transformers' eager implementation exports as matmul -> mask -> softmax -> matmul: same facts as sdpa."""
    import transformers

    from memc.capture.hf import graph_forward

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    model = graph_forward(model, "causal-lm")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(model, (ids,), strict=False)
    sdpa = detect_attention(_program(tiny_llama_dir))
    prog = Program(ep.module(), (ids,), ["input_ids"], ["logits"], {}, sdpa and _program(tiny_llama_dir).source)
    eager = detect_attention(prog)
    assert [s.kind for s in eager] == ["eager"] * LAYERS
    keys = ("module", "num_heads", "num_kv_heads", "head_dim", "causal", "mask", "rotary")
    assert [[getattr(s, k) for k in keys] for s in eager] == [[getattr(s, k) for k in keys] for s in sdpa]
    assert all(s.scale == pytest.approx(1 / math.sqrt(8)) for s in eager)


def test_sliding_window_mistral(tmp_path):
    import transformers

    cfg = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    sites = detect_attention(_program(tmp_path), probe_seq_len=32)
    assert [(s.mask, s.window) for s in sites] == [("sliding", 8)] * 2


@pytest.mark.parametrize("model", ["llama", "gpt2", "bert", "mixtral", "mha", "manual"])
def test_inspect_lists_attention_sites(tiny_hf, model):
    """`memc inspect` prints the sites table and --json carries every site with its fields."""
    import json

    from tests.helpers import run_cli

    source = {"mha": "tests.fixtures.handwritten:mha_model",
              "manual": "tests.fixtures.handwritten:causal_attention_model"}.get(model) or tiny_hf(model)
    expected = 1 if model == "mha" else LAYERS
    rc, out, err = run_cli(["inspect", source, "--json"])
    assert rc == 0, err
    sites = json.loads(out)["attention_sites"]
    assert len(sites) == expected and all({"module", "num_heads", "mask", "rotary"} <= set(s) for s in sites)
    rc, out, err = run_cli(["inspect", source])
    assert rc == 0 and f"attention sites ({expected})" in out

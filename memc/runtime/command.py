"""`memc generate ARTIFACT --prompt TEXT`: text in, streamed text out, through an artifact's decode graph.

Only the artifact directory is read (decode.onnx and the shipped tokenizer files; the source model may be gone)
and torch is never imported. The generated text goes to stdout as it is produced; what is not text (the context
note, the final timing line) goes to stderr, so ``memc generate ... > out.txt`` keeps the text alone.
``--json`` prints one JSON object to stdout instead.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from memc.errors import ArtifactError, MemcError
from memc.runtime.engine import DECODE_FILE, DecodeEngine, DecodeStateError
from memc.runtime.expert_cache import ExpertCacheEngine, has_expert_cache
from memc.runtime.generate import Generation
from memc.runtime.sampling import SamplingConfig
from memc.runtime.text import TextStream, load_tokenizer

DECODE_HINT = ("compile with a decode graph: set `[target] decode_graph = true` in the toolchain, or "
               "`memc compile MODEL --set target.decode_graph=true`")


@dataclass
class GenerateRequest:
    artifact: str
    prompt: str | None = None
    prompt_file: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    threads: int = 0
    as_json: bool = False
    slots: int | None = None  # expert cache: resident experts per layer (None: as compiled)
    expert_cache: bool = True  # use the artifact's expert cache when it has one


def read_prompt(req: GenerateRequest) -> str:
    if (req.prompt is None) == (req.prompt_file is None):
        raise MemcError("give the prompt with exactly one of --prompt TEXT or --prompt-file FILE")
    if req.prompt is not None:
        text = req.prompt
    else:
        path = Path(req.prompt_file)
        if not path.is_file():
            raise MemcError(f"--prompt-file: {path} does not exist or is not a file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MemcError(f"--prompt-file: {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})",
                            hint="convert it, e.g. iconv -f latin1 -t utf-8") from None
        except OSError as exc:
            raise MemcError(f"--prompt-file: {path} cannot be read: {exc}") from None
    if not text:
        raise MemcError("the prompt is empty; generation continues a prompt of at least one token")
    return text


def open_engine(artifact: str, threads: int, slots: int | None = None, expert_cache: bool = True
                ) -> tuple[Path, DecodeEngine | ExpertCacheEngine]:
    """The artifact's expert cache when it has one (and ``expert_cache``), else its decode graph."""
    path = Path(artifact)
    if path.is_file() and path.name == DECODE_FILE:
        path = path.parent
    if not path.is_dir():
        raise ArtifactError(f"{artifact} is not a memc artifact directory: it does not exist"
                            if not path.exists() else f"{artifact} is not a memc artifact directory")
    if expert_cache and has_expert_cache(path):
        try:
            return path, ExpertCacheEngine(path, threads, slots)
        except (DecodeStateError, OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: expert cache: {exc}") from None
    if slots is not None:
        raise MemcError(f"--slots: {path} has no expert cache" + (" (or --no-expert-cache was given)"
                                                                   if has_expert_cache(path) else ""),
                        hint="compile with `--set target.expert_cache.slots=C`")
    if not (path / DECODE_FILE).is_file():
        raise ArtifactError(f"{path} has no decode graph ({DECODE_FILE}), so it cannot generate", hint=DECODE_HINT)
    try:
        return path, DecodeEngine(path, threads)
    except (DecodeStateError, OSError) as exc:
        raise ArtifactError(f"{path / DECODE_FILE}: {exc}") from None
    except Exception as exc:  # onnxruntime cannot load it
        raise ArtifactError(f"{path / DECODE_FILE} is not a loadable ONNX model: {type(exc).__name__}: {exc}") from None


def context_note(engine: DecodeEngine | ExpertCacheEngine, prompt_tokens: int, new_tokens: int) -> str:
    if isinstance(engine, ExpertCacheEngine):
        experts = sorted({l.cache.experts for l in engine.layers})
        return (f"expert cache: {engine.slots} of {'/'.join(map(str, experts))} experts resident per MoE layer "
                f"({engine.num_layers} layers), the others loaded on demand; context limit "
                f"{engine.max_seq_len or 'none recorded'} (KV cache)")
    if engine.bounded_state:
        return (f"bounded state: every attention site is memory-caching with a capped state "
                f"({engine.state_bytes_at(0):,} bytes at any context), so there is no context limit")
    limit = engine.max_seq_len
    if limit is None:
        return "KV-cache state (grows with the context); the graph records no context limit"
    return f"context limit {limit:,} positions (KV cache): prompt {prompt_tokens:,} + up to {new_tokens:,} new tokens"


def generate_command(req: GenerateRequest, out: TextIO | None = None, err: TextIO | None = None) -> dict[str, Any]:
    out, err = out or sys.stdout, err or sys.stderr
    if isinstance(req.max_new_tokens, bool) or req.max_new_tokens < 1:
        raise MemcError(f"--max-new-tokens must be >= 1, got {req.max_new_tokens}")
    try:
        sampling = SamplingConfig(req.temperature, req.top_k, req.top_p, req.seed)
    except MemcError as exc:
        raise MemcError(f"--{str(exc).replace('_', '-', 1)}") from None
    if any(not s for s in req.stop):
        raise MemcError("--stop: a stop string must not be empty")
    prompt = read_prompt(req)
    path, engine = open_engine(req.artifact, req.threads, req.slots, req.expert_cache)
    tokenizer = load_tokenizer(path, engine.vocab_size)
    ids = tokenizer.encode(prompt)
    if ids.size == 0:
        raise MemcError("the prompt encodes to no tokens; give some text")
    if engine.vocab_size is not None and int(ids.max()) >= engine.vocab_size:
        raise ArtifactError(f"the tokenizer in {path} produced id {int(ids.max())}, but the decode graph's vocabulary "
                            f"is {engine.vocab_size}: the tokenizer files do not belong to this model")
    limit = engine.max_seq_len
    if limit is not None and ids.size >= limit:
        raise MemcError(f"the prompt is {ids.size:,} tokens, longer than this model allows: its context is "
                        f"{limit:,} positions (prompt + new tokens), so at most {limit - 1:,} prompt tokens",
                        hint="shorten the prompt, or compile the memory-caching form (bounded state, no limit)")
    stop_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    try:
        run = Generation(engine, ids, req.max_new_tokens, sampling, stop_ids)
    except DecodeStateError as exc:
        raise MemcError(str(exc)) from None
    note = context_note(engine, int(ids.size), run.max_new_tokens)
    if not req.as_json:
        print(f"memc generate: {note}", file=err, flush=True)
    stream = TextStream(tokenizer.decode, req.stop)
    try:
        for token in run:
            piece = stream.push(int(token[0]))
            if piece and not req.as_json:
                out.write(piece)
                out.flush()
            if stream.stopped:
                break
    except DecodeStateError as exc:
        raise MemcError(f"the decode graph refused a step: {exc}") from None
    tail = stream.finish()
    if tail and not req.as_json:
        out.write(tail)
    stop_reason = "stop_text" if stream.stopped else ("eos" if run.stop_reason == "stop_id" else run.stop_reason)
    timings = run.timings()
    result = {
        "artifact": str(path),
        "prompt_tokens": int(ids.size),
        "tokens": [int(t[0]) for t in run.tokens],
        "text": stream.text,
        "stop_reason": stop_reason,
        "sampling": sampling.as_dict(),
        "timings": timings,
        "state_bytes": run.state_bytes,
        "bounded_state": engine.bounded_state,
        "context_limit": limit if not engine.bounded_state else None,
        "note": note,
    }
    if isinstance(engine, ExpertCacheEngine):
        result["expert_cache"] = engine.stats()
    if req.as_json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write("\n")
        out.flush()
        print(final_line(result), file=err)
    return result


def final_line(result: dict[str, Any]) -> str:
    t = result["timings"]
    decode = (f"decode {t['decode_steps']} steps at {t['decode_ms_per_token']:.2f} ms/token"
              if t["decode_steps"] else "decode: no steps (one new token comes from the prefill)")
    line = (f"memc generate: prefill {t['prefill_tokens']:,} tokens at {t['prefill_tokens_per_s']:,.0f} tokens/s | "
            f"{decode} | {len(result['tokens'])} new tokens | state {result['state_bytes']:,} bytes | "
            f"stopped: {result['stop_reason']}")
    cache = result.get("expert_cache")
    if cache:
        rates = " ".join(f"{l['hit_rate']:.2f}" if l["hit_rate"] is not None else "-" for l in cache["layers"])
        line += (f"\nmemc generate: expert cache {cache['slots']} slots: hit rate {cache['hit_rate']:.3f} "
                 f"(per layer {rates}), {cache['loads']:,} loads, {cache['bytes_resident']:,} of "
                 f"{cache['bytes_full']:,} weight bytes resident")
    return line

"""Selective segment memory on the recall model (a Stage-1 prototype, benchmark-side): does keeping the raw (k, v)
of a few salient tokens per closed segment recall where feature-map segment memories (0.03-0.19) did not?

    python benchmarks/memory_caching_select.py --configs 16:2,64:6,16:16:512 --trials 16 [--oracle] [--learned]

Form (per layer, per KV head; parallel form = an attention mask over the model's own rotated q, k, v):
key j is visible to query i iff j is in i's window (i - window < j <= i), or j is in the *open* segment
(tokens j <= i - window of segment (i - window) // segment, kept raw until it closes), or j is a *kept* token of a
closed segment: one of the `keep` highest-salience tokens of its segment (ties: the earlier token) and, with a
cap, among the `cap` highest-salience such tokens of all segments closed before i's (a fixed-size pool that
evicts its lowest-salience token: with a fixed capacity the streaming pool equals this top-cap set). Reads are
exact softmax over the visible keys, so a kept token is recalled exactly.

Salience is one score per (token, KV head):
* ORACLE (an upper bound, it sees the future): the teacher's (full attention's) largest attention log-odds
  the token receives from any query at least `window` tokens later (max over the query heads of its group);
* learned: a tiny scorer of the token's own layer input (after the input norm) and rotated key, per KV head,
  trained by regression on the oracle's log-odds (clipped to [-10, 30]) over teacher-fed windows of planted recall text built from the
  TRAIN split (memc.reference.recall.recall_window), so it cannot see the query it will serve.
Configs are `segment:keep[:cap]`; the window is --window (32).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "models" / "ref-llama-recall"


@dataclass(frozen=True)
class Select:
    window: int
    segment: int
    keep: int
    cap: int = 0  # 0: unbounded pool

    @property
    def label(self) -> str:
        return f"S={self.segment} m={self.keep}" + (f" cap={self.cap}" if self.cap else "")


def visible(score: torch.Tensor, sel: Select) -> torch.Tensor:
    """[B, H, T, T] bool: key j visible to query i (see the module docstring); score [B, H, T]."""
    b, h, t = score.shape
    w, s, m = sel.window, sel.segment, sel.keep
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    win = (j <= i) & (i - j < w)
    nseg = -(-t // s)
    pad = nseg * s - t
    sc = torch.nn.functional.pad(score, (0, pad), value=float("-inf")).reshape(b, h, nseg, s)
    idx = torch.arange(s)
    higher = (sc[..., None, :] > sc[..., :, None]) | ((sc[..., None, :] == sc[..., :, None]) & (idx < idx[:, None]))
    rank = higher.sum(-1).reshape(b, h, nseg * s)[..., :t]  # rank of each token within its segment
    cand = rank < m
    seg = torch.arange(t) // s  # [T]
    o = torch.div(torch.arange(t) - w, s, rounding_mode="floor")  # open segment of each query (< 0: none)
    mem = (torch.arange(t)[None, :] <= torch.arange(t)[:, None] - w)  # j <= i - w
    open_vis = mem & (seg[None, :] == o[:, None])
    if not sel.cap:
        closed_vis = cand[..., None, :] & (seg[None, :] < o[:, None])
    else:
        jj = torch.arange(t)
        above = cand[..., None, :] & ((score[..., None, :] > score[..., :, None])
                                      | ((score[..., None, :] == score[..., :, None]) & (jj < jj[:, None])))
        # above[b, h, j, j']: candidate j' outranks j; count per segment of j', cumulative over closed segments
        above = torch.nn.functional.pad(above, (0, pad)).reshape(b, h, t, nseg, s).sum(-1)  # [B, H, T(j), nseg]
        cnt = torch.cumsum(above, -1) - above  # outranking candidates in segments < c, for c = seg index
        cnt = torch.cat([cnt, cnt[..., -1:] + above[..., -1:]], -1)  # c = 0 .. nseg
        oc = o.clamp(min=0)  # [T(i)]
        pool_cnt = cnt[..., oc].transpose(-1, -2)  # [B, H, T(i), T(j)]: outranking candidates closed before i's
        closed_vis = cand[..., None, :] & (seg[None, :] < o[:, None]) & (pool_cnt < sel.cap)
    return win | ((open_vis | closed_vis) & (o[:, None] >= 0))


def state_bytes(sel: Select, layers: int, kv_heads: int, head_dim: int, context: int) -> int:
    """Decode state after `context` tokens (batch 1, fp32): per layer and KV head the window's and the open
    segment's raw k, v, and the pool's kept k, v plus each one's score (for eviction); a token counter."""
    closed = max(context - sel.window, 0) // sel.segment
    pool = sel.keep * closed if not sel.cap else min(sel.cap, sel.keep * closed)
    floats = (sel.window + sel.segment) * 2 * head_dim + pool * (2 * head_dim + 1)
    return layers * kv_heads * floats * 4 + 8


class Scorer(nn.Module):
    """Salience of each token for each KV head from its own normed layer input (no future, and no position: the
    rotated key carries the absolute position, and in the training text late plants are queried at short gaps, so
    a scorer that sees the key learned 'late = not salient'; the un-rotated key is a linear map of this input)."""

    def __init__(self, hidden: int, heads: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width * heads), nn.GELU(), nn.Linear(width * heads, heads))

    def forward(self, hn: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """hn [B, T, hidden] -> [B, H, T]."""
        return self.net(hn).transpose(1, 2)


class Net:
    """The recall model's forward written out, so each layer's attention can take a visibility mask."""

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM

        self.m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        cfg = self.m.config
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hidden = cfg.hidden_size
        self.layers = cfg.num_hidden_layers

    @torch.no_grad()
    def run(self, ids: torch.Tensor, mask_fn=None, record: bool = False):
        """logits, and with `record` per layer (normed input, k, probs). mask_fn(layer, hn, k, probs_full) ->
        [B, Hkv, T, T] bool or None (full causal)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        mm = self.m.model
        b, t = ids.shape
        x = mm.embed_tokens(ids)
        cos, sin = mm.rotary_emb(x, torch.arange(t)[None])
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        rec = []
        for li, layer in enumerate(mm.layers):
            a = layer.self_attn
            hn = layer.input_layernorm(x)
            q = a.q_proj(hn).view(b, t, self.h, self.d).transpose(1, 2)
            k = a.k_proj(hn).view(b, t, self.hkv, self.d).transpose(1, 2)
            v = a.v_proj(hn).view(b, t, self.hkv, self.d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            g = self.h // self.hkv
            kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            s = q @ kk.transpose(-1, -2) * a.scaling
            vis = causal if mask_fn is None else mask_fn(li, hn, k)
            if vis.dim() == 4:
                vis = vis.repeat_interleave(g, 1)
            p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
            if record:
                rec.append((hn, k, p, s.masked_fill(~vis, float("-inf"))))
            o = (p @ vv).transpose(1, 2).reshape(b, t, self.h * self.d)
            x = x + a.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.m.lm_head(mm.norm(x))
        return (logits, rec) if record else logits


def oracle_scores(probs: torch.Tensor, logits: torch.Tensor, window: int, hkv: int) -> torch.Tensor:
    """[B, Hkv, T]: the largest log-odds log(p / (1 - p)) that key j gets from any query i >= j + window (max over
    the group's heads). Log-odds, not p: ~12% of the code tokens get p > 0.994 from some far query in the copy
    heads (induction on repeated code), so p saturates and ties with the planted values (p ~ 1 - 1e-6); the
    log-odds keep the copy heads' margins (median 13 nats on a planted value, 98% of the code below that).
    The query's top key gets its log-odds from the logits (logit minus the log-sum-exp of the others), exact
    where 1 - p underflows."""
    b, h, t, _ = probs.shape
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    far = (i - j >= window)
    lo = torch.log(probs.clamp_min(1e-30)) - torch.log1p(-probs.clamp(max=0.5))
    am = logits.argmax(-1, keepdim=True)
    top = logits.gather(-1, am) - torch.logsumexp(logits.scatter(-1, am, float("-inf")), -1, keepdim=True)
    lo = torch.where(probs > 0.5, top.expand_as(lo), lo)  # only a query's top key can have p > 0.5
    lo = lo.masked_fill(~far, float("-inf")).amax(-2)  # [B, H, T]
    lo = lo.clamp(min=-30.0)  # the last `window` keys have no far query in the window: -inf -> floor
    return lo.reshape(b, hkv, h // hkv, t).amax(2)


class ProbeBackend:
    """memc.eval.recall's backend protocol over Net with a selection mode (full / window / oracle / learned)."""

    def __init__(self, net: Net, mode: str, sel: Select | None, scorers: list[Scorer] | None = None, batch: int = 4):
        from memc.eval.backends import ModelInfo

        self.net, self.mode, self.sel, self.scorers, self.batch = net, mode, sel, scorers, batch
        self.info = ModelInfo("causal-lm", ["input_ids"], 4096, 1024, 0, MODEL)

    def _mask_fn(self, ids: torch.Tensor):
        if self.mode == "full":
            return None
        w = self.sel.window
        if self.mode == "window":
            t = ids.shape[1]
            i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
            band = (j <= i) & (i - j < w)
            return lambda li, hn, k: band
        if self.mode == "oracle":
            _, rec = self.net.run(ids, None, record=True)
            scores = [oracle_scores(r[2], r[3], w, self.net.hkv) for r in rec]
            return lambda li, hn, k: visible(scores[li], self.sel)
        if self.mode == "learned":
            return lambda li, hn, k: visible(self.scorers[li](hn, k), self.sel)
        raise ValueError(self.mode)

    @torch.no_grad()
    def forward(self, feeds: dict) -> np.ndarray:
        ids = torch.from_numpy(feeds["input_ids"])
        out = []
        for r in range(0, len(ids), self.batch):
            chunk = ids[r : r + self.batch]
            out.append(self.net.run(chunk, self._mask_fn(chunk)).numpy())
        return np.concatenate(out)


def train_windows(n: int, seed: int, encode) -> torch.Tensor:
    """n windows of 1024 tokens of TRAIN-split code with 8 planted recall pairs each (the recall model's last stage)."""
    from memc.reference.recall import head, recall_window
    from memc.reference.recall_text import train_filler

    filler = encode(head(train_filler(), 1_500_000))
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([recall_window(filler, rng, 1024, 8, 900, encode)[0] for _ in range(n)]))


def train_scorers(net: Net, wins: torch.Tensor, window: int, steps: int, lr: float, seed: int) -> tuple[list, list]:
    """Teacher-fed regression of each layer's scorer on log(oracle + 1e-3); returns scorers and the loss log."""
    torch.manual_seed(seed)
    feats = [[] for _ in range(net.layers)]
    for r in range(0, len(wins), 4):
        _, rec = net.run(wins[r : r + 4], None, record=True)
        for li, (hn, k, p, lg) in enumerate(rec):
            feats[li].append((hn, k, oracle_scores(p, lg, window, net.hkv).clamp(-10.0, 30.0)))
    scorers, log = [], []
    for li in range(net.layers):
        hn = torch.cat([f[0] for f in feats[li]])
        k = torch.cat([f[1] for f in feats[li]])
        y = torch.cat([f[2] for f in feats[li]])
        valid = torch.zeros(y.shape[-1], dtype=torch.bool)
        valid[: y.shape[-1] - window] = True  # the last window's tokens get no far query in this window
        sc = Scorer(net.hidden, net.hkv)
        opt = torch.optim.Adam(sc.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed + li)
        for step in range(steps):
            rows = torch.randint(0, len(hn), (8,), generator=gen)
            pred = sc(hn[rows], k[rows])
            loss = ((pred - y[rows]) ** 2)[..., valid].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                log.append({"layer": li, "step": step, "mse": round(loss.item(), 4)})
                print(f"  scorer layer {li} step {step} mse {loss.item():.4f}", file=sys.stderr, flush=True)
        sc.eval()
        for p in sc.parameters():
            p.requires_grad_(False)
        scorers.append(sc)
    return scorers, log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="16:2,64:6,16:16:512")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--distances", default="16,64,160,288,416,672,896")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--modes", default="full,window,oracle,learned")
    ap.add_argument("--train-windows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from memc.eval.recall import recall_probe
    from memc.eval.text import load_text, text_codec

    net = Net(MODEL)
    probe_backend = ProbeBackend(net, "full", None)
    encode = text_codec(probe_backend.info).encode
    filler = load_text("heldout:code")
    distances = [int(d) for d in args.distances.split(",")]
    modes = args.modes.split(",")
    sels = [Select(args.window, *[int(x) for x in c.split(":")]) for c in args.configs.split(",")]
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    scorers = None
    if "learned" in modes:
        t0 = time.process_time()
        wins = train_windows(args.train_windows, args.seed, encode)
        scorers, results["scorer_log"] = train_scorers(net, wins, args.window, args.steps, args.lr, args.seed)
        print(f"  scorers trained in {time.process_time() - t0:.0f} s CPU", file=sys.stderr)

    def probe(label: str, backend: ProbeBackend) -> None:
        t0 = time.process_time()
        pts = recall_probe(backend, filler, distances, 1024, args.trials, 0, encode)
        row = {"label": label, "points": [p.as_dict() for p in pts]}
        results["rows"].append(row)
        print(f"{label:34s} " + " ".join(f"{p.token_accuracy:.2f}({p.control_token_accuracy:.2f})" for p in pts)
              + f"  [{time.process_time() - t0:.0f} s CPU]", flush=True)

    print(f"{'config':34s} " + " ".join(f"d={d}" for d in distances), flush=True)
    if "full" in modes:
        probe("(a) full attention", ProbeBackend(net, "full", None))
    if "window" in modes:
        probe(f"(b) window {args.window} only", ProbeBackend(net, "window", sels[0]))
    for sel in sels:
        for mode in ("oracle", "learned"):
            if mode in modes:
                probe(f"{mode} {sel.label}", ProbeBackend(net, mode, sel, scorers))
    results["state"] = []
    for sel in sels:
        for ctx in (1024, 8192, 32768):
            kv = 2 * 2 * net.hkv * ctx * net.d * 4  # 2 layers x (k, v) x fp32
            st = state_bytes(sel, net.layers, net.hkv, net.d, ctx)
            results["state"].append({"config": sel.label, "context": ctx, "kv_bytes": kv, "state_bytes": st})
            print(f"state {sel.label:24s} {ctx:6d} tokens: KV {kv:,} B, selective {st:,} B ({kv / st:.1f}x smaller)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

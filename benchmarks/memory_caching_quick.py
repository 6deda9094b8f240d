"""Quick recall experiment (a diagnostic, not a benchmark table): train the memory-caching layers of the recall model for
--steps on --windows cached teacher-fed windows of planted recall text (batch 1), then probe recall (--trials per distance).

    python benchmarks/memory_caching_quick.py --steps 200 --windows 32 --lr 0.03 --set router=phi_window \
        --set router_bias_init=4.0 --set feature_dim=128 --attn-loss 1.0 --save /tmp/H
"""
import sys, json, time, argparse
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.memory_caching import _program, _Chunked, set_memory
from memc.eval.backends import TorchBackend
from memc.eval.recall import recall_probe
from memc.eval.text import load_text, text_codec, tokenize
from memc.passes.attention.distill import teacher_mode, relative_error, _window_dropout
from memc.passes.attention.memory_caching import MC_SITES_KEY
from memc.reference import recall_text
from memc.passes.attention.router_loss import memory_kl, attention_kl
torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--windows", type=int, default=16)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--trials", type=int, default=8)
ap.add_argument("--dist", default="64,160,416,896")
ap.add_argument("--layers", default="0,1")
ap.add_argument("--save", default="")
ap.add_argument("--memory-loss", type=float, default=0.0)
ap.add_argument("--mse", type=float, default=1.0)
ap.add_argument("--attn-loss", type=float, default=0.0)
a = ap.parse_args()
layer = {"window": 32, "segment": 16, "feature_dim": 64, "variant": "sparse", "top_k": 4, "max_segments": 0,
         "cap_policy": "merge", "router_rank": 8, "router_bias_init": -4.0}
for s in a.set:
    k, v = s.split("="); layer[k] = json.loads(v) if v[0] in "-0123456789." else v
print(layer, a, flush=True)
model = "models/ref-llama-recall"
prog = _program(model, layer, None)
gm, sites = prog.module, prog.annotations[MC_SITES_KEY]
backend = TorchBackend(prog)
cache = Path("/tmp/memc-recall-quick/train_ids.npy"); cache.parent.mkdir(parents=True, exist_ok=True)
if not cache.exists():
    text = cache.parent / "recall-train.txt"
    recall_text.write(text, 1000000, every=100)
    ids, _ = tokenize(text.read_bytes(), backend.info)
    np.save(cache, ids)
ids = np.load(cache)
rng = np.random.default_rng(0); torch.manual_seed(0)
starts = rng.integers(0, len(ids) - 1024, size=a.windows)
wins = torch.from_numpy(np.stack([ids[s:s + 1024] for s in starts]).astype(np.int64))
seen = []
with teacher_mode(gm, sites) as teachers, torch.no_grad():
    for i in range(a.windows):
        gm(wins[i:i + 1]); seen.append({t: m.seen for t, m in teachers.items()})
train_sites = [sites[int(i)] for i in a.layers.split(",")]
layers = {s.target: gm.get_submodule(s.target) for s in train_sites}
for p in gm.parameters(): p.requires_grad_(False)
params = [p for m in layers.values() for p in m.parameters()]
for p in params: p.requires_grad_(True)
opt = torch.optim.Adam(params, lr=a.lr)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / (a.steps + 1)))
t0 = time.time()
with _window_dropout(layers.values(), 0.1):
    for step in range(a.steps):
        sv = seen[step % a.windows]
        opt.zero_grad()
        ls = []
        for tgt, m in layers.items():
            q, k, v, x, out = sv[tgt]
            loss = a.mse * relative_error(m(q, k, v, x), out)
            if a.memory_loss:
                kl = memory_kl(m, q, k, x); loss = loss + a.memory_loss * kl; ls.append(float(kl))
            if a.attn_loss:
                kl = attention_kl(m, q, k, x); loss = loss + a.attn_loss * kl; ls.append(float(kl))
            loss.backward(); ls.append(float(loss))
        opt.step(); sched.step()
        if step % 20 == 0 or step == a.steps - 1:
            print(step, [round(l, 3) for l in ls], f"{time.time()-t0:.0f}s", flush=True)
for m in layers.values(): m.eval()
for tgt, m in layers.items():
    print(tgt, "tau", torch.exp(m.log_tau).detach().numpy().round(2), "b", m.router_bias.detach().numpy().round(2))
if a.save:
    from memc.passes.attention.memory_caching import save_layer_weights
    Path(a.save).mkdir(parents=True, exist_ok=True)
    save_layer_weights(Path(a.save) / "layers.safetensors", gm, sites, layer)
filler = load_text("heldout:code")
dist = [int(d) for d in a.dist.split(",")]
with torch.no_grad():
    b = _Chunked(backend, 4); codec = text_codec(b.info)
    pts = recall_probe(b, filler, dist, 1024, a.trials, 0, codec.encode)
    print("(c)", [(p.distance, round(p.token_accuracy, 2)) for p in pts], f"{time.time()-t0:.0f}s", flush=True)

"""Why memory-caching layer 1 of the recall model does or does not recall: at each answer position of the probe
(teacher-fed: the original q, k, v), for copy heads 0-2: does the sparse router keep the segment holding the
source token (hit), what share of the in-segment feature-map weight phi_q . phi_k falls on the source (phi_share),
and what share of the attention mass goes to the memory rather than the window (mem_share).

    python benchmarks/memory_caching_internals.py models/ref-llama-recall models/ref-llama-recall-mc/sparse 8

8 probe trials (seed 0, held-out code filler) at distances 256 and 640. A diagnostic, not a benchmark table.
"""
import sys, json, numpy as np, torch
from pathlib import Path
from memc.eval.recall import _trial
from memc.eval.text import load_text
from memc.reference import tokenizer
from memc.passes.attention.distill import teacher_mode
from memc.passes.attention.memory_caching import MC_SITES_KEY
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.memory_caching import _program
torch.set_num_threads(1)
model, wdir = sys.argv[1], Path(sys.argv[2]); n = int(sys.argv[3]) if len(sys.argv) > 3 else 8
layer = json.loads((wdir / "metrics.json").read_text())["layer"]
prog = _program(model, layer, wdir / "layers.safetensors")
gm = prog.module; sites = prog.annotations[MC_SITES_KEY]
tok = tokenizer.load_tokenizer(model); enc = lambda b: tokenizer.encode(b, tok)
filler = enc(load_text("heldout:code")[:400000])
site = sites[1]; mod = gm.get_submodule(site.target)
c, w = mod.cfg.segment, mod.cfg.window
stats = {"hit": [], "phi_share": [], "mem_share": []}
for d in (256, 640):
    rng = np.random.default_rng([0, d, 0])
    trials = [_trial(filler, rng, d, 1024, False, enc) for _ in range(n)]
    ids = torch.from_numpy(np.stack([t.ids for t in trials]))
    with teacher_mode(gm, sites) as teachers, torch.no_grad():
        gm(ids)
    q, k, v, x, out = teachers[site.target].seen
    with torch.no_grad():
        from memc.nn.mc_parallel import grouped_matmul
        T = q.shape[2]
        # replicate parallel_forward to get r after selection and weights
        captured = {}
        orig = mod.read_weights
        def rw(r, den, m):
            captured["r"], captured["den"], captured["m"] = r, den, m
            return orig(r, den, m)
        mod.read_weights = rw
        y = mod(q, k, v, x)
        mod.read_weights = orig
        s = grouped_matmul(q, k.transpose(-1, -2)) * mod.scale
        phq, phk = mod.phi_q(q), mod.phi_k(k)
        pm = grouped_matmul(phq, phk.transpose(-1, -2))
    r, den, m = captured["r"], captured["den"], captured["m"]
    for i, t in enumerate(trials):
        vt = t.value_tokens; seq = t.ids[t.first:t.first+vt]
        src0 = [s_ for s_ in range(t.first - vt) if (t.ids[s_:s_+vt] == seq).all()][0]
        for j in range(vt):
            p = t.first - 1 + j; src = src0 + j
            for h in range(3):
                seg = src // c
                rr = r[i, h, p]
                stats["hit"].append(bool(torch.isfinite(rr[seg])))
                lo = seg * c
                row = pm[i, h, p, lo:lo + c]
                stats["phi_share"].append(float(row[src - lo] / row.sum()))
                e_win = torch.exp(s[i, h, p, p - w + 1:p + 1] - m[i, h, p]).sum()
                mass = torch.exp(rr - m[i, h, p]).sum()
                stats["mem_share"].append(float(mass / (mass + e_win)))
print({k_: round(float(np.mean(v_)), 3) for k_, v_ in stats.items()}, "n", len(stats["hit"]))
print("phi share quantiles", np.quantile(stats["phi_share"], [0.1, 0.5, 0.9]).round(3))

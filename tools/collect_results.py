"""Copy the notebooks' latest run outputs into results/ and rewrite README's results section from them.

    python tools/collect_results.py            # after `make reproduce CONFIG=full` and the two searches
Every number in the README's results block comes from these files; a missing run leaves its table out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from tcl.compress.table import LookupTable
from tcl.utils import write_json, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RUNS, RESULTS = ROOT / "runs", ROOT / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
COPIES = {"00_reference_model/metrics.json": "reference_metrics.json", "01_baselines/results.json": "baselines.json",
          "02_rate_search/comparison.json": "search_comparison.json", "02_rate_search/table.json": "search_table.json",
          "search_full/table.json": "search_random_table.json",
          "search_evolve/table.json": "search_evolve_table.json",
          "search_targeted/table.json": "search_targeted_table.json",
          "search_targeted60/table.json": "search_targeted60_table.json",
          "search_diffrate/table.json": "search_diffrate_table.json",
          **{f"03_ablations/{n}.json": f"ablations_{n}.json"
             for n in ("design", "monotone", "subset", "candidates", "evolve_vs_random", "selection")},
          **{f"04_head_modules/{n}.json": f"heads_{n}.json" for n in ("modules", "scorers", "composition")},
          "05_joint_latency/picks.json": "joint_picks.json", "05_joint_latency/latency.json": "latency_model.json",
          "05_joint_latency/latency_vs_macs.json": "latency_vs_macs.json",
          "05_joint_latency/latency_vs_macs_measured.json": "latency_vs_macs_measured.json"}


def load(name: str) -> Any:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def load_table(path: Path) -> LookupTable | None:
    return LookupTable.load(path) if path.exists() else None


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def search_runs() -> dict[str, Any]:
    out = {}
    old = load("search_runs.json") or {}  # runs whose folders are gone (a fresh checkout) keep their recorded cost
    for name in ("search_full", "search_evolve", "search_targeted", "search_targeted60", "search_diffrate"):
        inv = RUNS / name / "invocations.jsonl"
        if inv.exists():
            rows = [json.loads(x) for x in inv.read_text().splitlines() if x.strip()]
            table = LookupTable.load(RUNS / name / "table.json")
            out[name] = {"invocations": rows, "wall_s": sum(r["wall_s"] for r in rows),
                         "evaluated": sum(r["evaluated"] for r in rows), "entries": len(table.entries),
                         **{k: v for k, v in table.search.items() if k.startswith("evaluations")}}
        elif name in old:
            out[name] = old[name]
    return out


def per_search_picks() -> pd.DataFrame | None:
    tables = {"random 10k": "search_random_table.json", "evolve 3k": "search_evolve_table.json",
              "targeted evolve 4.5k": "search_targeted_table.json", "targeted 60 % 3.5k": "search_targeted60_table.json",
              "combined (shipped)": "search_table.json"}
    loaded = {k: load_table(RESULTS / v) for k, v in tables.items()}
    if not any(loaded.values()):
        return None
    full = next(t for t in loaded.values() if t).full_macs
    rows = []
    for b in (0.5, 0.6, 0.7, 0.8):
        row: dict[str, str] = {"budget": f"{b:.0%}"}
        for name, t in loaded.items():
            targets = t.search.get("targets") if t else None
            fit = [e for e in (t.entries if t else []) if e["macs"] <= b * full and (not targets or b in targets)]
            e = min(fit, key=lambda e: e["scores"]["kl"]) if fit else None
            row[name] = "-" if e is None else (f"{e['scores']['kl']:.4f} / {pct(e['scores']['acc'])} @ "
                                               f"{100 * e['macs'] / full:.1f} %")
        rows.append(row)
    return pd.DataFrame(rows)


def sections() -> list[str]:
    out = []
    ref = load("reference_metrics.json")
    if ref:
        out.append(f"**Reference model** (`notebooks/00_reference_model`): test accuracy **{pct(ref['test_accuracy'])} %** "
                   f"on {ref['test_images']:,} images, {ref['macs'] / 1e6:.2f} MMACs/image (FlopCounterMode: "
                   f"{ref['flop_counter_macs'] / 1e6:.2f}), {ref['params'] / 1e6:.2f} M parameters, "
                   f"{ref['throughput_img_per_s']:.0f} img/s at batch {ref['throughput_batch_size']} "
                   f"({ref['throughput_threads']} threads).")
    cmp_ = load("search_comparison.json")
    if cmp_:
        df = pd.DataFrame(cmp_)
        base = df[df.method == "uncompressed"].iloc[0]
        df = df[df.method != "uncompressed"].copy()
        df[["family", "budget"]] = df.method.str.split("@", expand=True)
        rows = []
        fams = [k for k in ("searched", "ToMe", "EViT", "DiffRate op", "DiffRate op, searched") if k in set(df.family)]
        for b, g in df.groupby("budget", sort=False):
            f = g.set_index("family")
            row = {"budget": b, "MACs (searched)": f"{100 * f.loc['searched', 'fraction']:.1f} %"}
            for fam in fams:
                row[f"{fam} acc (%)"] = f"{pct(f.loc[fam, 'accuracy'])} @ {100 * f.loc[fam, 'fraction']:.1f} %"
            best = max(f.loc[k, "accuracy"] for k in fams if k != "searched")
            row["searched - best baseline (pt)"] = f"{100 * (f.loc['searched', 'accuracy'] - best):+.2f}"
            row["speedup " + " / ".join(fams)] = " / ".join(f"{f.loc[k, 'speedup']:.2f}x" for k in fams)
            rows.append(row)
        out.append(f"**Searched schedules vs exact ToMe, exact EViT and DiffRate's op at matched MACs** "
                   f"(`notebooks/02_rate_search`, CONFIG=full; test set, uncompressed {pct(base.accuracy)} %; each "
                   f"baseline fitted to the MACs of the schedule `table.select(budget)` returned, every schedule applied "
                   f"as `tcl.patch(model, schedule)` with the op it carries; 'DiffRate op' = DiffRate's inference op on "
                   f"hand-set constant prune/merge rates, 'DiffRate op, searched' = the same op on rates from a 3,000-"
                   f"candidate tcl search scored with it; speedup = wall-clock img/s vs uncompressed, batch "
                   f"{int(base.batch_size)}, {int(base.threads)} threads, timed round-robin in one run):\n\n"
                   + md(pd.DataFrame(rows)))
    runs = search_runs()
    if runs:
        write_json(RESULTS / "search_runs.json", runs)
        lines = []
        for name, r in runs.items():
            inv = r["invocations"][-1]
            lines.append(f"- `{name}`: {r['evaluations_subset']:,} candidates + {r.get('evaluations_anchor', 0)} anchors on the "
                         f"subset, {r['evaluations_full']} on the whole held-out split, {r['entries']} table entries; "
                         f"wall time {r['wall_s'] / 60:.1f} min ({inv['world']} process(es) x {inv['threads']} thread(s))")
        out.append("**Search cost** (2 CPU cores):\n\n" + "\n".join(lines))
    picks = per_search_picks()
    if picks is not None:
        out.append("**Each search's pick per budget** (held-out split; the entry `select(budget)` returns from that "
                   "search's table alone, whole-split KL to the uncompressed model / accuracy @ MACs):\n\n" + md(picks))
    evo = load("ablations_evolve_vs_random.json")
    if evo:
        m = pd.DataFrame(evo["evaluations_to_match"])
        m = pd.DataFrame({"budget": m.budget.map("{:.0%}".format),
                          "random: evaluations / held-out acc (%)": [f"{e:,} / {pct(a)}" for e, a in zip(m.reference_evaluations, m.reference_acc)],
                          "evolve: evaluations to match": m.evaluations_to_match.map(lambda v: "not matched" if v is None or v != v else f"{int(v):,}"),
                          "evolve best held-out acc (%)": m.best_acc.map(pct)})
        out.append("**Evolutionary vs random search** (`notebooks/03_ablations` section 5):\n\n" + md(m))
    sel = load("ablations_selection.json")
    if sel:
        d = pd.DataFrame(sel)
        d["cell"] = [f"{pct(u)} ({100 * o:+.2f})" for u, o in zip(d.unseen_half_acc, d.optimism)]
        p = d.assign(budget=d.budget.map("{:.0%}".format)).pivot_table(
            index="select_by", columns="budget", values="cell", aggfunc="first").reset_index()
        out.append(f"**Which whole-split score should pick the table entry** (`notebooks/03_ablations` section 6; "
                   f"held-out split only: the pick among {int(d.finalists.min())}-{int(d.finalists.max())} logged "
                   "finalists made on a random half, accuracy % on the other half (optimism: picked-half minus "
                   "other-half accuracy, pt), mean of many random halves):\n\n" + md(p))
    design = load("ablations_design.json")
    if design:
        d = pd.DataFrame(design)
        full = d[d.variant == "uncompressed"].accuracy_pct.iloc[0]
        p = d[d.variant != "uncompressed"].pivot_table(index="variant", columns="budget", values="accuracy_pct")
        p = p.round(2).reset_index()
        out.append(f"**Design ablations** (hand-set rates at matched MACs, test acc %, uncompressed {full:.2f}, "
                   "`notebooks/03_ablations`):\n\n" + md(p))
    mods = load("heads_modules.json")
    if mods:
        d = pd.DataFrame(mods)
        key = "calibrated_balanced_accuracy"
        rows = []
        for c, g in d.groupby("class", sort=False):
            g = g.set_index("method")
            r = g.loc["reset"]
            rows.append({"class": c, "heads kept": f"{r.heads_kept}/{r.heads_total}",
                         "module BA (%)": pct(r[f"module_{key}"]), "original BA (%)": pct(r[f"original_{key}"]),
                         "random-heads BA (%)": pct(g.loc["random", f"module_{key}"]),
                         "within 1 pt": "yes" if r[f"module_{key}"] >= r[f"original_{key}"] - 0.01 else "no",
                         **({"+ recovery: module / random-heads BA (%)":
                             f"{pct(g.loc['reset+recover', f'module_{key}'])} / "
                             f"{pct(g.loc['random+recover', f'module_{key}'])}",
                             "+ recovery within 1 pt": "yes" if g.loc["reset+recover", f"module_{key}"]
                             >= r[f"original_{key}"] - 0.01 else "no"} if "reset+recover" in g.index else {}),
                         "module F1 / original F1": f"{r.module_f1:.3f} / {r.original_f1:.3f}",
                         "params (M)": f"{r.params / 1e6:.2f}", "MMACs": f"{r.macs / 1e6:.1f}",
                         "latency speedup": f"{r.latency_speedup:.2f}x" if "latency_speedup" in r else "",
                         "decomposition (s)": f"{r.seconds:.0f}"})
        out.append("**Class modules** (`notebooks/04_head_modules`, CONFIG=full; random heads get the same gate "
                   "training; c-vs-rest balanced accuracy on the test set at thresholds calibrated on the held-out split; the original model mapped to c-vs-rest on the "
                   "same images; '+ recovery': the same modules after opt-in distillation of their remaining weights "
                   "from the original model on the training split, `modules.recover`):\n\n" + md(pd.DataFrame(rows)))
    comp = load("heads_composition.json")
    if comp:
        d = pd.DataFrame([{"classes": " + ".join(c["classes"]), "composed (%)": pct(c["composed"]),
                           **({"composed, recovered modules (%)": pct(c["composed_recovered"])}
                              if "composed_recovered" in c else {}),
                           "union of heads (%)": pct(c["union_of_heads"]), "union heads kept": c["union_heads_kept"],
                           "original restricted to S (%)": pct(c["original_restricted"])} for c in comp])
        out.append("**Composed classifiers** (|S|-way test accuracy):\n\n" + md(d))
    out += joint_sections()
    base = load("baselines.json")
    if base:
        d = pd.DataFrame(base)
        d = d[d.method != "uncompressed"].copy()
        d[["family", "budget"]] = d.method.str.split("@", expand=True)
        d["cell"] = [f"{pct(a)} ({s:.2f}x)" for a, s in zip(d.accuracy, d.speedup)]
        p = d.pivot_table(index="family", columns="budget", values="cell", aggfunc="first").reset_index()
        out.append("**Baselines at matched MACs** (`notebooks/01_baselines`, CONFIG=full; test acc % (wall-clock "
                   "speedup)):\n\n" + md(p))
    return out


def joint_sections() -> list[str]:
    """Notebook 05: tokens / heads / joint picks per MACs budget; the latency model; latency vs MACs budget."""
    out = []
    picks = load("joint_picks.json")
    if picks:
        d = pd.DataFrame(picks["picks"])
        d["cell"] = [f"{pct(a)} @ {100 * f:.1f} %" for a, f in zip(d.test_acc, d.fraction)]
        p = d.pivot_table(index="budget", columns="mode", values="cell", aggfunc="first").reindex(
            columns=[m for m in ("tokens", "heads", "joint") if m in set(d["mode"])]).fillna("not reachable")
        p.insert(0, "budget", [f"{100 * b:.0f}%" for b in p.index])
        best = d.pivot_table(index="budget", columns="mode", values="test_acc", aggfunc="first")
        if "joint" in best:
            others = best.drop(columns="joint").max(axis=1)
            p["joint - best other (pt)"] = [f"{100 * (j - o):+.2f}" for j, o in zip(best["joint"], others)]
        ev = picks.get("evaluations", {})
        out.append(f"**Joint token + head compression** (`notebooks/05_joint_latency`, CONFIG=full; one random search "
                   f"per space, {', '.join(f'{m} {n:,}' for m, n in ev.items())} subset evaluations; heads ranked by "
                   "all-classes Fisher importance on the held-out split and removed physically; test acc % @ MACs "
                   f"fraction; uncompressed {pct(picks['uncompressed_test_acc'])} %):\n\n" + md(p.reset_index(drop=True)))
    lat, cmp = load("latency_model.json"), load("latency_vs_macs.json")
    if lat:
        e, c = lat["error"], lat["context"]
        out.append(f"**Latency model** ({c['device']} {c['device_name']}, {c['threads']} thread(s), {c['dtype']}, batch "
                   f"{c['batch_size']}; fit on {len(e['measurements']) - e['held_out']} random schedules): median "
                   f"relative error on {e['held_out']} held-out schedules **{100 * e['median_rel']:.1f} %** (max "
                   f"{100 * e['max_rel']:.1f} %; on the fit set {100 * e['fit_median_rel']:.1f} %); load average while "
                   f"measuring {' / '.join(e.get('loadavg', []))}.")
    if cmp:
        d = pd.DataFrame([{"pick": r["pick"], "MACs": f"{100 * r['macs_fraction']:.1f} %",
                           "predicted ms/img": f"{r['predicted_ms']:.3f}", "measured ms/img": f"{r['measured_ms']:.3f}",
                           "speedup": f"{r['speedup']:.2f}x", "test acc (%)": pct(r["test_acc"])} for r in cmp["rows"]])
        out.append(f"**Latency budget vs MACs budget** (target {cmp['target_ms']:.3f} ms/img = {100 * cmp['latency_target']:.0f} % of the uncompressed "
                   f"model's predicted latency; the MACs budget {100 * cmp['macs_budget']:.0f} % is the one whose pick "
                   "is predicted nearest it; both from the joint search, timed side by side):\n\n" + md(d))
    eq = load("latency_vs_macs_measured.json")
    if eq:
        d = pd.DataFrame([{"pick": r["pick"], "MACs": f"{100 * r['macs_fraction']:.1f} %",
                           "measured ms/img": f"{r['measured_ms']:.3f}", "test acc (%)": pct(r["test_acc"])}
                          for r in eq["rows"]])
        m = eq.get("match")
        note = (f"the most accurate MACs pick measured no slower than the latency pick: {m['pick']} "
                f"({pct(m['test_acc'])} %)" if m else "no MACs pick was measured as fast as the latency pick")
        same = [(r, c) for r in eq["rows"] for c in (cmp or {}).get("rows", [])
                if r["pick"] != "latency budget" and c["pick"] == "MACs budget" and r["macs_fraction"] == c["macs_fraction"]]
        if same:  # one schedule timed in both runs: how far single round-robin timings move between runs
            r, c = same[0]
            note += (f"; the MACs-budget pick above measured {c['measured_ms']:.3f} ms there and {r['measured_ms']:.3f} "
                     "ms here, so timings of one run are comparable only within that run")
        out.append("**At equal measured latency** (MACs-budget picks around that budget, timed round-robin with the "
                   f"latency pick; {note}):\n\n" + md(d))
    return out


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    for src, dst in COPIES.items():
        if (RUNS / src).exists():
            write_text_atomic(RESULTS / dst, (RUNS / src).read_text())
    block = "\n\n".join(sections())
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md needs the markers {START} and {END} around its results section")
    head, rest = text.split(START, 1)
    write_text_atomic(readme, head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1])
    print(block)


if __name__ == "__main__":
    main()

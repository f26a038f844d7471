"""Rate search and lookup table: sampling, determinism, resume, torchrun sharding, table validation, scorer cache."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from timm.models.vision_transformer import VisionTransformer

from tcl import models, reference, search
from tcl.compress.schedule import Schedule, macs, vit_dims
from tcl.search import SearchConfig, SearchError
from tcl.compress.table import BudgetError, LookupTable, TableError

tcl_patch = importlib.import_module("tcl.compress.patch")
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=3, num_heads=2)


def tiny(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY, **kw}).eval()


class Synthetic:
    """A cheap deterministic scorer: removing tokens early costs more than late; n adds a small offset."""

    def __init__(self, model: torch.nn.Module, size: int = 100, fail_after: int | None = None):
        self.d, self.size, self.info, self.calls, self.fail_after = vit_dims(model), size, {"name": "synthetic"}, 0, fail_after

    def __call__(self, s: Schedule, n: int) -> dict[str, float]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        r = search.rates_of(self.d, s)
        kl = sum((len(r) - k) * x * x for k, x in enumerate(r)) / 10 + ((sum(s.merge) * 7919) % 13) / 1000 / n
        return {"kl": kl, "agree": 1 - kl, "acc": 0.9 - kl / 2}


CFG = SearchConfig(candidates=120, topk=2, subset=16)


# ---------------------------------------------------------------- search space
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10**6), lo=st.floats(0.05, 0.9),
       max_merge=st.sampled_from([0.5, 1.0]), depth=st.sampled_from([2, 3, 8]))
def test_sampled_schedules_are_valid(seed, index, lo, max_merge, depth):
    m = tiny(depth=depth, class_token=depth != 2, global_pool="token" if depth != 2 else "avg")
    d = vit_dims(m)
    s = search.sample_schedule(d, seed, index, min_fraction=lo, max_fraction=1.0, max_merge=max_merge)
    s.check(d)
    assert search.space._macs(d, s.merge) == macs(m, s)
    assert all(a >= b for a, b in zip((d.tokens, *s.merge), s.prune)) and all(p >= q for p, q in zip(s.prune, s.merge))
    assert s == search.sample_schedule(d, seed, index, min_fraction=lo, max_merge=max_merge)  # deterministic
    tcl_patch.patch(m, s, merge="bipartite" if max_merge == 0.5 else "attention")  # the patch accepts every merge
    tcl_patch.unpatch(m)
    rng = __import__("numpy").random.default_rng(seed)
    child = search.mutate_schedule(d, s, rng, macs(d, s), max_merge=max_merge)
    child.check(d)


def test_fit_rates_hits_target_and_sampling_covers_the_range():
    d = vit_dims(reference.build_reference())
    full = macs(d)
    s = search.fit_rates(d, [0.1 * k for k in range(16)], 0.6 * full)
    assert abs(macs(d, s) / full - 0.6) < 0.01
    fracs = [macs(d, search.sample_schedule(d, 0, i)) / full for i in range(300)]
    assert min(fracs) < 0.3 and max(fracs) > 0.95 and sum(f < 0.6 for f in fracs) > 80


# ---------------------------------------------------------------- search
def test_search_is_deterministic_and_table_selects(tmp_path):
    m = tiny()
    a = search.search(m, Synthetic(m), CFG, tmp_path / "a", progress=False)
    b = search.search(m, Synthetic(m), CFG, tmp_path / "b", progress=False)
    assert a.to_dict() == b.to_dict() == LookupTable.load(tmp_path / "a" / "table.json", m).to_dict()
    other = search.search(m, Synthetic(m), SearchConfig(**{**CFG.__dict__, "seed": 1}), progress=False)
    assert other.to_dict() != a.to_dict()
    s = a.select(0.6)
    assert macs(m, s) <= 0.6 * macs(m) and s.meta["scores"] == a.entry(fraction=0.6)["scores"]
    best = max((e for e in a.entries if e["macs"] <= 0.6 * macs(m)), key=lambda e: e["scores"]["acc"])
    assert (list(s.prune), list(s.merge)) == (best["schedule"]["prune"], best["schedule"]["merge"])
    assert a.select(gmacs=macs(m) / 1e9) == Schedule.full(m) and a.select(1.0) == Schedule.full(m)
    assert {"macs", "fraction", "acc", "prune", "merge"} <= a.rows()[0].keys()


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    m = tiny()
    ref = search.search(m, Synthetic(m), CFG, tmp_path / "ref", progress=False)
    with pytest.raises(KeyboardInterrupt):
        search.search(m, Synthetic(m, fail_after=50), CFG, tmp_path / "run", progress=False)
    log = tmp_path / "run" / "log.0.jsonl"
    with open(log, "a") as f:  # a kill mid-write leaves half a line
        f.write('{"stage": "subset", "id": 999, "n": 16, "sche')
    scorer = Synthetic(m)
    resumed = search.search(m, scorer, CFG, tmp_path / "run", progress=False)
    assert resumed.to_dict() == ref.to_dict()
    missing = CFG.candidates + resumed.search["evaluations_anchor"] - 50 + resumed.search["evaluations_full"]
    assert scorer.calls == missing  # only what was missing
    lines = log.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len({(json.loads(x)["stage"], json.loads(x)["id"]) for x in lines}) == len(lines)


def test_evolve_is_deterministic_resumable_and_extends_random(tmp_path):
    m = tiny()
    cfg = SearchConfig(method="evolve", candidates=150, init=60, round_size=30, topk=2, subset=16)
    a = search.search(m, Synthetic(m), cfg, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        search.search(m, Synthetic(m, fail_after=100), cfg, tmp_path / "b", progress=False)
    assert search.search(m, Synthetic(m), cfg, tmp_path / "b", progress=False).to_dict() == a.to_dict()
    search.search(m, Synthetic(m), SearchConfig(candidates=60, topk=2, subset=16), tmp_path / "r", progress=False)
    evolved, rnd = search.read_log(tmp_path / "a"), search.read_log(tmp_path / "r")
    assert all(evolved[("subset", i)]["schedule"] == rnd[("subset", i)]["schedule"] for i in range(60))
    assert max(i for st_, i in evolved if st_ == "subset") == 149


def test_targeted_evolve_spends_rounds_and_finalists_on_the_budget_windows(tmp_path):
    m = tiny(depth=4, img_size=32)
    cfg = SearchConfig(method="evolve", candidates=300, init=100, round_size=50, topk=3, subset=16, bin_width=0.05,
                       targets=[0.8, 0.6])
    assert cfg.targets == [0.6, 0.8]
    table = search.search(m, Synthetic(m), cfg, tmp_path, progress=False)
    full, log = macs(m), search.read_log(tmp_path)

    def inside(r):
        return any(b - 0.05 <= r["macs"] / full < b for b in cfg.targets)

    kids = [r for (st_, i), r in log.items() if st_ == "subset" and i >= cfg.init]
    first = [r for (st_, i), r in log.items() if st_ == "subset" and i < cfg.init]
    assert sum(map(inside, kids)) / len(kids) > 0.5 > 2 * sum(map(inside, first)) / len(first)
    finals = [r for (st_, i), r in log.items() if st_ == "full" and i != -1]
    assert finals and all(map(inside, finals)) and len(finals) <= 2 * cfg.topk
    assert {round(e["macs"] / full, 6) for e in table.entries} <= {round(r["macs"] / full, 6) for r in finals} | {1.0}
    for bad in (dict(targets=[0.6]), dict(method="evolve", targets=[0.2]), dict(method="evolve", targets=[])):
        with pytest.raises(SearchError, match="targets"):
            SearchConfig(**bad)


def test_resume_with_other_settings_is_refused(tmp_path):
    m = tiny()
    search.search(m, Synthetic(m), CFG, tmp_path, progress=False)
    with pytest.raises(SearchError, match="seed = 0, not 3; resume with the same settings or pass a new out dir"):
        search.search(m, Synthetic(m), SearchConfig(**{**CFG.__dict__, "seed": 3}), tmp_path, progress=False)
    bigger = search.search(m, Synthetic(m), SearchConfig(**{**CFG.__dict__, "candidates": 150}), tmp_path, progress=False)
    assert bigger.search["evaluations_subset"] == 150  # growing the candidate budget resumes


def test_budget_curve_reports_scores_per_budget(tmp_path):
    m = tiny()
    search.search(m, Synthetic(m), CFG, tmp_path, progress=False)
    rows = search.budget_curve(m, Synthetic(m), tmp_path, budgets=(0.6, 0.8), evaluations=(60, 120), window=10,
                               progress=False)
    assert [(r["evaluations"], r["budget"]) for r in rows] == [(60, 0.6), (60, 0.8), (120, 0.6), (120, 0.8)]
    assert all(r["fraction"] <= r["budget"] for r in rows)


def test_replaying_a_search_made_for_another_model_is_refused(tmp_path):
    m, deeper = tiny(), tiny(depth=4)
    x, y = torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,))
    search.search(m, search.ReferenceScorer(m, (x, y)), SearchConfig(candidates=20, subset=16), tmp_path, progress=False)
    with pytest.raises(SearchError, match="made for VisionTransformer with dims .*'depth': 3.*replay a search made for"):
        search.budget_curve(deeper, Synthetic(deeper), tmp_path, budgets=(0.8,), evaluations=(20,), progress=False)
    with pytest.raises(SearchError, match="'depth': 3"):
        search.selection_check(search.ReferenceScorer(deeper, (x, y)), tmp_path, budgets=(0.8,), splits=1, progress=False)
    with pytest.warns(UserWarning, match="weights differ"):
        search.budget_curve(tiny(seed=1), Synthetic(m), tmp_path, budgets=(0.8,), evaluations=(20,), window=20,
                            progress=False)


# ---------------------------------------------------------------- table
def test_table_errors_name_the_fix(tmp_path):
    m = tiny()
    t = search.search(m, Synthetic(m), CFG, tmp_path, progress=False)
    cheapest = t.entries[0]["macs"] / macs(m)
    with pytest.raises(BudgetError, match=f"cheapest available is .* fraction {cheapest:.3f}"):
        t.select(cheapest * 0.9)
    with pytest.raises(BudgetError, match="exactly one budget"):
        t.select(0.5, gmacs=1.0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "tcl.lookup_table", "version": 1, "entr')
    with pytest.raises(TableError, match="not valid JSON"):
        LookupTable.load(bad)
    bad.write_text(json.dumps({**t.to_dict(), "version": 99}))
    with pytest.raises(TableError, match="version 99 is not supported"):
        LookupTable.load(bad)
    bad.write_text(json.dumps({**t.to_dict(), "entries": [{"macs": 1, "scores": {"acc": 1}, "schedule": {"prune": [3]}}]}))
    with pytest.raises(TableError, match="malformed schedule"):
        LookupTable.load(bad)
    with pytest.raises(TableError, match="searched for .* but the model has dims"):
        LookupTable.load(tmp_path / "table.json", tiny(depth=4))
    with pytest.warns(UserWarning, match="weights differ"):
        LookupTable.load(tmp_path / "table.json", tiny(seed=1))
    with pytest.raises(FileNotFoundError, match="python -m tcl.search"):
        LookupTable.load(tmp_path / "missing.json")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_combined_table_keeps_the_best_entry_per_bin(tmp_path):
    m = tiny()
    a = search.search(m, Synthetic(m), CFG, tmp_path / "a", progress=False)
    b = search.search(m, Synthetic(m), dataclasses.replace(CFG, seed=1), tmp_path / "b", progress=False)
    c = LookupTable.combine([a, b])
    bins = {}
    for k, t in enumerate((a, b)):
        for e in t.entries:
            bins.setdefault(int(e["macs"] / macs(m) / CFG.bin_width + 1e-9), []).append((e["scores"]["kl"], k))
    assert len(c.entries) == len(bins)
    assert sorted(e["scores"]["kl"] for e in c.entries) == sorted(min(v)[0] for v in bins.values())
    assert {e["source"] for e in c.entries} == {0, 1} and c.select(0.9).meta["scores"]["kl"] == min(
        e["scores"]["kl"] for e in c.entries if e["macs"] <= 0.9 * macs(m))
    with pytest.raises(TableError, match="cannot combine tables whose score differs"):
        LookupTable.combine([a, dataclasses.replace(b, score="acc")])


# ---------------------------------------------------------------- real scorer, CLI, torchrun
def test_reference_scorer_cache_is_exact():
    m = tiny()
    x, y = torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,))
    cached, plain = search.ReferenceScorer(m, (x, y), cache_images=32), search.ReferenceScorer(m, (x, y), cache_images=0)
    assert cached.cache and not plain.cache
    assert cached(Schedule.full(m), 40) == {"kl": 0.0, "agree": 1.0, "acc": cached.reference_scores["acc"]}
    for s in (Schedule([17, 9, 5], [17, 5, 5]), Schedule([17, 12, 8], [17, 10, 4])):  # first reduction in block 1
        c, p = cached(s, 32), plain(s, 32)
        assert c["agree"] == p["agree"] and c["kl"] == pytest.approx(p["kl"], abs=1e-6) and c["kl"] > 0
    tcl_patch.patch(m, Schedule([17, 9, 5], [17, 5, 5]))
    with pytest.raises(SearchError, match="call tcl.unpatch"):
        search.ReferenceScorer(m, (x, y))


def test_selection_check_picks_on_one_half_and_scores_the_other(tmp_path):
    m = tiny()
    x, y = torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,))
    scorer = search.ReferenceScorer(m, (x, y))
    search.search(m, scorer, SearchConfig(candidates=40, topk=2, subset=16), tmp_path, progress=False)
    rows = search.selection_check(scorer, tmp_path, budgets=(0.6, 0.9), window=40, splits=1, progress=False)
    assert [(r["budget"], r["select_by"]) for r in rows] == [(b, s) for b in (0.6, 0.9) for s in ("acc", "kl", "agree")]
    fin = sorted((r for (st, i), r in search.read_log(tmp_path).items() if st == "full" and i != -1
                  and r["macs"] <= 0.6 * macs(m)), key=lambda r: r["id"])
    half = torch.randperm(40, generator=torch.Generator().manual_seed(0)) < 20
    per = [scorer.per_image(Schedule.from_dict(r["schedule"])) for r in fin]
    best = max(per, key=lambda p: float(p["acc"][half].mean()))  # the first of the best on the picking half
    assert rows[0]["finalists"] == len(fin) and rows[0]["picked_half_acc"] == pytest.approx(float(best["acc"][half].mean()))
    assert rows[0]["unseen_half_acc"] == pytest.approx(float(best["acc"][~half].mean()))
    with pytest.raises(SearchError, match="holds no search"):
        search.selection_check(scorer, tmp_path / "none")


def test_bfloat16_subset_stage_leaves_the_whole_split_in_float32(tmp_path):
    m = tiny()
    x, y = torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,))
    scorer = search.ReferenceScorer(m, (x, y))
    search.search(m, scorer, SearchConfig(candidates=20, topk=1, subset=16, subset_dtype="bfloat16"), tmp_path,
                  progress=False)
    diffs = []
    for (st, i), r in search.read_log(tmp_path).items():
        exact = scorer(Schedule.from_dict(r["schedule"]), r["n"])
        if st == "full":
            assert r["scores"] == exact
        elif i >= 0:
            diffs.append(abs(r["scores"]["kl"] - exact["kl"]))
    assert max(diffs) > 0  # the subset stage ran in bfloat16
    with pytest.raises(SearchError, match="subset_dtype must be"):
        SearchConfig(subset_dtype="float16")


def _tiny_cli(tmp_path: Path, out: str, candidates: int) -> list[str]:
    """CLI args for a tiny random ViT on sklearn digits (weights and YAML config written to tmp_path)."""
    if not (tmp_path / "tiny.safetensors").exists():
        models.save_weights(tiny(), tmp_path / "tiny.safetensors")
    cfg = tmp_path / f"search_{candidates}.yaml"
    cfg.write_text(f"model: vit_tiny_patch16_224\ncheckpoint: {tmp_path / 'tiny.safetensors'}\n"
                   f"model_kwargs: {json.dumps(TINY)}\ndata: digits\nlimit: 48\nsubset: 16\ncandidates: {candidates}\n"
                   "topk: 1\nthreads: 1\n")
    return ["--config", str(cfg), "--out", str(tmp_path / out), "--quiet"]


def _main(argv: list[str]) -> LookupTable:
    threads = torch.get_num_threads()
    try:
        return search.main(argv)
    finally:
        torch.set_num_threads(threads)


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_torchrun_two_processes_match_one(tmp_path):
    one = _main(_tiny_cli(tmp_path, "one", 30))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tcl.search",
           *_tiny_cli(tmp_path, "two", 30)]
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("log.*.jsonl")) == ["log.0.jsonl", "log.1.jsonl"]
    assert LookupTable.load(tmp_path / "two" / "table.json").to_dict() == one.to_dict()


def test_killed_cli_run_resumes_to_the_same_table(tmp_path):
    ref = _main(_tiny_cli(tmp_path, "ref", 300))
    proc = subprocess.Popen([sys.executable, "-m", "tcl.search", *_tiny_cli(tmp_path, "run", 300)], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, t0 = tmp_path / "run" / "log.0.jsonl", time.time()
    while (not log.exists() or log.read_bytes().count(b"\n") < 20) and time.time() - t0 < 300:  # slow runner: wait
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, "the search finished before it could be killed"
    done = log.read_bytes().count(b"\n")
    resumed = _main(_tiny_cli(tmp_path, "run", 300))
    assert resumed.to_dict() == ref.to_dict()
    evaluated = json.loads((tmp_path / "run" / "invocations.jsonl").read_text())["evaluated"]
    total = 300 + resumed.search["evaluations_anchor"] + resumed.search["evaluations_full"]
    assert 20 <= done < 300 and evaluated == total - done  # only what was missing


def test_anchors_are_the_baseline_families_and_can_win(tmp_path):
    d = vit_dims(reference.build_reference())
    full = macs(d)
    anchors = search.anchor_schedules(d)
    kinds = {s.meta["kind"] for s in anchors}
    assert kinds == {"anchor-tome", "anchor-evit"} and len({(s.prune, s.merge) for s in anchors}) == len(anchors)
    assert all(0.25 <= macs(d, s) / full <= 1.0 for s in anchors)
    assert Schedule.tome(reference.build_reference(), 4) in anchors and Schedule.evit(d, 0.7) in anchors
    m = tiny()
    table = search.search(m, Synthetic(m), CFG, tmp_path, progress=False)
    logged = search.read_log(tmp_path)
    assert table.search["evaluations_anchor"] == sum(st_ == "anchor" for st_, _ in logged) > 0
    assert all(i <= -2 for st_, i in logged if st_ == "anchor")
    off = search.search(m, Synthetic(m), SearchConfig(**{**CFG.__dict__, "anchors": False}), progress=False)
    assert off.search["evaluations_anchor"] == 0 and all(e["id"] >= -1 for e in off.entries)
    won = [e for e in table.entries if e["id"] <= -2]  # the synthetic score favours late, small rates
    assert won and all(e["kind"].startswith("anchor-") for e in won)


def test_evaluations_to_match():
    rows = [{"method": "random", "budget": 0.5, "evaluations": e, "acc": a} for e, a in ((100, 0.80), (1000, 0.85))]
    rows += [{"method": "evolve", "budget": 0.5, "evaluations": e, "acc": a} for e, a in ((100, 0.84), (300, 0.85), (500, 0.86))]
    rows += [{"method": "random", "budget": 0.7, "evaluations": 1000, "acc": 0.9},
             {"method": "evolve", "budget": 0.7, "evaluations": 500, "acc": 0.89}]
    got = search.evaluations_to_match(rows)
    assert [(g["budget"], g["evaluations_to_match"], g["best_acc"]) for g in got] == [(0.5, 300, 0.86), (0.7, None, 0.89)]
    with pytest.raises(SearchError, match="need budget_curve rows"):
        search.evaluations_to_match(rows[:2])


def test_nan_scores_rank_last_and_never_enter_a_table():
    """A schedule whose forward is not finite (NaN KL, e.g. DiffRate's similarity-scaled sizes going negative) is
    worse than any finite one in every ranking, and build_table leaves it out."""
    from tcl.compress.table import better, build_table, model_info, sort_key

    nan = float("nan")
    assert better("kl", 5.0, nan) and not better("kl", nan, 5.0) and better("acc", 0.1, nan)
    assert sorted([nan, 0.2, 0.1], key=lambda v: sort_key("kl", v))[:2] == [0.1, 0.2]
    model = models.reference()
    info = model_info(model)
    s = Schedule.full(model).to_dict()
    recs = [{"id": 0, "macs": info["macs"], "scores": {"kl": nan, "acc": 0.1, "agree": 0.1}, "schedule": s},
            {"id": 1, "macs": info["macs"], "scores": {"kl": 0.5, "acc": 0.9, "agree": 0.9}, "schedule": s}]
    table = build_table(recs, info, SearchConfig())
    assert [e["id"] for e in table.entries] == [1]


def test_tables_written_before_vitdims_gained_fields_still_check():
    """The shipped tables record dims without head_dim / gate: they load for the reference model and apply; a table
    whose recorded dims differ from the model's is refused."""
    from pathlib import Path

    from tcl.compress.table import LookupTable, TableError

    model = models.reference()
    root = Path(__file__).parent.parent / "results"
    for name in ("search_table.json", "search_random_table.json", "search_diffrate_table.json"):
        table = LookupTable.load(root / name, model)
        assert "head_dim" not in table.model["dims"] and table.select(0.6).settings is not None
    table.model["dims"] = {**table.model["dims"], "depth": 9}
    with pytest.raises(TableError, match="dims"):
        table.check(model)

"""Command line: `tcl search`, `tcl eval`, `tcl table` (also `python -m tcl.cli`; `python -m tcl.search` = `tcl search`).

Bad input (missing data, a class folder without images, an unreadable image, an input size the model cannot take, a
checkpoint that does not match, a table made for another model, a named model without weights) ends with one error
line on stderr and exit code 2; set TCL_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from . import data as tdata
from . import evaluate, models
from .models import CheckpointError
from .compress.schedule import Schedule, ScheduleError, at_macs, macs
from .compress.joint import head_importance
from .search.scorer import MAX_CACHE_BYTES, ReferenceScorer, SearchError, joint_scorer
from .search import SearchConfig, init_distributed, search
from .compress.settings import PatchSettings
from .compress.table import BudgetError, LookupTable, TableError
from .utils import default_device, write_json

T = TypeVar("T")


class UsageError(ValueError):
    """Raised for command-line input that names something that does not exist or does not fit."""


ERRORS = (UsageError, tdata.DataError, CheckpointError, TableError, BudgetError, SearchError, ScheduleError,
          FileNotFoundError)
MODEL_KEYS = {"model", "checkpoint", "pretrained", "random_init", "model_kwargs", "seed"}
DATA_KEYS = {"data", "limit", "heldout_size", "heldout_seed", "workers", "on_bad_image", "crop_pct", "interpolation",
             "mean", "std"}
RUN_KEYS = {"device", "amp", "threads", "batch_size", "quiet"}
SEARCH_KEYS = {"config", "out", "patch", "cache_images", "max_cache_bytes", "head_importance"}


# ---- options ---------------------------------------------------------------------------------------------------
def _model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", help="'reference' (the shipped Fashion-MNIST ViT, default) or a timm ViT name")
    g.add_argument("--checkpoint", help="local weights file (.safetensors, .pth, .bin, .npz)")
    g.add_argument("--pretrained", action="store_true", default=None, help="download timm's weights (needs internet)")
    g.add_argument("--random-init", action="store_true", default=None,
                   help="random weights, seeded by --seed (for tests and timing only)")
    g.add_argument("--model-kwargs", type=json.loads, help="JSON kwargs for timm.create_model, e.g. '{\"num_classes\": 100}'")


def _data_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("data")
    g.add_argument("--data", help="fashion_mnist (default), digits, or an image folder ROOT with ROOT/train/<class>/... "
                   "and ROOT/val/<class>/...")
    g.add_argument("--heldout-size", type=int, help="images in the search split: a seeded, class-stratified subset of "
                   "a folder's train/ (default 5000); for fashion_mnist / digits the first N of their held-out split")
    g.add_argument("--heldout-seed", type=int, help="seed of a folder's held-out split (default 0)")
    g.add_argument("--limit", type=int, help="search: same as --heldout-size; eval: first N val images")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default 0: read in this process)")
    g.add_argument("--on-bad-image", choices=["fail", "skip"], help="an unreadable image file: fail naming it "
                   "(default) or skip it with a warning")
    g.add_argument("--crop-pct", type=float, help="override the model's eval crop fraction")
    g.add_argument("--interpolation", help="override the model's resize interpolation (bilinear, bicubic, ...)")
    g.add_argument("--mean", type=float, nargs="+", help="override the model's normalisation mean")
    g.add_argument("--std", type=float, nargs="+", help="override the model's normalisation std")


def _run_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("device")
    g.add_argument("--device", help="cuda (default when available; LOCAL_RANK's GPU under torchrun) or cpu")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], help="autocast precision of every forward (default off)")
    g.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bar")


def search_parser(prog: str = "tcl search") -> argparse.ArgumentParser:
    """The options of `tcl search` (and `python -m tcl.search`)."""
    ap = argparse.ArgumentParser(prog=prog, description="Search per-block prune/merge rates on the held-out split of "
                                 "train and write a budget -> schedule LookupTable; resumable; under torchrun the "
                                 "candidates are sharded over the processes.")
    ap.add_argument("--config", help="YAML file of the options below (command-line flags override it)")
    ap.add_argument("--out", help="output folder (log shards, settings.json, table.json)")
    _model_args(ap)
    _data_args(ap)
    _run_args(ap)
    ap.add_argument("--patch", type=json.loads, help='JSON kwargs for tcl.patch, e.g. \'{"merge": "bipartite"}\'')
    ap.add_argument("--cache-images", type=int, help="keep the block inputs of this many images (default 512) so blocks "
                    "before a schedule's first reduction are skipped")
    ap.add_argument("--max-cache-bytes", type=int, help=f"bound on what the scorer keeps in memory (default "
                    f"{MAX_CACHE_BYTES} = 2 GiB): logits, images, block inputs; the rest is streamed")
    ap.add_argument("--head-importance", choices=["fisher", "michel"], help="with --heads joint / only: the "
                    "all-classes head ranking computed on the search split (default fisher)")
    for f in dataclasses.fields(SearchConfig):
        kind = json.loads if f.name == "targets" else str if f.name in ("method", "subset_dtype") else type(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind)
    return ap


def _options(args: argparse.Namespace, allowed: set[str], prog: str) -> dict[str, Any]:
    """The options of a YAML --config overridden by the flags given."""
    opts: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist; pass the path of a YAML file of options")
        opts = yaml.safe_load(path.read_text()) or {}
        if not isinstance(opts, dict):
            raise UsageError(f"{path} must hold a mapping of option: value")
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "command")})
    unknown = set(opts) - allowed
    if unknown:
        raise UsageError(f"unknown option(s) {sorted(unknown)}; see {prog} --help")
    return opts


def _device(opts: dict[str, Any]) -> torch.device:
    dev = torch.device(opts["device"]) if opts.get("device") else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU here; pass --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def load_model(opts: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The model the options name, on device (random weights seeded by `seed` when random_init)."""
    name = opts.get("model", "reference")
    pretrained = True if opts.get("pretrained") else False if opts.get("random_init") else None
    if pretrained is False:
        torch.manual_seed(opts.get("seed", 0))
    if name in models.NAMED:
        if pretrained is not None:
            raise UsageError(f"--pretrained / --random-init apply to timm models; {name!r} loads its shipped weights "
                             "(or --checkpoint)")
        model = models.create(name, opts.get("checkpoint"))
    else:
        try:
            model = models.create(name, opts.get("checkpoint"), pretrained, **opts.get("model_kwargs", {}))
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
    return model.to(device)


def _split(opts: dict[str, Any], which: str, model: torch.nn.Module) -> tuple[Any, dict[str, Any]]:
    size = opts.get("heldout_size", opts.get("limit")) if which == "search" else None
    return tdata.split(opts.get("data", "fashion_mnist"), which, model, heldout_size=size,  # type: ignore[arg-type]
                       heldout_seed=opts.get("heldout_seed", tdata.HELDOUT_SEED),
                       on_bad_image=opts.get("on_bad_image", "fail"), crop_pct=opts.get("crop_pct"),
                       interpolation=opts.get("interpolation"), mean=opts.get("mean"), std=opts.get("std"))


def _amp(opts: dict[str, Any]) -> str | None:
    return None if opts.get("amp") in (None, "off") else opts["amp"]


# ---- commands --------------------------------------------------------------------------------------------------
def run_search(argv: Sequence[str] | None = None, prog: str = "tcl search") -> LookupTable:
    """`tcl search`: build the model, the held-out split and its scorer, and run (or resume) the search."""
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    opts = _options(search_parser(prog).parse_args(argv), fields | MODEL_KEYS | DATA_KEYS | RUN_KEYS | SEARCH_KEYS, prog)
    opts.setdefault("max_merge", PatchSettings.from_dict(opts.get("patch", {})).max_merge)
    device = _device(opts)
    rank, world = init_distributed(device)
    torch.set_num_threads(opts.get("threads") or max(1, (os.cpu_count() or 1) // world))
    model = load_model(opts, device)
    ds, info = _split(opts, "search", model)
    if _amp(opts):
        info["amp"] = _amp(opts)
    cfg = SearchConfig(**{k: v for k, v in opts.items() if k in fields})
    kw = dict(batch_size=opts.get("batch_size", 1000), info=info, cache_images=opts.get("cache_images", 512),
              max_cache_bytes=opts.get("max_cache_bytes", MAX_CACHE_BYTES), workers=opts.get("workers", 0), amp=_amp(opts))
    if cfg.heads == "none":
        scorer = ReferenceScorer(model, ds, **kw, **opts.get("patch", {}))
    else:  # heads ranked once on the search split, recorded in the table
        method = opts.get("head_importance", "fisher")
        imp = head_importance(model, ds, method, min(kw["batch_size"], 128), amp=_amp(opts),
                              progress=not opts.get("quiet") and rank == 0)
        scorer = joint_scorer(model, ds, imp, method, **kw, **opts.get("patch", {}))
    out = opts.get("out") or f"runs/search_{cfg.method}_{cfg.candidates}_seed{cfg.seed}"
    t0 = time.perf_counter()
    table = search(model, scorer, cfg, out, progress=not opts.get("quiet"))
    if rank == 0:
        prec = table.search.get("subset_precision")
        note = f"; subset stage in {prec['chosen']} ({prec.get('reason', 'timed')})" if prec else ""
        print(f"{len(table.entries)} table entries from {cfg.candidates} candidates in {time.perf_counter() - t0:.1f} s "
              f"({world} process(es) x {torch.get_num_threads()} thread(s) on {device}){note}; "
              f"table: {Path(out) / 'table.json'}")
    return table


def eval_parser() -> argparse.ArgumentParser:
    """The options of `tcl eval`."""
    ap = argparse.ArgumentParser(prog="tcl eval", description="Accuracy and agreement on val, MACs and measured "
                                 "throughput of a searched table's schedules at the given budgets, next to the "
                                 "uncompressed model and ToMe / EViT / DiffRate's op at matched MACs.")
    _model_args(ap)
    _data_args(ap)
    _run_args(ap)
    ap.add_argument("--seed", type=int, help="seed of --random-init weights (default 0, as tcl search)")
    ap.add_argument("--table", required=True, help="table.json written by tcl search")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7],
                    help="fractions of full MACs (<= 1) or GMACs (> 1)")
    ap.add_argument("--baselines", nargs="*", default=["tome", "evit", "diffrate"], choices=["tome", "evit", "diffrate"],
                    help="baselines at matched MACs: exact ToMe, exact EViT, DiffRate's op on hand-set prune/merge rates")
    ap.add_argument("--runs", type=int, default=5, help="timed rounds of the throughput measurement")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    return ap


def run_eval(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """`tcl eval`: rows of evaluate.compare for the table's picks and the baselines at matched MACs, printed."""
    args = eval_parser().parse_args(argv)
    opts = _options(args, MODEL_KEYS | DATA_KEYS | RUN_KEYS | {"table", "budgets", "baselines", "runs", "json"},
                    "tcl eval")
    torch.set_num_threads(opts.get("threads") or torch.get_num_threads())
    device = _device(opts)
    model = load_model(opts, device)
    table = LookupTable.load(opts["table"], model)
    val, _ = _split(opts, "val", model)
    full = macs(model)
    methods: dict[str, tuple[Schedule | None, dict[str, Any]]] = {"uncompressed": (None, {})}
    budget_of: dict[str, float] = {}
    for b in opts["budgets"]:
        s = table.select(b)
        f = macs(model, s) / full
        methods[f"tcl@{b:g}"] = (s, {})  # the selected schedule carries the op the table was searched with
        budget_of[f"tcl@{b:g}"] = b
        for kind in opts["baselines"]:
            try:
                methods[f"{kind}@{b:g}"] = (at_macs(model, kind, f), {})  # the schedule carries its method's op
                budget_of[f"{kind}@{b:g}"] = b
            except ScheduleError as e:
                print(f"{kind} at {f:.1%} MACs skipped: {e}", file=sys.stderr)
    rows = evaluate.compare(model, methods, val, batch_size=opts.get("batch_size", 256), runs=opts["runs"],
                            limit=opts.get("limit"), progress=not opts.get("quiet"), amp=_amp(opts),
                            workers=opts.get("workers", 0))
    for r in rows:
        r["budget"] = budget_of.get(r["method"])
    print(f"{'method':<16}{'GMACs':>8}{'of full':>9}{'accuracy':>10}{'agreement':>11}{'img/s':>10}{'speedup':>9}")
    for r in rows:
        print(f"{r['method']:<16}{r['macs'] / 1e9:>8.3f}{r['fraction']:>9.1%}{r['accuracy']:>10.2%}"
              f"{r['agreement']:>11.2%}{r['img_per_s']:>10.1f}{r.get('speedup', float('nan')):>9.2f}")
    print(f"val images: {len(val) if opts.get('limit') is None else min(opts['limit'], len(val))}; device {device}, "
          f"amp {_amp(opts) or 'off'}, batch {rows[0]['batch_size']}, {rows[0]['threads']} thread(s)")
    if opts.get("json"):
        write_json(opts["json"], rows)
    return rows


def table_parser() -> argparse.ArgumentParser:
    """The options of `tcl table`."""
    ap = argparse.ArgumentParser(prog="tcl table", description="Print a lookup table's model, data and entries.")
    ap.add_argument("table", help="table.json written by tcl search")
    ap.add_argument("--json", action="store_true", help="print the entries as JSON lines")
    return ap


def run_table(argv: Sequence[str] | None = None) -> LookupTable:
    """`tcl table`: print a table file's model, data, search settings and entries."""
    args = table_parser().parse_args(argv)
    t = LookupTable.load(args.table)
    if args.json:
        for row in t.rows():
            print(json.dumps(row))
        return t
    d = t.data
    print(f"model {t.model.get('name')}: {t.full_macs / 1e9:.3f} GMACs; data {d.get('name')} {d.get('root', '')} "
          f"split {d.get('split')} ({d.get('size')} images); patch {t.patch_kwargs}; score {t.score}")
    scores = sorted({k for e in t.entries for k in e["scores"]})
    print(f"{'id':>6} {'kind':<12}{'GMACs':>8}{'of full':>9}" + "".join(f"{k:>9}" for k in scores) + "  merge")
    for r in t.rows():
        print(f"{r['id']!s:>6} {r['kind']!s:<12}{r['macs'] / 1e9:>8.3f}{r['fraction']:>9.1%}"
              + "".join(f"{r[k]:>9.4f}" for k in scores) + f"  {r['merge']}"
              + (f"  heads {r['heads']}" if r["heads"] else ""))
    return t


# ---- entry points ----------------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    """The message of err on one line (the original one for an error re-raised from a DataLoader worker)."""
    msg = str(err).strip()
    if "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(msg.split()) or type(err).__name__


def guarded(fn: Callable[[], T], prog: str) -> T:
    """fn(), with bad input reported as one line on stderr and exit code 2 (TCL_DEBUG=1 re-raises)."""
    try:
        return fn()
    except ERRORS as e:
        if os.environ.get("TCL_DEBUG"):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def search_command(argv: Sequence[str] | None = None, prog: str = "tcl search") -> LookupTable:
    """`tcl search` with bad input reported as one error line and exit code 2."""
    return guarded(lambda: run_search(argv, prog), prog)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `tcl {search,eval,table} ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"search": lambda a: search_command(a), "eval": lambda a: guarded(lambda: run_eval(a), "tcl eval"),
                "table": lambda a: guarded(lambda: run_table(a), "tcl table")}
    if not argv or argv[0] not in commands:
        print("usage: tcl {search,eval,table} ...  (tcl <command> --help for its options)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    commands[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    code = main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    raise SystemExit(code)

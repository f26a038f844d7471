"""The real setup: an ImageNet-layout folder, a timm ViT with explicit weights, devices, and the tcl command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tcl import cli, data, evaluate, models, search
from tcl.compress.schedule import Schedule, macs
from tcl.compress.table import LookupTable

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=3)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def make_folder(root: Path, train: int = 10, val: int = 4, classes: int = 3, seed: int = 0) -> Path:
    """ROOT/{train,val}/class_k/ with RGB images of mixed sizes, JPEG and PNG."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 255, (int(rng.integers(20, 70)), int(rng.integers(20, 70)), 3),
                                                   dtype=np.uint8))
                img.save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small random-weight timm ViT's checkpoint, so search and eval use the same weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "small.safetensors"
    models.save_weights(models.create("vit_tiny_patch16_224", pretrained=False, **SMALL), path)
    return path


def small_model(weights: Path) -> torch.nn.Module:
    return models.create("vit_tiny_patch16_224", checkpoint=weights, **SMALL)


def model_flags(weights: Path) -> list[str]:
    return ["--model", "vit_tiny_patch16_224", "--checkpoint", str(weights), "--model-kwargs", json.dumps(SMALL)]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code  # type: ignore[assignment]
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- data layer
def test_stratified_split_is_proportional_seeded_and_disjoint(folder):
    labels = [0] * 50 + [1] * 30 + [2] * 20
    held = data.stratified_heldout(labels, 10, seed=3)
    assert np.bincount(np.asarray(labels)[held]).tolist() == [5, 3, 2]
    assert np.array_equal(held, data.stratified_heldout(labels, 10, seed=3))
    assert not np.array_equal(held, data.stratified_heldout(labels, 10, seed=4))
    assert np.bincount(np.asarray(labels)[data.stratified_heldout(labels, 7)]).tolist() == [4, 2, 1]  # largest remainder
    m = models.create("vit_tiny_patch16_224", pretrained=False, **SMALL)
    (s, si), (t, _), (v, vi) = (data.split(folder, w, m, heldout_size=6) for w in ("search", "train", "val"))
    search_files, train_files = {p for p, _ in s.samples}, {p for p, _ in t.samples}
    assert sorted(s.targets) == [0, 0, 1, 1, 2, 2] and len(t) == 24 and not search_files & train_files
    assert all("/train/" in p for p in search_files) and all("/val/" in p for p, _ in v.samples)
    assert si["heldout_size"] == 6 and si["heldout_seed"] == 0 and si["train_images"] == 30 and vi["split"] == "val"
    assert s.samples == data.split(folder, "search", m, heldout_size=6)[0].samples


def test_folder_reads_with_the_models_transform_and_overrides(folder):
    m = models.create("vit_tiny_patch16_224", pretrained=False, **SMALL)
    ds, info = data.split(folder, "val", m)
    x, y = ds[len(ds) - 1]
    assert x.shape == (3, 32, 32) and y == 2 and ds.classes == ["class_0", "class_1", "class_2"]
    assert info["transform"]["input_size"] == [3, 32, 32] and info["transform"]["mean"] == [0.5, 0.5, 0.5]
    ds2, info2 = data.split(folder, "val", m, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                            interpolation="bilinear")
    assert info2["transform"]["crop_pct"] == 1.0 and info2["transform"]["interpolation"] == "bilinear"
    assert 0.0 <= float(ds2[0][0].min()) and float(ds2[0][0].max()) <= 1.0  # mean 0, std 1: raw [0, 1] pixels


def test_folder_errors_name_the_fix(tmp_path, folder):
    m = models.create("vit_tiny_patch16_224", pretrained=False, **SMALL)
    with pytest.raises(data.DataNotFoundError, match="is not a folder; pass --data"):
        data.split(tmp_path / "absent", "search", m)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(data.DataNotFoundError, match="holds no class folders"):
        data.split(tmp_path / "empty", "search", m)
    make_folder(tmp_path / "noval", train=2, val=1)
    import shutil

    shutil.rmtree(tmp_path / "noval" / "val")
    with pytest.raises(data.DataNotFoundError, match="noval/val does not exist; an image folder needs ImageNet layout"):
        data.split(tmp_path / "noval", "search", m, heldout_size=3)
    make_folder(tmp_path / "hole", train=2, val=1)
    (tmp_path / "hole" / "train" / "class_9").mkdir()
    with pytest.raises(data.DataError, match="class_9 holds no images"):
        data.split(tmp_path / "hole", "search", m)
    bad = make_folder(tmp_path / "bad", train=2, val=2)
    (bad / "val" / "class_1" / "0.jpg").write_bytes(b"not an image")
    ds, _ = data.split(bad, "val", m)
    with pytest.raises(data.DataError, match=r"cannot read image .*class_1/0.jpg .*on_bad_image='skip'"):
        evaluate.predict(m, ds, batch_size=4, progress=False)
    skip, _ = data.split(bad, "val", m, on_bad_image="skip")
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        logits, labels = evaluate.predict(m, skip, batch_size=4, progress=False)
    assert len(labels) == 5 and labels.tolist().count(1) == 1
    with pytest.raises(data.DataError, match=r"gives 1x28x28 images but the model takes 3x32x32"):
        data.check_input(m, (1, 28, 28))
    small = make_folder(tmp_path / "small", train=2, val=1)  # 6 train images: the default held-out split takes all
    assert len(data.split(small, "search", m)[0]) == 6 and len(data.split(small, "train", m, heldout_size=4)[0]) == 2
    with pytest.raises(data.DataError, match="all 6 images of .*train are in the held-out .* heldout_size below 6"):
        data.split(small, "train", m)


# ---------------------------------------------------------------- models
def test_create_needs_explicit_weights_and_loads_checkpoints(tmp_path, weights):
    with pytest.raises(models.CheckpointError, match="no weights given .* pretrained=False for random weights"):
        models.create("vit_tiny_patch16_224", **SMALL)
    ref = small_model(weights)
    torch.save({"model": ref.state_dict()}, tmp_path / "w.pth")
    for path in (weights, tmp_path / "w.pth"):
        got = models.create("vit_tiny_patch16_224", checkpoint=path, **SMALL)
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
    with pytest.raises(models.CheckpointError, match="does not match the model .*head.weight"):
        models.create("vit_tiny_patch16_224", checkpoint=weights, **{**SMALL, "num_classes": 5})
    with pytest.raises(models.CheckpointError, match="could not download .* pass checkpoint="):
        models.create("vit_tiny_patch16_224", pretrained=True, **SMALL)  # HF_HUB_OFFLINE=1 in conftest
    assert models.create("vit_tiny_patch16_224", pretrained=False, **{**SMALL, "num_classes": 7}).num_classes == 7


# ---------------------------------------------------------------- scorer: devices, streaming within the bound
@pytest.mark.parametrize("device", DEVICES)
def test_streaming_scorer_equals_the_cached_one(folder, weights, device):
    m = small_model(weights).to(device)
    ds, _ = data.split(folder, "search", m, heldout_size=15)
    cached = search.ReferenceScorer(m, ds, batch_size=4, cache_images=16)
    assert len(cached.x) == 15 and len(cached.cache[-1]) == 15 and cached.ref.device.type == device
    image, blocks = 3 * 32 * 32 * 4, 4 * 2 * 17 * 64  # per image: the input, the inputs of blocks 1 and 2
    bound = 15 * (3 * 4 + 8) + 5 * image  # the logits and labels of all 15 images, plus 5 images
    streamed = search.ReferenceScorer(m, ds, batch_size=4, cache_images=0, max_cache_bytes=bound)
    assert len(streamed.x) == 5 and not streamed.cache and streamed.cached_bytes <= bound
    mixed = search.ReferenceScorer(m, ds, batch_size=4, cache_images=2, max_cache_bytes=bound)  # 2 x (image + blocks)
    assert len(mixed.cache[-1]) == 2 and len(mixed.x) == 2 + (5 * image - 2 * (image + blocks)) // image == 3
    assert mixed.cached_bytes <= bound
    for s in (Schedule([17, 9, 5], [17, 5, 5]), Schedule([17, 12, 8], [17, 10, 4]), Schedule.tome(m, 2)):
        for n in (2, 4, 15):
            a = cached(s, n)
            for b in (streamed(s, n), mixed(s, n)):
                assert a["agree"] == b["agree"] and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    with pytest.raises(search.SearchError, match="cannot hold even the logits"):
        search.ReferenceScorer(m, ds, max_cache_bytes=10)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_runs_on_the_models_device(folder, weights, device):
    m = small_model(weights).to(device)
    ds, _ = data.split(folder, "val", m)
    logits, labels = evaluate.predict(m, ds, batch_size=5, progress=False)
    assert logits.device.type == labels.device.type == device and logits.shape == (12, 3)
    assert evaluate.throughput(m, batch_size=4, runs=2, warmup=1)["device"].startswith(device)
    assert evaluate.counted_macs(m) == macs(m)
    bf = evaluate.predict(m, ds, batch_size=5, progress=False, amp="bf16")[0]
    assert bf.dtype == torch.float32 and (bf.argmax(-1) == logits.argmax(-1)).float().mean() > 0.5


def test_auto_subset_precision_is_measured_recorded_and_kept_on_resume(folder, weights, tmp_path, monkeypatch):
    m = small_model(weights)
    ds, _ = data.split(folder, "search", m, heldout_size=12)
    scorer = search.ReferenceScorer(m, ds, batch_size=4)
    cfg = search.SearchConfig(candidates=10, topk=1, subset=8, subset_dtype="auto")
    monkeypatch.setattr("tcl.utils.native_bf16", lambda device: False)
    t = search.search(m, scorer, cfg, tmp_path / "a", progress=False)
    assert t.search["subset_dtype"] == "float32" and t.search["subset_precision"]["native_bf16"] is False
    monkeypatch.setattr("tcl.utils.native_bf16", lambda device: True)
    t = search.search(m, scorer, cfg, tmp_path / "b", progress=False)
    p = t.search["subset_precision"]
    assert set(p["seconds_per_evaluation"]) == {"float32", "bfloat16"} and t.search["subset_dtype"] == p["chosen"]
    assert p["chosen"] == min(p["seconds_per_evaluation"], key=p["seconds_per_evaluation"].get)
    again = search.search(m, scorer, cfg, tmp_path / "b", progress=False)
    assert again.search["subset_precision"]["reason"].startswith("resumed") and again.entries == t.entries


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("device", DEVICES)
def test_cli_search_eval_and_table_end_to_end(folder, weights, tmp_path, capsys, device):
    out = tmp_path / "search"
    argv = ["search", *model_flags(weights), "--data", str(folder), "--heldout-size", "12", "--candidates", "40",
            "--subset", "8", "--topk", "1", "--threads", "1", "--batch-size", "8", "--out", str(out), "--quiet",
            "--device", device, "--patch", '{"merge": "bipartite"}']
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "table entries from 40 candidates" in text and (out / "table.json").is_file()
    table = LookupTable.load(out / "table.json", small_model(weights))
    assert table.data["name"] == "folder" and table.data["heldout_size"] == 12 and table.data["size"] == 12
    assert table.settings.merge == "bipartite" and table.search["evaluations_subset"] == 40
    code, _, _ = run_cli(argv, capsys)  # resumed: nothing left to evaluate
    assert code == 0 and LookupTable.load(out / "table.json").to_dict() == table.to_dict()
    code, text, err = run_cli(["eval", *model_flags(weights), "--data", str(folder), "--table", str(out / "table.json"),
                               "--budgets", "0.6", "0.8", "--runs", "1", "--batch-size", "8", "--threads", "1",
                               "--device", device, "--quiet", "--json", str(tmp_path / "eval.json")], capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads((tmp_path / "eval.json").read_text())}
    assert {"uncompressed", "tcl@0.6", "tome@0.6", "tcl@0.8", "tome@0.8", "evit@0.8"} <= set(rows)
    assert rows["uncompressed"]["agreement"] == 1.0 and rows["tcl@0.6"]["fraction"] <= 0.6
    assert abs(rows["tome@0.8"]["fraction"] - rows["tcl@0.8"]["fraction"]) <= 0.02
    assert all(m in text for m in rows) and "val images: 12" in text
    m = small_model(weights)
    tcl_patch = __import__("tcl.compress.patch", fromlist=["patch"])
    tcl_patch.patch(m, table.select(0.6), **table.patch_kwargs)
    ds, _ = data.split(folder, "val", m)
    assert rows["tcl@0.6"]["accuracy"] == pytest.approx(evaluate.accuracy(m, ds, progress=False))
    code, text, _ = run_cli(["table", str(out / "table.json")], capsys)
    assert code == 0 and "data folder" in text and len(text.splitlines()) == 2 + len(table.entries)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_joint_search_and_eval(folder, weights, tmp_path, capsys, device):
    out = tmp_path / "joint"
    code, text, err = run_cli(["search", *model_flags(weights), "--data", str(folder), "--heldout-size", "12",
                               "--candidates", "30", "--subset", "8", "--topk", "1", "--threads", "1", "--batch-size",
                               "8", "--out", str(out), "--quiet", "--device", device, "--heads", "joint",
                               "--head-importance", "michel", "--min-fraction", "0.4"], capsys)
    assert code == 0, err
    table = LookupTable.load(out / "table.json", small_model(weights))
    assert table.data["head_importance"]["method"] == "michel"
    logged = [r for (st, _), r in search.read_log(out).items() if st == "full"]
    assert any(min(r["schedule"].get("heads") or [2]) < 2 for r in logged)  # head-pruned candidates were scored
    table = LookupTable(logged, table.model, table.data, table.search, "acc", table.settings)  # every scored one
    table.entries = [e for e in table.entries if e["schedule"].get("heads")]  # keep those that remove heads
    table.save(out / "heads.json")
    b = table.entries[-1]["macs"] / macs(small_model(weights)) + 1e-9
    code, text, err = run_cli(["eval", *model_flags(weights), "--data", str(folder), "--table", str(out / "heads.json"),
                               "--budgets", str(b), "--runs", "1", "--batch-size", "8", "--threads", "1", "--device",
                               device, "--quiet", "--baselines", "tome", "--json", str(tmp_path / "eval.json")], capsys)
    assert code == 0, err
    row = next(r for r in json.loads((tmp_path / "eval.json").read_text()) if r["method"].startswith("tcl@"))
    m = small_model(weights).to(device)
    s = table.select(b)
    assert s.heads is not None and row["macs"] == macs(m, s)
    __import__("tcl").patch(m, s)  # the obvious call: heads removed, tokens reduced
    assert [blk.attn.num_heads for blk in m.blocks] == s.kept_heads(2)
    ds, _ = data.split(folder, "val", m)
    assert row["accuracy"] == pytest.approx(evaluate.accuracy(m, ds, progress=False))
    code, text, _ = run_cli(["table", str(out / "heads.json")], capsys)
    assert code == 0 and "heads [" in text


def test_cli_search_deit_tiny_at_224(tmp_path, capsys):
    folder = make_folder(tmp_path / "f", train=4, val=1, classes=2)
    code, text, err = run_cli(["search", "--model", "deit_tiny_patch16_224", "--random-init", "--model-kwargs",
                               '{"num_classes": 2}', "--data", str(folder), "--heldout-size", "6", "--candidates", "8",
                               "--subset", "4", "--topk", "1", "--threads", "1", "--quiet", "--device", "cpu",
                               "--out", str(tmp_path / "s"), "--patch", '{"merge": "bipartite"}'], capsys)
    assert code == 0, err
    t = LookupTable.load(tmp_path / "s" / "table.json")
    assert t.model["name"] == "deit_tiny_patch16_224" and t.data["transform"]["input_size"] == [3, 224, 224]
    assert t.model["dims"]["tokens"] == 197 and t.search["evaluations_subset"] == 8


def _error_cases(tmp: Path, folder: Path, weights: Path, capsys) -> dict[str, tuple[list[str], str]]:
    bad = make_folder(tmp / "bad", train=3, val=1)
    (bad / "train" / "class_0" / "0.jpg").write_bytes(b"broken")
    hole = make_folder(tmp / "hole", train=3, val=1)
    (hole / "train" / "class_5").mkdir()
    other = tmp / "other.safetensors"
    models.save_weights(models.create("vit_tiny_patch16_224", pretrained=False, **{**SMALL, "depth": 4}), other)
    search_ = ["search", "--candidates", "4", "--subset", "4", "--quiet", "--threads", "1", "--out", str(tmp / "o")]
    ev = ["eval", *model_flags(weights), "--data", str(folder), "--runs", "1", "--quiet", "--threads", "1"]
    table = tmp / "t.json"
    if not table.exists():
        run_cli(["search", *model_flags(other.parent / "other.safetensors"), "--model-kwargs",
                 json.dumps({**SMALL, "depth": 4}), "--data", str(folder), "--heldout-size", "6", "--candidates", "4",
                 "--subset", "4", "--topk", "1", "--quiet", "--threads", "1", "--out", str(tmp / "t")], capsys)
        (tmp / "t" / "table.json").rename(table)
    return {
        "input size": ([*search_, "--model", "deit_tiny_patch16_224", "--random-init", "--data", "digits"],
                       "gives 1x16x16 images but the model takes 3x224x224"),
        "missing folder": ([*search_, *model_flags(weights), "--data", str(tmp / "nope")], "is not a folder; pass --data"),
        "empty folder": ([*search_, *model_flags(weights), "--data", str(tmp / "empty")], "holds no class folders"),
        "class without images": ([*search_, *model_flags(weights), "--data", str(hole), "--heldout-size", "3"],
                                 "class_5 holds no images"),
        "unreadable image": ([*search_, *model_flags(weights), "--data", str(bad), "--heldout-size", "9"],
                             "cannot read image"),
        "checkpoint mismatch": ([*search_, *model_flags(other), "--data", str(folder)], "does not match the model"),
        "table for another model": ([*ev, "--table", str(table)], "this table was searched for"),
        "named model without weights": ([*search_, "--model", "deit_tiny_patch16_224", "--data", str(folder)],
                                        "no weights given for 'deit_tiny_patch16_224'"),
        "unknown model": ([*search_, "--model", "no_such_vit", "--random-init"], "unknown timm model"),
    }


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, folder, weights, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    for name, (argv, message) in _error_cases(tmp_path, folder, weights, capsys).items():
        capsys.readouterr()
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("tcl "), (name, err)


def test_cli_error_without_traceback_in_a_real_process(tmp_path, weights):
    # PYTHONWARNINGS: deprecation warnings that an older torch / timm prints at import are not tcl's output
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("TCL_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "tcl.search", *model_flags(weights), "--data", str(tmp_path / "x"),
                          "--quiet"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "is not a folder" in res.stderr


def test_named_models_refuse_timm_kwargs():
    with pytest.raises(models.CheckpointError, match="named model"):
        models.create("reference", num_classes=3)
    with pytest.raises(models.CheckpointError, match="named model"):
        models.create("reference", pretrained=False)

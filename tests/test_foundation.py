"""Foundation: data loading, the reference model, checkpoints, measurement and analytic MACs."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tcl
from tcl import data, evaluate, models, reference
from tcl.compress.schedule import Schedule, macs

HAS_WEIGHTS = reference.WEIGHTS.exists()


# ---------------------------------------------------------------- data
def test_fashion_mnist_splits_are_disjoint_and_fixed():
    held = reference.heldout_indices()
    assert len(held) == reference.HELDOUT_SIZE and len(np.unique(held)) == len(held)
    assert np.array_equal(held, reference.heldout_indices())  # seeded
    tr, ho, te = reference.fashion_mnist("train"), reference.fashion_mnist("heldout"), reference.fashion_mnist("test")
    assert (len(tr), len(ho), len(te)) == (55000, 5000, 10000)
    x_all, _ = reference.load_arrays(train=True)
    ref = torch.from_numpy(x_all[held[:3]].copy()).float() / 255
    assert torch.allclose(ho.tensors[0][:3, 0] * reference.FMNIST_STD[0] + reference.FMNIST_MEAN[0], ref, atol=1e-6)
    assert te.tensors[0].shape == (10000, 1, 28, 28) and set(te.tensors[1].unique().tolist()) == set(range(10))


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(reference.data, "DEBIAN_ROOT", tmp_path / "nowhere")
    monkeypatch.delenv("TCL_DATA", raising=False)
    with pytest.raises(data.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        reference.fashion_mnist("test", root=tmp_path)


def test_given_root_and_truncated_idx(tmp_path):
    for f in (f for pair in reference.FMNIST_FILES.values() for f in pair):
        shutil.copy(reference.DEBIAN_ROOT / f, tmp_path / f)
    assert len(reference.fashion_mnist("test", root=tmp_path)) == 10000
    raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        reference.fashion_mnist("test", root=tmp_path)


def test_digits_and_bad_split():
    tr, te = data.digits("train"), data.digits("test")
    assert len(tr) + len(te) == 1797 and tr.tensors[0].shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError, match="split must be"):
        reference.fashion_mnist("val")  # type: ignore[arg-type]


def test_image_folder_uses_timm_eval_transforms(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    m = tcl.models.create("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=2)
    ds = data.image_folder(tmp_path, model=m)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == 1 and len(ds) == 4
    with pytest.raises(data.DataNotFoundError, match="ImageFolder"):
        data.image_folder(tmp_path / "missing")


# ---------------------------------------------------------------- models and checkpoints
def test_reference_architecture():
    m = reference.build_reference()
    assert m.patch_embed.num_patches == 49 and m.num_prefix_tokens == 1 and len(m.blocks) >= 8
    assert m.blocks[0].attn.num_heads == 4 and m.embed_dim >= 128
    assert m.pretrained_cfg["input_size"] == (1, 28, 28) and m.pretrained_cfg["mean"] == reference.FMNIST_MEAN


def test_checkpoint_roundtrip_corrupt_and_mismatched(tmp_path):
    m = reference.build_reference()
    path = tmp_path / "w.safetensors"
    models.save_weights(m, path, {"note": "x"})
    m2 = reference.build_reference()
    assert models.load_weights(m2, path) == {"note": "x"}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(models.CheckpointError, match="corrupt"):
        models.reference(bad)
    with pytest.raises(models.CheckpointError, match="does not match"):
        models.load_weights(reference.build_reference(embed_dim=64), path)
    with pytest.raises(models.CheckpointError, match="does not exist"):
        models.create("deit_tiny_patch16_224", checkpoint=tmp_path / "absent.safetensors")


def test_create_rejects_non_vit_and_unknown_names():
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        models.create("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="unknown timm model"):
        models.create("no_such_model_xyz", pretrained=False)


@pytest.mark.skipif(not HAS_WEIGHTS, reason="reference weights not trained yet")
def test_shipped_reference_is_trained_and_small():
    assert reference.WEIGHTS.stat().st_size <= 10 * 2**20
    m = models.reference()
    assert not m.training
    acc = evaluate.accuracy(m, reference.fashion_mnist("test"), limit=2000, progress=False)
    assert acc >= 0.88  # full test set >= 0.90 is checked by notebooks/00_reference_model


# ---------------------------------------------------------------- measurement
def test_accuracy_and_agreement_on_a_known_model():
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long() % 3, 3).float()

    x = torch.arange(12).float().view(12, 1, 1, 1)
    y = x.flatten().long() % 3
    y[:3] = (y[:3] + 1) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    assert evaluate.accuracy(Oracle(), ds, batch_size=5, progress=False) == pytest.approx(0.75)
    assert evaluate.agreement(Oracle(), Oracle(), ds, progress=False) == 1.0


def test_throughput_reports_median_and_threads():
    m = reference.build_reference(depth=1)
    r = evaluate.throughput(m, batch_size=8, runs=3, warmup=1)
    assert r["img_per_s"] > 0 and r["runs"] == 3 and r["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("name,gmacs", [("deit_small_patch16_224", 4.60), ("deit_base_patch16_224", 17.56)])
def test_published_macs(name, gmacs):
    m = models.create(name, pretrained=False)
    assert round(macs(m) / 1e9, 2) == gmacs


@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_analytic_macs_equal_flop_counter(kw):
    m = reference.build_reference(**kw)
    assert macs(m) == evaluate.counted_macs(m)


def test_analytic_macs_equal_flop_counter_deit_small():
    m = models.create("deit_small_patch16_224", pretrained=False)
    assert macs(m) == evaluate.counted_macs(m)


def test_macs_rejects_non_vit():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        macs(torch.nn.Linear(2, 2))
    with pytest.raises(tcl.ScheduleError, match="blocks"):
        macs(reference.build_reference(), Schedule([50], [50]))


def test_compare_matches_patched_accuracy_and_leaves_model_unpatched():
    m = reference.build_reference(depth=2).eval()
    ds = torch.utils.data.TensorDataset(torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,)))
    s = Schedule.tome(m, 4)
    recs = {r["method"]: r for r in evaluate.compare(m, {"base": (None, {}), "tome": (s, {})},
                                                      ds, batch_size=8, runs=1, progress=False)}
    assert recs["base"]["speedup"] == 1.0 and recs["base"]["agreement"] == 1.0
    assert recs["tome"]["macs"] == macs(m, s) and recs["tome"]["macs_ratio"] == macs(m) / macs(m, s)
    tcl.patch(m, s)
    expected = evaluate.accuracy(m, ds, progress=False)
    tcl.unpatch(m)
    assert recs["tome"]["accuracy"] == pytest.approx(expected)
    assert not tcl.compress.patch.is_patched(m)


def test_run_dir_moves_run_outputs_under_tcl_runs(monkeypatch, tmp_path) -> None:
    from tcl.utils import run_dir, write_json

    monkeypatch.delenv("TCL_RUNS", raising=False)
    assert run_dir("../runs/02_rate_search/search") == Path("../runs/02_rate_search/search")
    monkeypatch.setenv("TCL_RUNS", str(tmp_path))
    assert run_dir("../runs/02_rate_search/search") == tmp_path / "02_rate_search" / "search"
    assert run_dir("/data/elsewhere/out") == Path("/data/elsewhere/out")  # a user's own folder is left alone
    path = write_json(run_dir("../runs/x/m.json"), {"a": 1})
    assert path == tmp_path / "x" / "m.json" and path.read_text() == '{\n  "a": 1\n}\n'
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write leaves no temp file


def test_bar_chart_leaves_out_undefined_values(tmp_path) -> None:
    from tcl import plots

    rows = [{"subset": 8, "score": "kl", "rho": float("nan")}, {"subset": 8, "score": "acc", "rho": -0.5}]
    fig = plots.bars(rows, "subset", "rho", "score")  # a Spearman of constant scores is NaN
    assert fig.axes[0].get_ylim()[0] == pytest.approx(-0.5 - 0.05 - 1)
    assert plots.save(plots.bars(rows[:1], "subset", "rho", "score"), "nan_only", tmp_path).exists()

"""Head modules on a timm ViT, an image folder and a device: streamed data equals tensors, devices, amp, classes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tcl import heads, stream
from tcl.utils import device_of
from tcl.vit import attend

torch.set_num_threads(1)
CLASSES = ("bird", "cat", "dog")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def vit(num_classes: int = 3, seed: int = 0) -> VisionTransformer:
    """A random-weight timm ViT (pretrained=False): 32 px RGB, patch 8, 2 blocks x 2 heads."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=num_classes, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


def image_folder(root: Path, per_class: int = 8) -> Dataset:
    """A torchvision ImageFolder over PIL RGB images of mixed sizes and formats (PNG / JPEG), resized to 32 px."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 32 + 8 * (i % 3), 32 + 4 * (i % 2)
            pixels = (torch.rand(h, w, 3, generator=g) * 255 * (0.4 + 0.3 * c)).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return ImageFolder(str(root), transform=transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()]))


class Plain(Dataset):
    """A map-style dataset with neither `tensors` nor `targets`: the generic streaming path."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("device", DEVICES)
def test_decompose_class_on_an_image_folder(tmp_path: Path, device: str) -> None:
    model, folder = vit(), image_folder(tmp_path / "train")
    loader = DataLoader(folder, batch_size=5, num_workers=0)
    cfg = heads.ResetConfig(steps=6, batch_size=8, probe=8)
    mod = heads.decompose_class(model, loader, "cat", 2, "reset", cfg, progress=False, device=device)
    assert mod.target == (1,) and int(mod.mask.sum()) == 2 and mod.threshold is not None
    assert all(p.device.type == device for p in mod.parameters()) and mod.mask.device.type == device
    assert device_of(model).type == "cpu"  # the caller's model stays where it was
    z, y = heads.scores(mod, folder)
    assert z.shape == (len(folder),) and z.device.type == "cpu" and torch.equal(y, torch.tensor(folder.targets))
    rec = heads.module_report(mod, model, folder, ref_threshold=heads.reference_threshold(model, folder, 1))
    assert rec["heads_kept"] == 2 and 0 <= rec["module_balanced_accuracy"] <= 1
    lat = heads.latency(mod, model, batch_size=4, runs=2, device=device)
    assert lat["latency_device"].startswith(device) and lat["module_latency_s"] > 0
    # the same images as tensors give the same module (on the CPU bit for bit; elsewhere within float noise)
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    for method in ("random", "fisher"):
        a = heads.decompose_class(model, folder, 1, 2, method, cfg, progress=False, device=device, retrain=False)
        b = heads.decompose_class(model, (x, torch.tensor(folder.targets)), 1, 2, method, cfg, progress=False,
                                  retrain=False)
        assert torch.equal(a.mask.cpu(), b.mask)
        za, zb = heads.scores(a, (x, torch.tensor(folder.targets)))[0], heads.scores(b, folder)[0]
        assert torch.allclose(za, zb, atol=1e-5 if device == "cpu" else 1e-3)


def test_streamed_data_equals_tensors_exactly() -> None:
    model = vit(num_classes=5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, 32, 32, generator=g), torch.arange(40) % 5
    cfg, rcfg = heads.ResetConfig(steps=12, batch_size=8, probe=16), heads.RecoverConfig(steps=3, batch_size=8)
    kinds = {"pair": (x, y), "tensor_dataset": TensorDataset(x, y), "plain": Plain(x, y),
             "loader": DataLoader(Plain(x, y), batch_size=7, shuffle=True)}  # order comes from the dataset
    out = {}
    for name, data in kinds.items():
        mod = heads.decompose_class(model, data, 2, 2, "reset", cfg, progress=False, recover_data=data, recover_cfg=rcfg)
        imp = heads.class_importance(model, data, [0, 3], "kl", progress=False)
        out[name] = (mod.info["gates"], mod.mask, mod.threshold, heads.scores(mod, data)[0], imp)
    for name, got in out.items():
        ref = out["pair"]
        assert all(torch.equal(a, b) for a, b in zip(got[:2] + got[3:], ref[:2] + ref[3:])), name
        assert got[2] == ref[2], name
    assert torch.equal(stream.labels(kinds["loader"]), y) and stream.n_items(kinds["plain"]) == 40
    assert torch.equal(stream.labels(DataLoader(TensorDataset(x, y), batch_size=4)), y)
    with pytest.raises(ValueError, match="map-style Dataset"):
        heads.decompose_class(model, [(x[0], 0)] * 4, 2, 2, "random", progress=False)  # type: ignore[arg-type]


def test_classes_default_to_a_few_and_unknown_classes_fail(tmp_path: Path) -> None:
    assert heads.default_classes(vit(num_classes=1000)) == [0, 200, 400, 600, 800]
    assert heads.default_classes(vit(num_classes=12)) == [0, 2, 4, 7, 9] and heads.default_classes(vit()) == [0, 1, 2]
    model = vit(num_classes=12)
    x, y = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(24) % 12
    imp = heads.class_importance(model, (x, y), method="taylor", progress=False)
    assert imp.shape == (5, 2, 2)
    assert torch.equal(imp[3], heads.class_importance(model, (x, y), [7], "taylor", progress=False)[0])
    with pytest.raises(heads.HeadsError, match=r"\[0, 12\)"):
        heads.class_importance(model, (x, y), [3, 12], "taylor", progress=False)
    folder = image_folder(tmp_path / "f", per_class=3)
    with pytest.raises(heads.HeadsError, match="unknown class 'cow'.*'bird', 'cat', 'dog'"):
        heads.decompose_class(vit(), folder, "cow", 2, "random", progress=False)
    with pytest.raises(heads.HeadsError, match="no class_to_idx"):
        heads.class_importance(model, (x, y), ["cat"], "taylor", progress=False)
    assert heads.resolve_classes(folder, ["dog", 0]) == [2, 0]
    named = TensorDataset(x, y)
    named.classes = [f"c{k}" for k in range(12)]  # what tcl.data.split gives (folder names, a built-in's names)
    assert heads.resolve_classes(named, ["c7", 1]) == [7, 1]
    assert heads.resolve_classes(torch.utils.data.Subset(named, [0, 1]), ["c11"]) == [11]


def test_amp_bf16_runs_and_fp16_gradients_are_refused() -> None:
    model = vit(num_classes=5)
    x, y = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.arange(20) % 5
    cfg = heads.ResetConfig(steps=3, batch_size=8, probe=8)
    mod = heads.decompose_class(model, (x, y), 1, 2, "reset", cfg, progress=False, amp="bf16")
    full = heads.decompose_class(model, (x, y), 1, 4, "random", cfg, progress=False, retrain=False)
    z16 = heads.scores(full, (x, y), amp="bf16")[0]
    assert int(mod.mask.sum()) == 2 and z16.dtype == torch.float32
    assert torch.allclose(z16, heads.scores(full, (x, y))[0], atol=0.1) and not torch.equal(z16, heads.scores(full, (x, y))[0])
    with pytest.raises(ValueError, match="loss scaling"):
        heads.decompose_class(model, (x, y), 1, 2, "reset", cfg, progress=False, amp="fp16")
    with pytest.raises(ValueError, match="amp must be"):
        heads.scores(full, (x, y), amp="int8")  # type: ignore[arg-type]


@pytest.mark.parametrize("fused", [True, False])
def test_attention_masks_follow_sdpa(fused: bool) -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g) for _ in range(3))  # head_dim 16, as the model's
    attn = vit().blocks[0].attn
    attn.fused_attn = fused
    allowed = torch.rand(5, 5, generator=g) > 0.3
    allowed[:, 0] = True
    bias = torch.randn(2, 1, 5, 5, generator=g)
    for mask, causal in ((None, False), (allowed, False), (bias, False), (None, True)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        assert (attend(q, k, v, attn, mask, causal) - want).abs().max() <= 1e-5

"""Oracle for FID: pytorch-fid's Frechet distance (scipy.linalg.sqrtm) on random features, and a
tiny TorchScript feature extractor with two image folders for the `pso eval fid` command.

Usage: fid.py OUTDIR. Writes OUTDIR/features.safetensors (feature sets a, b, c, d; c and d have
fewer rows than columns, so their covariances are singular), OUTDIR/extractor.pt (TorchScript:
forward(images [N, 3, H, W] in 0..255, return_features: bool) -> [N, 8]), OUTDIR/ref/ and
OUTDIR/samples/ (16x16 PNGs), OUTDIR/ref_stats.npz (mu, sigma of ref as pytorch-fid saves them)
and OUTDIR/expected.json (the distances).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy import linalg


def frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, step for step."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def stats(features):
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


class Extractor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.relu(self.conv(images / 127.5 - 1.0))
        return x.mean(dim=(2, 3))


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sets = {
        "a": rng.normal(size=(60, 16)),
        "b": rng.normal(size=(50, 16)) * 1.3 + 0.2,
        "c": rng.normal(size=(10, 16)),
        "d": rng.normal(size=(12, 16)) + 0.1,
    }
    save_file({k: torch.from_numpy(v) for k, v in sets.items()}, str(out / "features.safetensors"))
    expected = {
        "a_b": frechet(*stats(sets["a"]), *stats(sets["b"])),
        "c_d": frechet(*stats(sets["c"]), *stats(sets["d"])),
    }

    torch.manual_seed(0)
    extractor = torch.jit.script(Extractor().eval())
    extractor.save(str(out / "extractor.pt"))
    folders = {}
    for name, count, scale in [("ref", 7, 1.0), ("samples", 6, 0.5)]:
        folder = out / name
        folder.mkdir(exist_ok=True)
        images = []
        for i in range(count):
            pixels = np.clip(rng.normal(128, 60 * scale, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
            images.append(np.asarray(Image.open(folder / f"{i:03d}.png").convert("RGB")))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            folders[name] = extractor(x, True).double().numpy()
    mu, sigma = stats(folders["ref"])
    np.savez(out / "ref_stats.npz", mu=mu, sigma=sigma)
    expected["folders"] = frechet(mu, sigma, *stats(folders["samples"]))
    (out / "expected.json").write_text(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Turns the official MPS checkpoint into the folder `pso score --scorer mps` loads.

Usage: convert_mps.py MPS_overall_checkpoint.pth OUT [--clip laion/CLIP-ViT-H-14-laion2B-s32B-b79K]

MPS_overall_checkpoint.pth (github.com/Kwai-Kolors/MPS) pickles the whole model; its classes (in the MPS
repository's trainer/models) are not needed: they are read as plain modules, the CLIP part as a
transformers CLIPModel. Writes OUT as a CLIPModel folder (config.json, model.safetensors in fp32) with
the tokenizer and image processor of --clip (a folder or hub id; MPS uses CLIP-H's), plus
OUT/mps.safetensors (the cross model's tensors, `cross_model.*`) and OUT/mps.json (its shape read from
the weights, the masking threshold (the official inference's 0.3) and the overall condition prompt).
"""
import argparse
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")


class _Module(nn.Module):
    """Stands in for a class of MPS's training code: an unpickled module keeps its state."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("trainer."):
            return CLIPModel if name == "XCLIPModel" else type(name, (_Module,), {})
        return super().find_class(module, name)


class _PickleModule:
    Unpickler = _Unpickler
    load = pickle.load


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--clip", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                    help="folder or hub id of the CLIP whose tokenizer and image processor MPS uses")
    ap.add_argument("--threshold", type=float, default=0.3,
                    help="condition similarity at or below which prompt tokens are masked (official inference: 0.3)")
    a = ap.parse_args()
    model = torch.load(a.checkpoint, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = model.model
    clip.config.to_json_file(out / "config.json")
    save_file({k: v.float().contiguous() for k, v in clip.state_dict().items()}, out / "model.safetensors")
    cross = {f"cross_model.{k}": v.float().contiguous() for k, v in model.cross_model.state_dict().items()}
    save_file(cross, out / "mps.safetensors")
    dim = clip.config.projection_dim
    dim_head = cross["cross_model.layers.0.0.fn.to_kv.weight"].shape[0] // 2
    heads = cross["cross_model.layers.0.0.fn.to_q.weight"].shape[0] // dim_head
    ff_mult = cross["cross_model.layers.0.0.fn.ff.0.weight"].shape[0] // (2 * dim)
    layers = 1 + max(int(k.split(".")[2]) for k in cross)
    (out / "mps.json").write_text(json.dumps(dict(dim=dim, layers=layers, heads=heads, dim_head=dim_head,
                                                  ff_mult=ff_mult, threshold=a.threshold, condition=CONDITION), indent=1))
    CLIPTokenizer.from_pretrained(a.clip).save_pretrained(out)
    CLIPImageProcessor.from_pretrained(a.clip).save_pretrained(out)


if __name__ == "__main__":
    main()

"""A tiny random MPS checkpoint pickled as the official one is, and the overall scores MPS's own
inference gives it, for tests/cli.rs.

Usage: make_mps.py OUTDIR. Writes OUTDIR/MPS_overall_checkpoint.pth (a whole pickled model whose classes
live in trainer.models.clip_model / trainer.models.cross_modeling, as the official file's do: `model`, an
XCLIPModel (a transformers CLIPModel), and `cross_model`), OUTDIR/clip (the tokenizer and image
processor of the tiny CLIP, standing in for laion/CLIP-ViT-H-14's), OUTDIR/images/{0,1,2}.png and
OUTDIR/scores.json: {"prompt": [score per image]} as MPS's infer_one_sample computes them (prompt and
condition padded to 77 tokens without an attention mask; every token projected; prompt tokens whose
best similarity to the condition, over the largest, is at most the threshold masked (0.8 here); the cross model's first
token against the prompt's end-of-text feature, times logit_scale.exp()). The cross model here is this
oracle's own transcription of MPS's (CoCa-style) cross_modeling.py, in fp32.
"""
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tiny_clip_vocab import EOS_ID, MERGES, VOCAB

CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")
PROMPTS = ["a photo of a cat", "the dog running in the park, a photo"]
DIM, HEADS, DIM_HEAD, LAYERS, FF_MULT = 16, 2, 8, 2, 4
# The official inference masks at 0.3; this tiny model's prompt tokens all clear that, so the test
# converts with --threshold 0.8 to see the mask at work.
THRESHOLD = 0.8

# The official checkpoint pickles classes of these modules.
trainer = types.ModuleType("trainer")
models = types.ModuleType("trainer.models")
clip_module = types.ModuleType("trainer.models.clip_model")
cross_module = types.ModuleType("trainer.models.cross_modeling")
for name, module in [("trainer", trainer), ("trainer.models", models), ("trainer.models.clip_model", clip_module),
                     ("trainer.models.cross_modeling", cross_module)]:
    sys.modules[name] = module


def in_module(module):
    def place(cls):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
        return cls
    return place


@in_module(cross_module)
class LayerNorm(nn.Module):
    """LayerNorm with a weight and a zero bias buffer."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


@in_module(cross_module)
class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


@in_module(cross_module)
class SwiGLU(nn.Module):
    def forward(self, x):
        value, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * value


def rotate_half(t):
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@in_module(cross_module)
class ParallelTransformerBlock(nn.Module):
    """Pre-norm; one fused projection to multi-query attention (rotary on q and the one k) and SwiGLU."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.sizes = (dim_head * heads, dim_head, dim_head, 2 * dim * ff_mult)
        self.heads, self.dim_head = heads, dim_head
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.sizes), bias=False)
        self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.sizes, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.dim_head, 2).float() / self.dim_head))
        freqs = torch.outer(torch.arange(n).float(), inv_freq)
        pos = torch.cat((freqs, freqs), dim=-1)
        q = (q * pos.cos() + rotate_half(q) * pos.sin()) * self.dim_head ** -0.5
        k = k * pos.cos() + rotate_half(k) * pos.sin()
        sim = q @ k.unsqueeze(1).transpose(-1, -2)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = (attn @ v.unsqueeze(1)).transpose(1, 2).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(ff)


@in_module(cross_module)
class CrossAttention(nn.Module):
    """Pre-norm queries; one key / value head from the context; additive mask; parallel SwiGLU."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim * ff_mult, bias=False), SwiGLU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x, context, mask):
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2) * self.dim_head ** -0.5
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = q @ k.unsqueeze(1).transpose(-1, -2) + mask.unsqueeze(1)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = (attn @ v.unsqueeze(1)).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out) + self.ff(x)


@in_module(cross_module)
class Cross_model(nn.Module):  # noqa: N801 (the official class name)
    def __init__(self, dim, layer_num, dim_head, heads, ff_mult):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                           Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layer_num)])

    def forward(self, query, context, mask):
        for cross, block in self.layers:
            query = block(cross(query, context, mask))
        return query


@in_module(clip_module)
class XCLIPModel(CLIPModel):
    pass


@in_module(clip_module)
class MPSModel(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.model = clip
        self.cross_model = Cross_model(DIM, LAYERS, DIM_HEAD, HEADS, FF_MULT)


MPSModel.__name__ = MPSModel.__qualname__ = "CLIPModel"
clip_module.CLIPModel = MPSModel


def token_features(clip, ids):
    out = clip.text_model(input_ids=ids)
    return clip.text_projection(out.last_hidden_state), clip.text_projection(out.pooler_output)


def main():
    out = Path(sys.argv[1])
    (out / "images").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(VOCAB), max_position_embeddings=77, eos_token_id=EOS_ID,
                         bos_token_id=VOCAB["<|startoftext|>"], pad_token_id=1),
        vision_config=dict(common, image_size=32, patch_size=8), projection_dim=DIM, logit_scale_init_value=2.6592)
    model = MPSModel(XCLIPModel(config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    torch.save(model, out / "MPS_overall_checkpoint.pth")

    clip_dir = out / "clip"
    clip_dir.mkdir(exist_ok=True)
    (clip_dir / "vocab.json").write_text(json.dumps(VOCAB, ensure_ascii=False))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    tokenizer = CLIPTokenizer(vocab=str(clip_dir / "vocab.json"), merges=str(clip_dir / "merges.txt"),
                              pad_token="!", model_max_length=77)
    tokenizer.save_pretrained(clip_dir)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
                                      image_mean=[0.48145466, 0.4578275, 0.40821073],
                                      image_std=[0.26862954, 0.26130258, 0.27577711])
    processor.save_pretrained(clip_dir)

    rng = np.random.default_rng(5)
    images = []
    for i, (h, w) in enumerate([(32, 32), (48, 40), (70, 90)]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(out / "images" / f"{i}.png")
        images.append(img)
    clip = model.model

    def tokenize(text):
        return tokenizer(text, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids

    scores = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            row = []
            for img in images:
                pixels = processor(img, return_tensors="pt")["pixel_values"]
                text_f, text_eos = token_features(clip, tokenize(prompt))
                image_f = clip.visual_projection(clip.vision_model(pixel_values=pixels).last_hidden_state)
                condition_f, _ = token_features(clip, tokenize(CONDITION))
                sim = torch.einsum("b i d, b j d -> b j i", text_f, condition_f)
                sim = sim.max(dim=1, keepdim=True)[0]
                sim = sim / sim.max()
                kept = sim > THRESHOLD
                # The threshold matters here: some prompt tokens are kept, some masked.
                assert 0 < int(kept.sum()) < kept.numel(), int(kept.sum())
                mask = torch.where(kept, 0.0, float("-inf")).repeat(1, image_f.shape[1], 1)
                feature = model.cross_model(image_f, text_f, mask)[:, 0, :]
                feature = feature / feature.norm(dim=-1, keepdim=True)
                text_eos = text_eos / text_eos.norm(dim=-1, keepdim=True)
                row.append((clip.logit_scale.exp() * text_eos @ feature.T).item())
            scores[prompt] = row
    (out / "scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()

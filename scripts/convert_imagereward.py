"""Turns the official ImageReward checkpoint into the folder `pso score --scorer imagereward` loads.

Usage: convert_imagereward.py ImageReward.pt med_config.json OUT [--tokenizer bert-base-uncased]
[--vision-heads 16]

ImageReward.pt and med_config.json are THUDM/ImageReward's (huggingface.co/THUDM/ImageReward). Writes
OUT/model.safetensors (the checkpoint's tensors under their own names, fp32), OUT/config.json (the
image tower's shape read from the weights, the text tower's from med_config.json, ImageReward's prompt
length 35 and reward mean / std), OUT/tokenizer.json (the BERT tokenizer with BLIP's [DEC] and [ENC]
added, as BLIP's init_tokenizer does) and OUT/preprocessor_config.json (resize the shorter side to 224
with bicubic resampling, centre-crop 224, CLIP's mean and std).
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertTokenizerFast, CLIPImageProcessor

MEAN, STD = 0.16717362830052426, 1.0333394966054072


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("med_config")
    ap.add_argument("out")
    ap.add_argument("--tokenizer", default="bert-base-uncased", help="BERT tokenizer folder or hub id")
    ap.add_argument("--vision-heads", type=int, default=16, help="heads of the image tower (ViT-L: 16)")
    a = ap.parse_args()
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    state = {k: v.float().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    prefix = "blip.visual_encoder."
    patch = state[prefix + "patch_embed.proj.weight"]
    width, side = patch.shape[0], patch.shape[-1]
    tokens = state[prefix + "pos_embed"].shape[1] - 1
    blocks = 1 + max(int(k[len(prefix + "blocks."):].split(".")[0]) for k in state if k.startswith(prefix + "blocks."))
    vision = dict(image_size=int(round(tokens ** 0.5)) * side, patch_size=side, hidden_size=width,
                  num_hidden_layers=blocks, num_attention_heads=a.vision_heads,
                  intermediate_size=state[prefix + "blocks.0.mlp.fc1.weight"].shape[0], layer_norm_eps=1e-6)
    med = json.loads(Path(a.med_config).read_text())
    text = {k: med[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "max_position_embeddings", "layer_norm_eps", "encoder_width")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(dict(vision=vision, text=text, max_length=35, mean=MEAN, std=STD),
                                                indent=1))
    tok = BertTokenizerFast.from_pretrained(a.tokenizer)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) != text["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tok)} tokens but med_config.json vocab_size is {text['vocab_size']}")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    side = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, resample=3,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out)


if __name__ == "__main__":
    main()

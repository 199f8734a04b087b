"""A tiny random ImageReward checkpoint in the official layout, and the scores ImageReward's own recipe
gives it, for tests/cli.rs.

Usage: make_imagereward.py OUTDIR. Writes OUTDIR/ImageReward.pt (a state dict named as the official
checkpoint: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*), OUTDIR/med_config.json,
OUTDIR/bert (a tiny bert-base-uncased stand-in: WordPiece vocab, BertTokenizerFast), OUTDIR/images/
{0,1,2}.png (one not square) and OUTDIR/scores.json: {"prompt": [score per image]} computed as
ImageReward.score does: BLIP's init_tokenizer ([DEC], [ENC] added), prompts padded to 35 tokens,
torchvision's Resize(bicubic) + CenterCrop + CLIP normalisation, the image tokens of the vision tower,
the text tower cross-attending to them, the MLP on the [CLS] state and (r - mean) / std. BLIP's towers
are transformers' BlipVisionModel and BlipTextModel (its port of BLIP's vit.py and med.py), their
weights renamed to the official names.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tokenizers import BertWordPieceTokenizer
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import BertTokenizerFast, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

PROMPTS = ["a red square on a dark ground", "A photo of a cat, highly detailed and very very very long " * 3]
MEAN, STD = 0.16717362830052426, 1.0333394966054072
SIDE, PATCH, WIDTH = 32, 8, 32
WORDS = ["a", "red", "square", "on", "dark", "ground", "photo", "of", "cat", ",", "highly", "detail", "##ed",
         "and", "very", "long", "the", "dog"]


def vision_name(name: str) -> str:
    """transformers' BlipVisionModel name → BLIP vit.py name."""
    fixed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    if name in fixed:
        return fixed[name]
    return (name.replace("encoder.layers.", "blocks.").replace("layer_norm1", "norm1")
            .replace("layer_norm2", "norm2").replace("self_attn.qkv", "attn.qkv")
            .replace("self_attn.projection", "attn.proj"))


def main():
    out = Path(sys.argv[1])
    (out / "images").mkdir(parents=True, exist_ok=True)
    bert = out / "bert"
    bert.mkdir(exist_ok=True)
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    wordpiece = BertWordPieceTokenizer(str(bert / "vocab.txt"), lowercase=True)
    BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                      pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]").save_pretrained(bert)
    # BLIP's init_tokenizer.
    tok = BertTokenizerFast.from_pretrained(bert)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    torch.manual_seed(0)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=SIDE, patch_size=PATCH,
                                              layer_norm_eps=1e-6, hidden_act="gelu")).eval()
    med = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=40, layer_norm_eps=1e-12, encoder_width=WIDTH,
               hidden_act="gelu", add_cross_attention=True)
    text = BlipTextModel(BlipTextConfig(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=WIDTH,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu",
                                        pad_token_id=0, bos_token_id=tok.bos_token_id, sep_token_id=3),
                         add_pooling_layer=False).eval()
    mlp = nn.Sequential(nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()
    with torch.no_grad():
        for p in list(vision.parameters()) + list(text.parameters()) + list(mlp.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
    state = {f"blip.visual_encoder.{vision_name(k)}": v for k, v in vision.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    # The official checkpoint also holds heads ImageReward never runs.
    state["blip.vision_proj.weight"] = torch.zeros(4, WIDTH)
    torch.save(state, out / "ImageReward.pt")
    (out / "med_config.json").write_text(json.dumps(med, indent=1))

    rng = np.random.default_rng(3)
    images = []
    for i, (h, w) in enumerate([(SIDE, SIDE), (48, 40), (70, 90)]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(out / "images" / f"{i}.png")
        images.append(img)
    transform = Compose([Resize(SIDE, interpolation=InterpolationMode.BICUBIC), CenterCrop(SIDE), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    scores = {}
    with torch.no_grad():
        pixels = torch.stack([transform(img) for img in images])
        image_embeds = vision(pixel_values=pixels).last_hidden_state
        for prompt in PROMPTS:
            t = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            n = len(images)
            states = text(input_ids=t.input_ids.repeat(n, 1), attention_mask=t.attention_mask.repeat(n, 1),
                          encoder_hidden_states=image_embeds,
                          encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long)).last_hidden_state
            rewards = (mlp(states[:, 0, :].float()) - MEAN) / STD
            scores[prompt] = rewards.squeeze(-1).tolist()
    (out / "scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()

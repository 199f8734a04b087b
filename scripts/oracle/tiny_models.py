"""Tiny random-weight diffusers components shared by the oracle scripts (test-only)."""
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import tiny_clip_vocab


def randomize(model, scale):
    """Random values everywhere (default inits zero biases): every weight must matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def text_encoder(with_projection):
    config = CLIPTextConfig(vocab_size=len(tiny_clip_vocab.VOCAB), hidden_size=32, intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                            eos_token_id=tiny_clip_vocab.EOS_ID, bos_token_id=tiny_clip_vocab.BOS_ID,
                            pad_token_id=1, projection_dim=16, hidden_act="gelu")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return randomize(cls(config), 0.1)


def tokenizer(out: Path, pad_token):
    vocab, merges = tiny_clip_vocab.write(out / "vocab")
    return CLIPTokenizer(vocab_file=str(vocab), merges_file=str(merges), pad_token=pad_token, model_max_length=77)


def vae(force_upcast):
    return randomize(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                   sample_size=32, force_upcast=force_upcast), 0.2)


def unet(**kwargs):
    return randomize(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8,
                                          block_out_channels=(32, 64), layers_per_block=1,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          use_linear_projection=True, **kwargs), 0.05)


TRAILING = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing",
                steps_offset=1)

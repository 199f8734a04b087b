"""Tiny random Z-Image models and pipelines and what diffusers / transformers make of them, for
tests/z_image.rs and tests/flow_training.rs.

Usage: make_z_image.py OUTDIR. Writes
- OUTDIR/transformer: a ZImageTransformer2DModel (config.json + safetensors) and io.safetensors:
  `x` [2, 4, 10, 6] (15 patches, padded to 32), `t` [2] (the model's 1 − σ), `cap_feats`
  [2, 37, 24] of which rows hold 5 and 37 real tokens (`cap_lens`; padded to 32 and 64, so the
  batch is masked), and the model's output `sample` [2, 4, 10, 6];
- OUTDIR/turbo and OUTDIR/cfg: ZImagePipeline folders (a byte-level BPE tokenizer with Qwen3's
  special tokens and chat template, a tiny Qwen3Model, the transformer, a 16-channel VAE, the
  scheduler: Turbo's static shift 3 / a dynamic shift by the image's token count) with
  io.safetensors: `latents` [3, 16, 12, 12] and the `images` [3, 3, 24, 24] in [0, 1] the pipeline
  returns for 2 steps at 24 x 24 with guidance 0 (turbo) / 2.0 (cfg), max_sequence_length 12; and
  per prompt i `ids_i` (the chat-formatted, truncated ids) and `embeds_i` (what `_encode_prompt`
  returns: Qwen3's hidden_states[-2] at the real positions).
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from tiny_models import randomize

PROMPTS = ["a red cat", "a photo of a dog on the grass at night", "a cat and a dog"]
MAX_SEQUENCE_LENGTH = 12
# The part of Qwen3's chat template (Qwen/Qwen3-4B tokenizer_config.json) a single user message with
# the generation prompt goes through: no system turn, no tools; thinking enabled adds nothing.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """A byte-level BPE trained on the prompts, with Qwen's special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS + ["user\nassistant\n", "a blue bird in a tree"], trainer)
    return tok, PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)


def text_encoder(vocab_size):
    torch.manual_seed(3)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    return randomize(Qwen3Model(config), 0.2)


def transformer(in_channels, cap_feat_dim, axes_lens):
    return randomize(ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=in_channels, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap_feat_dim, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=axes_lens), 0.1)


def transformer_case(out: Path):
    torch.manual_seed(0)
    model = transformer(4, 24, [96, 16, 16])
    folder = out / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 10, 6, generator=g)
    t = torch.tensor([0.3, 0.9])
    cap_feats = torch.randn(2, 37, 24, generator=g)
    cap_lens = torch.tensor([5, 37])
    cap_feats[0, 5:] = 0
    with torch.no_grad():
        result = model([row.unsqueeze(1) for row in x], t, [cap_feats[i, :n] for i, n in enumerate(cap_lens)],
                       return_dict=False)[0]
    sample = torch.stack(result).squeeze(2)
    save_file({"x": x, "t": t, "cap_feats": cap_feats, "cap_lens": cap_lens, "sample": sample.contiguous()},
              folder / "io.safetensors")


def pipeline_case(out: Path, name: str, scheduler, guidance: float):
    tok, fast = tiny_tokenizer()
    torch.manual_seed(0)
    pipe = ZImagePipeline(
        scheduler=scheduler,
        vae=randomize(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16,
                                    norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                                    shift_factor=0.1159, scaling_factor=0.3611), 0.2),
        text_encoder=text_encoder(tok.get_vocab_size()),
        tokenizer=fast,
        transformer=transformer(16, 24, [64, 16, 16]),
    )
    folder = out / name
    pipe.save_pretrained(folder, safe_serialization=True)
    latents = torch.randn(3, 16, 12, 12, generator=torch.Generator().manual_seed(2))
    io = {"latents": latents}
    with torch.no_grad():
        # A copy: the pipeline writes the chat-formatted prompts back into the list it is given.
        io["images"] = pipe(list(PROMPTS), height=24, width=24, num_inference_steps=2, guidance_scale=guidance,
                            latents=latents, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt").images
        for i, prompt in enumerate(PROMPTS):
            text = fast.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=True)
            io[f"ids_{i}"] = fast(text, truncation=True, max_length=MAX_SEQUENCE_LENGTH,
                                  return_tensors="pt").input_ids
            io[f"embeds_{i}"] = pipe._encode_prompt([prompt], device="cpu",
                                                    max_sequence_length=MAX_SEQUENCE_LENGTH)[0]
    save_file({k: v.contiguous() for k, v in io.items()}, folder / "io.safetensors")


def main():
    out = Path(sys.argv[1])
    transformer_case(out)
    pipeline_case(out, "turbo", FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), 0.0)
    pipeline_case(out, "cfg", FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15, base_image_seq_len=16,
                                                              max_image_seq_len=64), 2.0)


if __name__ == "__main__":
    main()

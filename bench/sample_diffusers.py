"""diffusers' side of bench/sample.rs: builds a small random-weight SD 2.x-like pipeline (saved to
OUT/pipeline for the Rust side) and times StableDiffusionPipeline on it.

Usage: sample_diffusers.py OUT CASES_JSON. CASES_JSON: [[steps, batch], ...]. Prints JSON
{"steps,batch": images_per_second} (best of 3 runs after a warm-up), fp32, CPU, seeded noise.
"""
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "oracle"))
import tiny_clip_vocab  # noqa: E402

out = Path(sys.argv[1])
cases = json.loads(sys.argv[2])
torch.manual_seed(0)
vocab, merges = tiny_clip_vocab.write(out / "vocab")
pipe = StableDiffusionPipeline(
    vae=AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=16),
    text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tiny_clip_vocab.VOCAB), hidden_size=64,
                                              intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                              max_position_embeddings=77, eos_token_id=tiny_clip_vocab.EOS_ID,
                                              bos_token_id=tiny_clip_vocab.BOS_ID, hidden_act="gelu")),
    tokenizer=CLIPTokenizer(vocab_file=str(vocab), merges_file=str(merges), pad_token="<|endoftext|>",
                            model_max_length=77),
    unet=UNet2DConditionModel(sample_size=32, block_out_channels=(64, 128, 128), layers_per_block=2,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                              attention_head_dim=[2, 4, 4], cross_attention_dim=64, norm_num_groups=16,
                              use_linear_projection=True),
    scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     timestep_spacing="trailing"),
    safety_checker=None, feature_extractor=None, requires_safety_checker=False,
).to(torch.float32)
pipe.set_progress_bar_config(disable=True)
pipe.save_pretrained(out / "pipeline")

result = {}
for steps, batch in cases:
    def run():
        generator = torch.Generator("cpu").manual_seed(0)
        with torch.no_grad():
            pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=0.0, height=128, width=128,
                 num_images_per_prompt=batch, generator=generator, output_type="np")
    run()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    result[f"{steps},{batch}"] = batch / best
print(json.dumps(result))

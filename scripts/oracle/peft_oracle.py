"""Oracle for the PEFT tests: tiny pipelines, and diffusers' `load_lora_weights` on a pso export.

  peft_oracle.py make OUT
      writes OUT/sd (tiny SD 2.x-like pipeline, Euler, trailing spacing), OUT/sdxl (tiny
      SDXL-like pipeline, Euler ancestral) and OUT/dit (tiny DiTPipeline, learned sigma, norm3
      with affine parameters, every block's embedding a copy of block 0's as in converted DiT
      checkpoints, DDIM).
  peft_oracle.py lora PIPELINE LORA_FILE INPUTS OUT
      loads PIPELINE, applies LORA_FILE with `pipe.load_lora_weights`, runs the UNet on INPUTS
      (`sample`, `timestep`, `encoder_hidden_states`, and for SDXL `text_embeds`, `time_ids`) and
      writes its output as `sample` to OUT.
  peft_oracle.py flow_lora PIPELINE LORA_FILE INPUTS OUT
      the same for an SD3, FLUX or Z-Image folder: `pipe.transformer` on INPUTS (`sample`
      [B, C, h, w], `timestep` (σ·1000), `encoder_hidden_states`, `pooled_projections`, FLUX-dev's
      `guidance`; FLUX packed, with its position ids; Z-Image's `cap_feats` with `cap_lens`, at its
      t = 1 − σ) and the output (FLUX unpacked; Z-Image's negated, the velocity) as `sample`.
  peft_oracle.py transformer FOLDER INPUTS OUT
      loads the DiTTransformer2DModel FOLDER (a merged export), runs it on INPUTS (`sample`,
      `timestep`, `class_labels`) and writes its output as `sample` to OUT.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FluxPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, ZImagePipeline)
from safetensors.torch import load_file, save_file

from make_dit import randomize
from tiny_models import TRAILING, text_encoder, tokenizer, unet, vae


def make(out: Path):
    torch.manual_seed(1)
    StableDiffusionPipeline(vae=vae(False), text_encoder=text_encoder(False), tokenizer=tokenizer(out, "<|endoftext|>"),
                            unet=unet(attention_head_dim=[2, 4], cross_attention_dim=32),
                            scheduler=EulerDiscreteScheduler(**TRAILING), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out / "sd")
    StableDiffusionXLPipeline(vae=vae(True), text_encoder=text_encoder(False), text_encoder_2=text_encoder(True),
                              tokenizer=tokenizer(out, "<|endoftext|>"), tokenizer_2=tokenizer(out, "!"),
                              unet=unet(attention_head_dim=[2, 4], cross_attention_dim=64,
                                        transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
                                        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
                              scheduler=EulerAncestralDiscreteScheduler(**TRAILING),
                              force_zeros_for_empty_prompt=True).save_pretrained(out / "sdxl")
    dit = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                          norm_elementwise_affine=True), 0.2)
    with torch.no_grad():
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    DiTPipeline(transformer=dit, vae=vae(False),
                scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False)).save_pretrained(out / "dit")
    index_file = out / "dit" / "model_index.json"
    index = json.loads(index_file.read_text())
    index["id2label"] = {"0": "cat, kitty", "1": "dog"}
    index_file.write_text(json.dumps(index, indent=1))


def lora(pipeline: str, lora_file: str, inputs: str, out: str):
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.load_lora_weights(lora_file)
    x = load_file(inputs)
    added = None
    if "text_embeds" in x:
        added = dict(text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    with torch.no_grad():
        sample = pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                           added_cond_kwargs=added).sample
    save_file({"sample": sample.contiguous()}, out)


def flow_lora(pipeline: str, lora_file: str, inputs: str, out: str):
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.load_lora_weights(lora_file)
    x = load_file(inputs)
    sample, t = x["sample"], x["timestep"]
    with torch.no_grad():
        if isinstance(pipe, FluxPipeline):
            b, c, h, w = sample.shape
            packed = FluxPipeline._pack_latents(sample, b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, sample.device, sample.dtype)
            txt_ids = torch.zeros(x["encoder_hidden_states"].shape[1], 3)
            result = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=x.get("guidance"),
                                      pooled_projections=x["pooled_projections"],
                                      encoder_hidden_states=x["encoder_hidden_states"], txt_ids=txt_ids,
                                      img_ids=img_ids).sample
            result = FluxPipeline._unpack_latents(result, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                                  pipe.vae_scale_factor)
        elif isinstance(pipe, ZImagePipeline):
            caps = [x["cap_feats"][i, :n] for i, n in enumerate(x["cap_lens"].tolist())]
            rows = pipe.transformer(list(sample.unsqueeze(2).unbind(0)), (1000 - t) / 1000, caps,
                                    return_dict=False)[0]
            result = -torch.stack(rows).squeeze(2)
        else:
            result = pipe.transformer(hidden_states=sample, timestep=t, pooled_projections=x["pooled_projections"],
                                      encoder_hidden_states=x["encoder_hidden_states"]).sample
    save_file({"sample": result.contiguous()}, out)


def transformer(folder: str, inputs: str, out: str):
    model = DiTTransformer2DModel.from_pretrained(folder)
    x = load_file(inputs)
    with torch.no_grad():
        sample = model(x["sample"], timestep=x["timestep"], class_labels=x["class_labels"]).sample
    save_file({"sample": sample.contiguous()}, out)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif sys.argv[1] == "lora":
        lora(*sys.argv[2:6])
    elif sys.argv[1] == "flow_lora":
        flow_lora(*sys.argv[2:6])
    elif sys.argv[1] == "transformer":
        transformer(*sys.argv[2:5])
    else:
        sys.exit(f"unknown command {sys.argv[1]}; see the docstring")

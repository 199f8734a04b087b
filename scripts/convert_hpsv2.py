"""Converts an HPSv2 / HPSv2.1 checkpoint (an OpenCLIP ViT-H/14 state dict, e.g. HPS_v2.1_compressed.pt
from the xswu/HPSv2 hub repo) into the Hugging Face CLIPModel folder `pso score --scorer hpsv2` reads.

Usage: convert_hpsv2.py CHECKPOINT.pt OUT_DIR [--vision-heads 16] [--text-heads 16] [--bpe FILE]

Writes OUT_DIR/config.json (CLIPConfig), model.safetensors, preprocessor_config.json (resize the
shorter side to the tower's size with bicubic, centre crop, OpenAI mean/std: OpenCLIP's eval
transform), and vocab.json + merges.txt (OpenCLIP's tokenizer, built from its BPE file: the one
bundled with the open_clip package, or --bpe). Sizes (widths, depths, patch, image size, context
length, vocabulary) are read off the tensors; the head counts are not in them and default to
ViT-H/14's (16 and 16; HPSv2 is a ViT-H/14). Needs torch and safetensors; open_clip only
to find its BPE file.

The score is HPSv2's: the cosine of the normalised image and text features (no logit scale).
"""
import argparse
import gzip
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def bytes_to_unicode():
    """CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(bpe_path, out, context_length, vocab_size):
    """vocab.json and merges.txt as OpenCLIP's SimpleTokenizer builds its vocabulary."""
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(p) for p in pairs)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    if len(vocab) != vocab_size:
        sys.exit(f"the BPE file gives {len(vocab)} tokens but the checkpoint embeds {vocab_size}")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": context_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                # OpenCLIP pads with id 0; the causal text tower never lets padding reach the
                # pooled end-of-text token, so any pad gives the same features.
                "pad_token": "!",
                "do_lower_case": True,
            },
            indent=2,
        )
    )


def find_bpe(explicit):
    if explicit:
        return Path(explicit)
    try:
        import open_clip
    except ImportError:
        sys.exit("give --bpe bpe_simple_vocab_16e6.txt.gz (or pip install open_clip_torch)")
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def split_qkv(state, src, dst, out):
    w, b = state[f"{src}.in_proj_weight"], state[f"{src}.in_proj_bias"]
    for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3), b.chunk(3)):
        out[f"{dst}.{name}.weight"] = wi
        out[f"{dst}.{name}.bias"] = bi


def convert_tower(state, src, dst, layers, out):
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
        split_qkv(state, f"{s}.attn", f"{d}.self_attn", out)
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{d}.{b}.weight"] = state[f"{s}.{a}.weight"]
            out[f"{d}.{b}.bias"] = state[f"{s}.{a}.bias"]


def count_layers(state, prefix):
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--bpe")
    p.add_argument("--vision-heads", type=int, default=16)
    p.add_argument("--text-heads", type=int, default=16)
    args = p.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    if "visual.conv1.weight" not in state or "text_projection" not in state:
        sys.exit(f"{args.checkpoint}: not an OpenCLIP ViT state dict (keys: {sorted(state)[:8]} ...)")

    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    v_layers = count_layers(state, "visual.transformer.resblocks.")
    t_layers = count_layers(state, "transformer.resblocks.")
    vocab, t_width = state["token_embedding.weight"].shape
    context = state["positional_embedding"].shape[0]
    embed = state["text_projection"].shape[1]
    v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    t_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]

    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    convert_tower(state, "visual.transformer", "vision_model", v_layers, out)
    convert_tower(state, "transformer", "text_model", t_layers, out)

    dst = Path(args.out)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors")
    for width, heads in ((v_width, args.vision_heads), (t_width, args.text_heads)):
        if width % heads:
            sys.exit(f"width {width} is not divisible into {heads} heads; give --vision-heads / --text-heads")
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "hidden_size": t_width,
            "intermediate_size": t_mlp,
            "num_hidden_layers": t_layers,
            "num_attention_heads": args.text_heads,
            "max_position_embeddings": context,
            "vocab_size": vocab,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": embed,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": 0,
        },
        "vision_config": {
            "hidden_size": v_width,
            "intermediate_size": v_mlp,
            "num_hidden_layers": v_layers,
            "num_attention_heads": args.vision_heads,
            "image_size": grid * patch,
            "patch_size": patch,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": embed,
        },
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    size = grid * patch
    (dst / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": size},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": size, "width": size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": OPENAI_MEAN,
                "image_std": OPENAI_STD,
                "do_convert_rgb": True,
            },
            indent=2,
        )
    )
    write_tokenizer(find_bpe(args.bpe), dst, context, vocab)
    print(f"wrote {dst}: vision {v_layers}x{v_width} (patch {patch}, {size}px), text {t_layers}x{t_width}, embed {embed}")


if __name__ == "__main__":
    main()

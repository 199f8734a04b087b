"""A tiny random T5EncoderModel (T5 v1.1 layout: gated GELU) with a tiny T5-style fast tokenizer, and
what transformers makes of three prompts, for tests/t5_parity.rs.

Usage: make_t5.py OUTDIR. Writes OUTDIR/text_encoder_3 (config.json + model.safetensors),
OUTDIR/tokenizer_3/tokenizer.json (a Unigram vocabulary with T5's Metaspace pre-tokenizer and
"$A </s>" template; <pad> 0, </s> 1, <unk> 2), and OUTDIR/io.safetensors: `ids` [3, 12] as the SD3
pipeline tokenizes (padding="max_length", max_length=12, truncation=True; the third prompt is cut)
and `hidden` [3, 12, 16], the encoder's last hidden state for those ids without an attention mask.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

MAX_LENGTH = 12
PROMPTS = ["a red cat", "A  photo of a dog on the grass", "a cat and a dog and a red bird on a tree at night"]
WORDS = ["a", "red", "cat", "photo", "of", "dog", "on", "the", "grass", "and", "bird", "tree", "at", "night"]


def tiny_t5(d_model=16):
    """A tiny T5-style fast tokenizer and a tiny random T5 v1.1 encoder of width `d_model`."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzA"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(r"  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(pieces) + 5, d_model=d_model, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                      relative_attention_max_distance=20)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return tok, fast, model


def main():
    out = Path(sys.argv[1])
    tok, fast, model = tiny_t5()
    (out / "tokenizer_3").mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer_3" / "tokenizer.json"))
    ids = fast(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, add_special_tokens=True,
               return_tensors="pt").input_ids
    model.save_pretrained(out / "text_encoder_3", safe_serialization=True)
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    save_file({"ids": ids.contiguous(), "hidden": hidden.contiguous()}, out / "io.safetensors")


if __name__ == "__main__":
    main()

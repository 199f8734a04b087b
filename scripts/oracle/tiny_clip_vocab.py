"""A small CLIP-style BPE vocabulary for test models (the real one cannot be downloaded).

Every byte char, alone and word-final, a few merges, and the two special tokens last (as in CLIP,
so the legacy argmax-of-ids pooling finds <|endoftext|>). `write(folder)` saves vocab.json and
merges.txt for `CLIPTokenizer(vocab_file, merges_file)`.
"""
import json
from pathlib import Path


def bytes_to_unicode():
    """GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


alphabet = bytes_to_unicode()
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("o", "f</w>"), ("i", "n"), ("in", "g</w>"),
          ("o", "n"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("d", "o"), ("do", "g</w>")]
VOCAB_LIST = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
VOCAB = {tok: i for i, tok in enumerate(VOCAB_LIST)}
EOS_ID = VOCAB["<|endoftext|>"]
BOS_ID = VOCAB["<|startoftext|>"]


def write(folder: Path):
    """Writes vocab.json and merges.txt into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(VOCAB, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return folder / "vocab.json", folder / "merges.txt"

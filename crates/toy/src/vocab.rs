//! The toy model's tokenizer: CLIP's byte-level BPE format (vocab.json + merges.txt, loadable
//! by transformers' `CLIPTokenizer` and by [`hf::clip::ClipTokenizer`]) with merges that
//! make every caption word a single token, so the tiny text encoder reads words, not letters.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

/// Tokens per prompt, start and end included (captions need 10).
pub const MAX_LENGTH: usize = 16;
/// CLIP's start token.
pub const BOS: &str = "<|startoftext|>";
/// CLIP's end (and padding) token.
pub const EOS: &str = "<|endoftext|>";

/// GPT-2 / CLIP byte-level alphabet: printable bytes stand for themselves, the others map
/// above U+0100, in byte order.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a byte is a char")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("below the surrogates")
            }
        })
        .collect()
}

/// The pieces BPE leaves of `word` (ASCII) under `merges` (earlier = higher priority).
fn bpe(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let mut parts: Vec<String> = word.chars().map(String::from).collect();
    if let Some(last) = parts.last_mut() {
        last.push_str("</w>");
    }
    loop {
        let best = parts
            .windows(2)
            .filter_map(|w| ranks.get(&(w[0].clone(), w[1].clone())))
            .min();
        let Some(&best) = best else { return parts };
        let mut merged = Vec::with_capacity(parts.len());
        let mut i = 0;
        while i < parts.len() {
            let pair = parts
                .get(i + 1)
                .map(|next| (parts[i].clone(), next.clone()));
            if pair.as_ref().and_then(|p| ranks.get(p)) == Some(&best) {
                merged.push(format!("{}{}", parts[i], parts[i + 1]));
                i += 2;
            } else {
                merged.push(parts[i].clone());
                i += 1;
            }
        }
        parts = merged;
    }
}

/// Merges, in priority order, after which each of `words` is one token: a word still in
/// pieces gets a merge of its first two pieces, appended last so that no earlier word changes.
fn merges_for(words: &[&str]) -> Vec<(String, String)> {
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut ranks = HashMap::new();
    for word in words {
        loop {
            let parts = bpe(word, &ranks);
            if parts.len() == 1 {
                break;
            }
            let pair = (parts[0].clone(), parts[1].clone());
            ranks.insert(pair.clone(), merges.len());
            merges.push(pair);
        }
    }
    merges
}

/// Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into
/// `dir` for `words`; returns the vocabulary size.
pub fn write(dir: &Path, words: &[&str]) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let merges = merges_for(words);
    let alphabet = byte_alphabet();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    // Special tokens last, as in CLIP (the legacy pooling takes the largest id as the end).
    tokens.extend([BOS.to_owned(), EOS.to_owned()]);
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&vocab)?)?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.join("merges.txt"), text)?;
    let specials = json!({
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    });
    let mut config = specials.clone();
    config["model_max_length"] = json!(MAX_LENGTH);
    config["tokenizer_class"] = json!("CLIPTokenizer");
    config["do_lower_case"] = json!(true);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    std::fs::write(
        dir.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&specials)?,
    )?;
    Ok(tokens.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::Attributes;
    use hf::clip::ClipTokenizer;

    #[test]
    fn every_caption_word_is_one_token_and_captions_fit() {
        let dir = tempfile::tempdir().unwrap();
        let words = Attributes::words();
        let size = write(dir.path(), &words).unwrap();
        assert_eq!(size, 512 + merges_for(&words).len() + 2);
        let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tokenizer.max_length(), MAX_LENGTH);
        for word in &words {
            let ids = &tokenizer.encode(&[word]).unwrap()[0].ids;
            // start, the word, end, then padding with the end token.
            assert_eq!(ids[0], size as u32 - 2, "{word}");
            assert_eq!(
                ids[2],
                size as u32 - 1,
                "{word} is more than one token: {ids:?}"
            );
            if word.len() > 1 {
                assert!(ids[1] >= 512, "{word} fell back to letters");
            }
        }
        let caption = "a small red circle on a blue background";
        let ids = &tokenizer.encode(&[caption]).unwrap()[0].ids;
        assert_eq!(ids.len(), MAX_LENGTH);
        assert_eq!(ids[9], size as u32 - 1, "{ids:?}");
        assert_eq!(ids[1], ids[6], "both `a` are the same token");
    }

    #[test]
    fn bpe_merges_the_highest_priority_pair_first() {
        let ranks: HashMap<_, _> = [
            (("e".into(), "d</w>".into()), 0),
            (("r".into(), "e".into()), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(bpe("red", &ranks), ["r", "ed</w>"]);
        assert_eq!(bpe("re", &HashMap::new()), ["r", "e</w>"]);
    }
}

//! Prompt embeddings kept between requests: an online run samples and trains on the same
//! prompts round after round, and T5-XXL (SD3, FLUX) or Qwen3-4B (Z-Image) on a CPU takes seconds
//! per prompt. Entries live on the CPU (so a GPU holds none of them) under a byte budget, least
//! recently used out first; a hit is bit-identical to encoding again.

use std::collections::HashMap;
use std::sync::Mutex;

use tch::{Device, Tensor};

use super::prompt::PromptEmbeds;

/// The default budget: 1 GiB, about 500 SD3 / FLUX prompts of 256 T5 tokens in bf16.
pub const DEFAULT_BUDGET_BYTES: usize = 1 << 30;

struct Entry {
    embeds: Tensor,
    pooled: Option<Tensor>,
    bytes: usize,
    last_use: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    bytes: usize,
    clock: u64,
}

/// An LRU cache of one prompt's embeddings, bounded in bytes.
pub struct PromptCache {
    budget_bytes: usize,
    inner: Mutex<Inner>,
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl PromptCache {
    /// A cache holding at most `budget_bytes` of embeddings (0 turns it off).
    pub fn new(budget_bytes: usize) -> PromptCache {
        PromptCache {
            budget_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The embeddings of `prompt` on `device`: cached, or `encode`d and cached.
    pub fn get_or_encode<E>(
        &self,
        prompt: &str,
        device: Device,
        encode: impl FnOnce() -> Result<PromptEmbeds, E>,
    ) -> Result<PromptEmbeds, E> {
        {
            let mut inner = self
                .inner
                .lock()
                .expect("the prompt cache lock is never poisoned");
            inner.clock += 1;
            let now = inner.clock;
            if let Some(e) = inner.entries.get_mut(prompt) {
                e.last_use = now;
                return Ok(PromptEmbeds {
                    embeds: e.embeds.to_device(device),
                    pooled: e.pooled.as_ref().map(|p| p.to_device(device)),
                });
            }
        }
        let fresh = encode()?;
        let entry = Entry {
            embeds: fresh.embeds.to_device(Device::Cpu),
            pooled: fresh.pooled.as_ref().map(|p| p.to_device(Device::Cpu)),
            bytes: bytes_of(&fresh.embeds) + fresh.pooled.as_ref().map_or(0, bytes_of),
            last_use: 0,
        };
        if entry.bytes <= self.budget_bytes {
            let mut inner = self
                .inner
                .lock()
                .expect("the prompt cache lock is never poisoned");
            while inner.bytes + entry.bytes > self.budget_bytes {
                let Some(oldest) = inner
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_use)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                let gone = inner
                    .entries
                    .remove(&oldest)
                    .expect("the key was just found");
                inner.bytes -= gone.bytes;
            }
            inner.bytes += entry.bytes;
            let last_use = inner.clock;
            inner
                .entries
                .insert(prompt.to_owned(), Entry { last_use, ..entry });
        }
        Ok(PromptEmbeds {
            embeds: fresh.embeds.to_device(device),
            pooled: fresh.pooled.map(|p| p.to_device(device)),
        })
    }

    /// Prompts held now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("the prompt cache lock is never poisoned")
            .entries
            .len()
    }

    /// Whether it holds no prompt.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn embeds(v: f32) -> PromptEmbeds {
        PromptEmbeds {
            embeds: Tensor::full([1, 4, 8], f64::from(v), (Kind::Float, Device::Cpu)),
            pooled: Some(Tensor::full(
                [1, 8],
                f64::from(v),
                (Kind::Float, Device::Cpu),
            )),
        }
    }

    #[test]
    fn hits_skip_the_encoder_and_the_least_recently_used_goes_first() {
        // One entry is 40 floats = 160 bytes; room for two.
        let cache = PromptCache::new(320);
        let mut calls = 0;
        let mut get = |prompt: &str, v: f32| {
            cache
                .get_or_encode::<()>(prompt, Device::Cpu, || {
                    calls += 1;
                    Ok(embeds(v))
                })
                .unwrap()
                .embeds
                .double_value(&[0, 0, 0])
        };
        assert_eq!(get("a", 1.0), 1.0);
        assert_eq!(get("b", 2.0), 2.0);
        assert_eq!(get("a", 9.0), 1.0, "a hit returns the cached embedding");
        assert_eq!(get("c", 3.0), 3.0); // evicts b, the least recently used
        assert_eq!(get("a", 9.0), 1.0);
        assert_eq!(get("b", 4.0), 4.0, "b was evicted and encoded again");
        assert_eq!(calls, 4);
        assert_eq!(cache.len(), 2);
        let off = PromptCache::new(0);
        for _ in 0..2 {
            off.get_or_encode::<()>("a", Device::Cpu, || Ok(embeds(1.0)))
                .unwrap();
        }
        assert!(off.is_empty());
    }
}

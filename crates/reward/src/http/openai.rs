//! A VLM judge as a scorer: any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API)
//! serving a vision-language model is asked to rate each image for its prompt, and the number in
//! its answer is the score. HPSv3, UnifiedReward or a plain Qwen-VL judge are served this way.
//!
//! The rules are those of the protocol v1 client: a reply that is not a valid chat completion,
//! holds no number, or a non-finite one fails its item after the retries, and a failed item
//! fails the whole batch, so no pair is labelled from a partial answer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::client::encode_png;
use crate::{check_scores, RewardError, ScoreItem, Scorer, ScorerInfo};

/// A judge's config file (`--scorer openai --model judge.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:8000/v1`.
    pub url: String,
    /// The served model's name, as the endpoint's `/models` lists it.
    pub model: String,
    /// The question, with `{prompt}` where the image's prompt goes; the image follows it.
    pub template: String,
    /// The score is the first number after this text in the answer ("" = the first number).
    #[serde(default)]
    pub score_after: String,
    /// Whether larger numbers mean better images.
    #[serde(default = "yes")]
    pub higher_is_better: bool,
    /// `max_tokens` of each completion.
    #[serde(default = "sixteen")]
    pub max_tokens: u32,
    /// Sampling temperature (0: the same answer every time).
    #[serde(default)]
    pub temperature: f64,
    /// Limit on one request, connecting to the last byte of the answer.
    #[serde(default = "two_minutes")]
    pub timeout_seconds: f64,
    /// Attempts per item, the first included.
    #[serde(default = "three")]
    pub max_attempts: u32,
    /// Items asked at once.
    #[serde(default = "eight")]
    pub max_concurrency: usize,
}

fn yes() -> bool {
    true
}
fn sixteen() -> u32 {
    16
}
fn two_minutes() -> f64 {
    120.0
}
fn three() -> u32 {
    3
}
fn eight() -> usize {
    8
}

impl JudgeConfig {
    /// Reads and checks a judge file.
    pub fn load(path: &Path) -> Result<JudgeConfig, RewardError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RewardError::Config(format!(
                "cannot read the judge file {}: {e}; `--scorer openai` takes a TOML file with \
                 url, model and template (docs/reward-protocol.md)",
                path.display()
            ))
        })?;
        let config: JudgeConfig = toml::from_str(&text)
            .map_err(|e| RewardError::Config(format!("judge file {}: {e}", path.display())))?;
        let problem = if !(config.url.starts_with("http://") || config.url.starts_with("https://"))
        {
            Some(format!("url = {:?} is not an http(s) URL", config.url))
        } else if !config.template.contains("{prompt}") {
            Some("template has no {prompt}: the judge would not see what the image is for".into())
        } else if !(config.timeout_seconds.is_finite() && config.timeout_seconds > 0.0) {
            Some(format!(
                "timeout_seconds = {} is not positive",
                config.timeout_seconds
            ))
        } else if config.max_attempts == 0 || config.max_concurrency == 0 || config.max_tokens == 0
        {
            Some("max_attempts, max_concurrency and max_tokens must be at least 1".into())
        } else {
            None
        };
        match problem {
            Some(why) => Err(RewardError::Config(format!(
                "judge file {}: {why}",
                path.display()
            ))),
            None => Ok(config),
        }
    }
}

/// The judge as a [`Scorer`].
#[derive(Debug, Clone)]
pub struct OpenAiJudge {
    client: reqwest::Client,
    config: Arc<JudgeConfig>,
    token: Option<String>,
    permits: Arc<Semaphore>,
}

/// Why one attempt failed: `Retry` may succeed on another attempt, `Fatal` will not.
enum Attempt {
    Retry(String),
    Fatal(String),
}

/// Largest answer read: a chat completion of a few tokens is far smaller.
const MAX_REPLY_BYTES: usize = 1 << 20;

impl OpenAiJudge {
    /// A judge from its config; `token` is sent as the API key (`Authorization: Bearer`).
    pub fn new(config: JudgeConfig, token: Option<String>) -> Result<OpenAiJudge, RewardError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| RewardError::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(OpenAiJudge {
            client,
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            config: Arc::new(config),
            token,
        })
    }

    /// Asks about one image, with retries; the error names the endpoint and the last cause.
    async fn ask(&self, prompt: &str, image_base64: &str) -> Result<f32, String> {
        let c = &self.config;
        let body = json!({
            "model": c.model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": c.template.replace("{prompt}", prompt)},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image_base64}")}},
            ]}],
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
        });
        let url = format!("{}/chat/completions", c.url.trim_end_matches('/'));
        let mut last = String::new();
        for attempt in 1..=c.max_attempts {
            let outcome = {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                let timeout = Duration::from_secs_f64(c.timeout_seconds);
                match tokio::time::timeout(timeout, self.exchange(&url, &body)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Attempt::Retry(format!("timed out after {timeout:?}"))),
                }
            };
            match outcome {
                Ok(score) => return Ok(score),
                Err(Attempt::Fatal(why)) => return Err(format!("POST {url}: {why}")),
                Err(Attempt::Retry(why)) => last = why,
            }
            if attempt < c.max_attempts {
                let backoff =
                    0.25 * 2f64.powi(attempt as i32 - 1) * rand::rng().random_range(0.5..1.0);
                tokio::time::sleep(Duration::from_secs_f64(backoff.min(10.0))).await;
            }
        }
        Err(format!(
            "POST {url} failed after {} attempts; last error: {last}",
            c.max_attempts
        ))
    }

    async fn exchange(&self, url: &str, body: &serde_json::Value) -> Result<f32, Attempt> {
        let mut request = self.client.post(url).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Attempt::Retry(format!("reading the answer: {e}")))?
        {
            if bytes.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(Attempt::Fatal(format!(
                    "the answer runs past {MAX_REPLY_BYTES} bytes; is this a chat completions endpoint?"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            let shown: String = text.chars().take(300).collect();
            let retry = status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT;
            let why = format!("answered {status}: {shown}");
            return Err(if retry {
                Attempt::Retry(why)
            } else {
                Attempt::Fatal(match status {
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        format!("{why}; pass the API key with --token-file or PSO_REWARD_TOKEN")
                    }
                    _ => why,
                })
            });
        }
        let completion: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Attempt::Retry(format!("the answer is not chat-completion JSON ({e})")))?;
        let content = completion["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| Attempt::Retry("the answer has no choices[0].message.content".into()))?;
        let score = parse_score(content, &self.config.score_after).ok_or_else(|| {
            Attempt::Retry(format!(
                "no number{} in the judge's answer {content:?}",
                if self.config.score_after.is_empty() {
                    String::new()
                } else {
                    format!(" after {:?}", self.config.score_after)
                }
            ))
        })?;
        if !(score.is_finite() && score.abs() <= f32::MAX as f64) {
            return Err(Attempt::Retry(format!(
                "the judge's score {score} is not a finite number"
            )));
        }
        Ok(score as f32)
    }
}

/// The first decimal number in `text` after `marker` (anywhere when the marker is empty).
fn parse_score(text: &str, marker: &str) -> Option<f64> {
    let rest = if marker.is_empty() {
        text
    } else {
        &text[text.find(marker)? + marker.len()..]
    };
    let bytes = rest.as_bytes();
    let start = (0..bytes.len()).find(|&i| {
        bytes[i].is_ascii_digit()
            || (matches!(bytes[i], b'-' | b'+' | b'.')
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
    })?;
    let mut end = start + 1;
    while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
        end += 1;
    }
    rest[start..end].trim_end_matches('.').parse().ok()
}

#[async_trait]
impl Scorer for OpenAiJudge {
    fn info(&self) -> ScorerInfo {
        ScorerInfo {
            name: "openai".into(),
            version: format!("{}@{}", self.config.model, self.config.url),
            higher_is_better: self.config.higher_is_better,
        }
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        let mut tasks = JoinSet::new();
        for (index, item) in items.iter().enumerate() {
            let (judge, prompt, image) = (
                self.clone(),
                item.prompt.to_owned(),
                encode_png(item.image)?,
            );
            tasks.spawn(async move { (index, judge.ask(&prompt, &image).await) });
        }
        let mut scores = vec![f32::NAN; items.len()];
        while let Some(joined) = tasks.join_next().await {
            let (index, result) = joined
                .map_err(|e| RewardError::Config(format!("a judge request task failed: {e}")))?;
            scores[index] = result.map_err(|why| {
                RewardError::Config(format!(
                    "judge {} on item {index} (prompt {:?}): {why}",
                    self.info(),
                    items[index].prompt
                ))
            })?;
        }
        check_scores(&self.info(), items, scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_the_first_number_after_the_marker() {
        assert_eq!(parse_score("7", ""), Some(7.0));
        assert_eq!(parse_score("I'd say 8.5/10.", ""), Some(8.5));
        assert_eq!(
            parse_score("Step 1: look. Score: -2.25", "Score:"),
            Some(-2.25)
        );
        assert_eq!(parse_score("Rating 3. Score: 9", "Score:"), Some(9.0));
        assert_eq!(parse_score("no idea", ""), None);
        assert_eq!(parse_score("Score: none", "Score:"), None);
        assert_eq!(parse_score("7 but no marker", "Score:"), None);
    }
}

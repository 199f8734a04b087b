//! A [`Scorer`] that calls a remote reward server over protocol v1: bounded retries with
//! exponential backoff and jitter, a concurrency limit, batch splitting to the server's
//! `max_batch`, and strict checking of every reply, so that no pair is labelled from a partial or
//! malformed response.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::ImageEncoder;
use rand::Rng;
use reqwest::{Method, StatusCode};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{
    ErrorBody, Health, HttpError, ScoreRequest, ScoreResponse, WireItem, WireScorer,
    PROTOCOL_VERSION,
};
use crate::{check_scores, RewardError, ScoreItem, Scorer, ScorerInfo};

/// How the client talks to the server.
#[derive(Debug, Clone)]
pub struct HttpScorerOptions {
    /// Limit on one request, from connecting to the last byte of the reply.
    pub timeout: Duration,
    /// Limit on opening a connection.
    pub connect_timeout: Duration,
    /// Attempts per request, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled for each further one.
    pub backoff_base: Duration,
    /// Upper bound on one backoff.
    pub backoff_max: Duration,
    /// Most requests in flight at once from this client.
    pub max_concurrency: usize,
    /// Bearer token sent as `Authorization: Bearer …`.
    pub token: Option<String>,
    /// Largest reply body accepted; `None` derives it from the request:
    /// [`reply_limit`] bytes for a request of that many items.
    pub max_reply_bytes: Option<usize>,
}

/// The default cap on a reply to a request of `items` items: 1 MiB for the scorer identity and
/// an error message, plus 1 KiB per score (a JSON number needs at most 25).
pub fn reply_limit(items: usize) -> usize {
    (1 << 20) + items.saturating_mul(1 << 10)
}

impl Default for HttpScorerOptions {
    fn default() -> Self {
        HttpScorerOptions {
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            max_attempts: 5,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            max_concurrency: 4,
            token: None,
            max_reply_bytes: None,
        }
    }
}

/// A remote scorer. Built by [`HttpScorer::connect`], which reads the server's identity and
/// `max_batch` from `GET /v1/health`.
#[derive(Debug, Clone)]
pub struct HttpScorer {
    client: reqwest::Client,
    base: String,
    options: HttpScorerOptions,
    info: ScorerInfo,
    max_batch: usize,
    permits: Arc<Semaphore>,
}

/// Why one attempt failed: `Retry` may succeed on another attempt, `Fatal` will not.
enum AttemptError {
    Retry(String),
    Fatal(HttpError),
}

impl HttpScorer {
    /// Connects to a server at `url` (`http://host:port`, optionally with a path prefix) and
    /// checks that it speaks protocol v1.
    pub async fn connect(url: &str, options: HttpScorerOptions) -> Result<Self, HttpError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| HttpError::Url {
            url: url.to_owned(),
            why: format!("{e}; expected e.g. http://127.0.0.1:8787"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(HttpError::Url {
                url: url.to_owned(),
                why: "the scheme must be http or https".into(),
            });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| HttpError::Url {
                url: url.to_owned(),
                why: format!("cannot build an HTTP client: {e}"),
            })?;
        let mut scorer = HttpScorer {
            client,
            base: url.trim_end_matches('/').to_owned(),
            permits: Arc::new(Semaphore::new(options.max_concurrency.max(1))),
            options,
            info: ScorerInfo {
                name: String::new(),
                version: String::new(),
                higher_is_better: true,
            },
            max_batch: 1,
        };
        let health: Health = scorer
            .call_checked(Method::GET, "/v1/health", None, |bytes| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    AttemptError::Retry(format!("the reply is not protocol v1 health JSON ({e})"))
                })
            })
            .await?;
        if health.protocol != PROTOCOL_VERSION {
            return Err(HttpError::Incompatible {
                url: scorer.base.clone(),
                why: format!(
                    "the server speaks protocol {}, this client speaks {PROTOCOL_VERSION}",
                    health.protocol
                ),
            });
        }
        if health.max_batch == 0 {
            return Err(HttpError::Incompatible {
                url: scorer.base.clone(),
                why: "the server reports max_batch 0".into(),
            });
        }
        scorer.max_batch = health.max_batch;
        scorer.info = ScorerInfo {
            name: health.name,
            version: health.version,
            higher_is_better: health.higher_is_better,
        };
        Ok(scorer)
    }

    /// The server's `max_batch`: larger batches are split into requests of at most this size.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends one request with retries. `check` validates a 2xx body; a body it rejects counts as
    /// a failed attempt (retried), since a truncated or corrupted reply may be transient.
    async fn call_checked<T>(
        &self,
        method: Method,
        path: &str,
        body: Option<(Arc<Vec<u8>>, usize)>,
        check: impl Fn(Vec<u8>) -> Result<T, AttemptError>,
    ) -> Result<T, HttpError> {
        let url = format!("{}{path}", self.base);
        let method_name = if method == Method::GET { "GET" } else { "POST" };
        let attempts = self.options.max_attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            let result = match self.attempt(&method, &url, body.clone()).await {
                Ok(bytes) => check(bytes),
                Err(e) => Err(e),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Retry(cause)) => last = cause,
            }
            if attempt < attempts {
                tokio::time::sleep(self.backoff(attempt)).await;
            }
        }
        Err(HttpError::Exhausted {
            method: method_name,
            url,
            attempts,
            last,
        })
    }

    /// One HTTP exchange under the concurrency limit, with the per-request timeout covering
    /// everything up to the reply's last byte, and the reply capped in size.
    async fn attempt(
        &self,
        method: &Method,
        url: &str,
        body: Option<(Arc<Vec<u8>>, usize)>,
    ) -> Result<Vec<u8>, AttemptError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let items = body.as_ref().map_or(0, |(_, n)| *n);
        let limit = self
            .options
            .max_reply_bytes
            .unwrap_or_else(|| reply_limit(items));
        let exchange = self.exchange(method, url, body.map(|(b, _)| b), limit);
        match tokio::time::timeout(self.options.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::Retry(format!(
                "timed out after {:?}",
                self.options.timeout
            ))),
        }
    }

    /// Sends the request and reads at most `limit` bytes of the reply.
    async fn exchange(
        &self,
        method: &Method,
        url: &str,
        body: Option<Arc<Vec<u8>>>,
        limit: usize,
    ) -> Result<Vec<u8>, AttemptError> {
        let mut request = self
            .client
            .request(method.clone(), url)
            .timeout(self.options.timeout);
        if let Some(token) = &self.options.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.as_ref().clone());
        }
        let describe = |e: reqwest::Error| {
            if e.is_timeout() {
                format!("timed out after {:?}", self.options.timeout)
            } else {
                // The source chain holds the useful part (connection refused, reset, EOF).
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    message = format!("{message}: {s}");
                    source = s.source();
                }
                message
            }
        };
        let method_name = if *method == Method::GET {
            "GET"
        } else {
            "POST"
        };
        // A reply this large is not protocol v1: retrying would only repeat it.
        let too_large = |what: String| {
            AttemptError::Fatal(HttpError::Incompatible {
                url: self.base.clone(),
                why: format!(
                    "the reply to {method_name} {url} {what}, over the client's limit of {limit} \
                     bytes; is this a pso reward server? (HttpScorerOptions::max_reply_bytes \
                     raises the limit)"
                ),
            })
        };
        let mut response = request
            .send()
            .await
            .map_err(|e| AttemptError::Retry(describe(e)))?;
        let status = response.status();
        if let Some(announced) = response.content_length() {
            if announced > limit as u64 {
                return Err(too_large(format!("announces {announced} bytes")));
            }
        }
        // Streamed under the cap; a body cut short by a dropped connection fails here, never
        // parses as a short reply.
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| AttemptError::Retry(format!("reading the reply body: {}", describe(e))))?
        {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large(format!(
                    "runs past {} bytes",
                    bytes.len() + chunk.len()
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        let retryable = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        if retryable {
            return Err(AttemptError::Retry(format!(
                "server answered {status}: {message}"
            )));
        }
        let hint = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                "; pass the server's token with --token-file or PSO_REWARD_TOKEN"
            }
            StatusCode::PAYLOAD_TOO_LARGE => "; send smaller images or raise the server's limits",
            StatusCode::NOT_FOUND => "; is this a pso reward server (protocol v1)?",
            _ => "",
        };
        Err(AttemptError::Fatal(HttpError::Rejected {
            method: method_name,
            url: url.to_owned(),
            status: status.to_string(),
            message,
            hint,
        }))
    }

    /// Exponential backoff with jitter: `base * 2^(attempt-1)`, capped, times a random factor in
    /// [0.5, 1) so that clients that failed together do not retry together.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .options
            .backoff_base
            .saturating_mul(1u32 << (attempt - 1).min(20));
        let capped = exp.min(self.options.backoff_max);
        capped.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    /// Scores one chunk of at most `max_batch` items, retrying the whole chunk on any fault.
    async fn score_chunk(&self, body: Arc<Vec<u8>>, items: usize) -> Result<Vec<f32>, HttpError> {
        let expected = WireScorer {
            name: self.info.name.clone(),
            version: self.info.version.clone(),
            higher_is_better: self.info.higher_is_better,
        };
        let url = self.base.clone();
        self.call_checked(Method::POST, "/v1/score", Some((body, items)), |bytes| {
            let reply: ScoreResponse = serde_json::from_slice(&bytes).map_err(|e| {
                AttemptError::Retry(format!(
                    "the reply is not valid score JSON ({e}); first bytes: {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(120)])
                ))
            })?;
            if reply.scorer != expected {
                return Err(AttemptError::Fatal(HttpError::Incompatible {
                    url: url.clone(),
                    why: format!(
                        "scores came from {} but the server was {} at connect; reconnect to \
                         label pairs with the right scorer",
                        describe(&reply.scorer),
                        describe(&expected)
                    ),
                }));
            }
            if reply.scores.len() != items {
                return Err(AttemptError::Retry(format!(
                    "the reply holds {} scores for {items} items",
                    reply.scores.len()
                )));
            }
            if let Some((index, value)) = reply
                .scores
                .iter()
                .enumerate()
                .find(|(_, s)| !(s.is_finite() && s.abs() <= f32::MAX as f64))
            {
                return Err(AttemptError::Retry(format!(
                    "the reply holds a non-finite or out-of-range score {value} for item {index}"
                )));
            }
            Ok(reply.scores.iter().map(|&s| s as f32).collect())
        })
        .await
    }
}

/// A scorer as the protocol names it, every field shown, so two that differ read differently.
fn describe(scorer: &WireScorer) -> String {
    format!(
        "{} ({}, higher_is_better = {})",
        scorer.name, scorer.version, scorer.higher_is_better
    )
}

/// PNG-encodes an image (fast compression: the bytes cross a local network, not a disk) and
/// returns it in standard base64.
pub(crate) fn encode_png(image: &image::RgbImage) -> Result<String, RewardError> {
    let mut png = Vec::new();
    PngEncoder::new_with_quality(
        Cursor::new(&mut png),
        CompressionType::Fast,
        FilterType::Sub,
    )
    .write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| RewardError::Config(format!("cannot PNG-encode an image to send: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

#[async_trait]
impl Scorer for HttpScorer {
    fn info(&self) -> ScorerInfo {
        self.info.clone()
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut bodies = Vec::new();
        for chunk in items.chunks(self.max_batch) {
            let request = ScoreRequest {
                items: chunk
                    .iter()
                    .map(|it| {
                        Ok(WireItem {
                            prompt: it.prompt.to_owned(),
                            image: encode_png(it.image)?,
                        })
                    })
                    .collect::<Result<_, RewardError>>()?,
            };
            let body = serde_json::to_vec(&request).expect("a score request serializes");
            bodies.push((Arc::new(body), chunk.len()));
        }
        if bodies.len() == 1 {
            let (body, n) = bodies.pop().expect("one body");
            let scores = self.score_chunk(body, n).await?;
            return check_scores(&self.info, items, scores);
        }
        // Chunks go out concurrently (bounded by the semaphore); all must succeed.
        let mut tasks = JoinSet::new();
        for (index, (body, n)) in bodies.into_iter().enumerate() {
            // Clones share the connection pool and the concurrency limit.
            let this = self.clone();
            tasks.spawn(async move { (index, this.score_chunk(body, n).await) });
        }
        let mut parts: Vec<Option<Vec<f32>>> = vec![None; tasks.len()];
        while let Some(joined) = tasks.join_next().await {
            let (index, result) = joined.map_err(|e| {
                RewardError::Config(format!("a scoring task for {} failed: {e}", self.base))
            })?;
            parts[index] = Some(result?);
        }
        let scores = parts.into_iter().flatten().flatten().collect();
        check_scores(&self.info, items, scores)
    }
}

//! The HTTP reward protocol, version 1 (docs/reward-protocol.md): a client that implements
//! [`Scorer`](crate::Scorer) against a remote server, and a server that exposes any scorer.

pub mod client;
pub mod openai;
pub mod pool;
pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use client::{reply_limit, HttpScorer, HttpScorerOptions};
pub use openai::{JudgeConfig, OpenAiJudge};
pub use pool::HttpPool;
pub use server::{bind, serve, shutdown_signal, ServerOptions};

/// The protocol version this crate speaks; `GET /v1/health` reports it as `protocol`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Environment variable holding the bearer token when no token file is given.
pub const TOKEN_ENV: &str = "PSO_REWARD_TOKEN";

/// One item of a `POST /v1/score` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireItem {
    /// The prompt.
    pub prompt: String,
    /// The image, PNG or JPEG bytes in standard base64 (padding optional).
    pub image: String,
}

/// The body of `POST /v1/score`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreRequest {
    /// Items to score, in order.
    pub items: Vec<WireItem>,
}

/// The scorer identity as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireScorer {
    /// Scorer kind, e.g. `pickscore`.
    pub name: String,
    /// Model identity.
    pub version: String,
    /// Whether larger scores mean better images.
    pub higher_is_better: bool,
}

/// The body of a successful `POST /v1/score` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreResponse {
    /// One score per item, in request order. Parsed as f64 so that an out-of-range value is
    /// caught as such instead of silently becoming an f32 infinity.
    pub scores: Vec<f64>,
    /// Which scorer produced them.
    pub scorer: WireScorer,
}

/// The body of `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// Scorer kind.
    pub name: String,
    /// Model identity.
    pub version: String,
    /// Whether larger scores mean better images.
    pub higher_is_better: bool,
    /// Most items the server accepts in one `POST /v1/score`.
    pub max_batch: usize,
    /// Protocol version.
    pub protocol: u32,
}

/// The body of every error reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

/// Errors of the HTTP client, the server and token loading.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server URL cannot be used.
    #[error("reward server URL {url:?}: {why}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The token file could not be read or is empty.
    #[error("bearer token file {path}: {why}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The server answered with a 4xx status: the request itself is wrong, so it is not retried.
    #[error("{method} {url} was rejected with {status}: {message}{hint}")]
    Rejected {
        /// HTTP method.
        method: &'static str,
        /// Full request URL.
        url: String,
        /// Status code and reason.
        status: String,
        /// The server's `error` message (or raw body).
        message: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// Every attempt failed with a retryable cause (timeout, connection error, 5xx, bad reply).
    #[error(
        "{method} {url} failed after {attempts} attempts (retry budget spent); last error: {last}"
    )]
    Exhausted {
        /// HTTP method.
        method: &'static str,
        /// Full request URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's cause.
        last: String,
    },
    /// The server speaks another protocol or changed scorer since the client connected.
    #[error("reward server {url}: {why}")]
    Incompatible {
        /// Server base URL.
        url: String,
        /// What does not match.
        why: String,
    },
    /// The server could not bind or serve.
    #[error("reward server on {addr}: {why}")]
    Serve {
        /// Listen address.
        addr: String,
        /// What went wrong.
        why: String,
    },
}

/// Reads the bearer token: from `file` if given, else from `PSO_REWARD_TOKEN`; `None` if neither
/// is set. Surrounding whitespace (a trailing newline) is not part of the token.
pub fn load_token(file: Option<&Path>) -> Result<Option<String>, HttpError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| HttpError::Token {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(HttpError::Token {
                path: path.to_owned(),
                why: "the file is empty; write the token on its first line".into(),
            });
        }
        return Ok(Some(token.to_owned()));
    }
    Ok(std::env::var(TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

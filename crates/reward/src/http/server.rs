//! Serves any [`Scorer`] over protocol v1. Requests are decoded concurrently; their items meet in
//! a batching queue that fills a device batch (up to `max_batch` items, or whatever arrived within
//! `batch_window`) and scores it in one call on a dedicated thread, so the model never blocks
//! the HTTP runtime and concurrent clients share forward passes.

use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use image::RgbImage;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::{
    ErrorBody, Health, HttpError, ScoreRequest, ScoreResponse, WireScorer, PROTOCOL_VERSION,
};
use crate::{score_checked, ScoreItem, Scorer, ScorerInfo};

/// Limits and batching of the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Bearer token every request must carry; `None` serves without authentication.
    pub token: Option<String>,
    /// Most items in one scorer call, and in one request.
    pub max_batch: usize,
    /// How long the first queued item waits for others to fill the batch.
    pub batch_window: Duration,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Largest encoded (PNG/JPEG) image in bytes, after base64 decoding.
    pub max_image_bytes: usize,
    /// Largest image width or height in pixels (guards against decompression bombs).
    pub max_image_side: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            token: None,
            max_batch: 16,
            batch_window: Duration::from_millis(5),
            max_body_bytes: 64 << 20,
            max_image_bytes: 16 << 20,
            max_image_side: 4096,
        }
    }
}

/// Items of one request waiting in the queue, and where their scores go.
struct Job {
    items: Vec<(String, RgbImage)>,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

struct AppState {
    info: ScorerInfo,
    options: ServerOptions,
    queue: mpsc::Sender<Job>,
}

/// An error reply: a status and a message in `{"error": …}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Serves `scorer` on `listener` until `shutdown` completes, then finishes the requests in
/// flight and returns.
pub async fn serve(
    listener: TcpListener,
    scorer: Box<dyn Scorer>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    if options.max_batch == 0 {
        return Err(HttpError::Serve {
            addr,
            why: "max_batch must be at least 1".into(),
        });
    }
    let info = scorer.info();
    // Room for a few full batches: beyond that, requests wait for the scorer (backpressure).
    let (queue, jobs) = mpsc::channel(4 * options.max_batch);
    let batcher = std::thread::Builder::new()
        .name("reward-batcher".into())
        .spawn({
            let (max_batch, window) = (options.max_batch, options.batch_window);
            move || run_batcher(scorer, jobs, max_batch, window)
        })
        .map_err(|e| HttpError::Serve {
            addr: addr.clone(),
            why: format!("cannot start the batching thread: {e}"),
        })?;
    let state = Arc::new(AppState {
        info,
        options: options.clone(),
        queue,
    });
    let app = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/score", post(score))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; protocol v1 has GET /v1/health and POST /v1/score".into(),
            )
        })
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| HttpError::Serve {
            addr: addr.clone(),
            why: e.to_string(),
        });
    // The router (and with it the queue's sender) is gone: the batcher drains and exits.
    batcher.join().map_err(|_| HttpError::Serve {
        addr,
        why: "the scorer thread panicked".into(),
    })?;
    served
}

/// Installs the Ctrl-C and SIGTERM handlers now (call it inside the runtime, before announcing
/// the address: a signal sent right after "listening" must stop the server cleanly, not kill
/// it) and returns a future that completes on either.
#[cfg(unix)]
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    // A handler that cannot be installed never fires; the other one still stops the server.
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    async fn received(s: Option<&mut tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    async move {
        tokio::select! {
            _ = received(interrupt.as_mut()) => {},
            _ = received(terminate.as_mut()) => {},
        }
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The batching loop, on its own thread: the scorer may compute on the calling thread.
fn run_batcher(
    scorer: Box<dyn Scorer>,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    window: Duration,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds");
    let mut carried: Option<Job> = None;
    while let Some(batch) = runtime.block_on(next_batch(&mut jobs, &mut carried, max_batch, window))
    {
        let items: Vec<ScoreItem> = batch
            .iter()
            .flat_map(|job| {
                job.items
                    .iter()
                    .map(|(prompt, image)| ScoreItem { prompt, image })
            })
            .collect();
        // libtorch errors surface as panics in tch: answer 500 and keep serving.
        let scored = std::panic::catch_unwind(AssertUnwindSafe(|| {
            runtime.block_on(score_checked(scorer.as_ref(), &items))
        }));
        let result = match scored {
            Ok(Ok(scores)) => Ok(scores),
            Ok(Err(e)) => Err(format!("scorer {} failed: {e}", scorer.info())),
            Err(panic) => Err(format!(
                "scorer {} panicked: {}",
                scorer.info(),
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        };
        match result {
            Ok(scores) => {
                let mut rest = scores.as_slice();
                for job in batch {
                    let (mine, tail) = rest.split_at(job.items.len());
                    rest = tail;
                    // A client that went away no longer wants its scores.
                    let _ = job.reply.send(Ok(mine.to_vec()));
                }
            }
            Err(message) => {
                for job in batch {
                    let _ = job.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

/// Waits for the next job, then gathers more until `max_batch` items or `window` has passed.
/// A job that would overflow the batch is carried to the next one. `None` once the server is
/// gone and the queue is empty.
async fn next_batch(
    jobs: &mut mpsc::Receiver<Job>,
    carried: &mut Option<Job>,
    max_batch: usize,
    window: Duration,
) -> Option<Vec<Job>> {
    let first = match carried.take() {
        Some(job) => job,
        None => jobs.recv().await?,
    };
    let mut count = first.items.len();
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + window;
    while count < max_batch {
        match tokio::time::timeout_at(deadline, jobs.recv()).await {
            Ok(Some(job)) if count + job.items.len() > max_batch => {
                *carried = Some(job);
                break;
            }
            Ok(Some(job)) => {
                count += job.items.len();
                batch.push(job);
            }
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

fn check_token(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.options.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The auth scheme is case-insensitive (RFC 9110 §11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match given {
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send `Authorization: Bearer <token>`".into(),
        )),
        Some(token) if !constant_time_eq(token.trim().as_bytes(), expected.as_bytes()) => Err(
            ApiError(StatusCode::UNAUTHORIZED, "wrong bearer token".into()),
        ),
        Some(_) => Ok(()),
    }
}

/// Compares without an early exit, so response timing does not reveal the token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Health>, ApiError> {
    check_token(&state, &headers)?;
    Ok(Json(Health {
        name: state.info.name.clone(),
        version: state.info.version.clone(),
        higher_is_better: state.info.higher_is_better,
        max_batch: state.options.max_batch,
        protocol: PROTOCOL_VERSION,
    }))
}

async fn score(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<ScoreResponse>, ApiError> {
    check_token(&state, &headers)?;
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the server's limit of {} bytes; send fewer or smaller images",
                state.options.max_body_bytes
            ),
        ),
        other => ApiError(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {other}"),
        ),
    })?;
    let request: ScoreRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body is not a protocol v1 score request ({e}); expected {{\"items\": [{{\"prompt\": \"…\", \"image\": \"<base64 PNG or JPEG>\"}}]}}"),
        )
    })?;
    drop(body);
    let n = request.items.len();
    if n > state.options.max_batch {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{n} items exceed the server's max_batch of {}; split the request (GET /v1/health reports max_batch)",
                state.options.max_batch
            ),
        ));
    }
    let wire_scorer = WireScorer {
        name: state.info.name.clone(),
        version: state.info.version.clone(),
        higher_is_better: state.info.higher_is_better,
    };
    if n == 0 {
        return Ok(Json(ScoreResponse {
            scores: Vec::new(),
            scorer: wire_scorer,
        }));
    }
    // Decoding is CPU work: keep it off the async workers.
    let options = state.options.clone();
    let items = tokio::task::spawn_blocking(move || decode_items(request, &options))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("decoding panicked: {e}"),
            )
        })??;
    let (reply, scores) = oneshot::channel();
    state.queue.send(Job { items, reply }).await.map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".into(),
        )
    })?;
    let scores = scores
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scorer thread stopped before answering".into(),
            )
        })?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(ScoreResponse {
        scores: scores.into_iter().map(f64::from).collect(),
        scorer: wire_scorer,
    }))
}

fn decode_items(
    request: ScoreRequest,
    options: &ServerOptions,
) -> Result<Vec<(String, RgbImage)>, ApiError> {
    // Padding is optional so that clients may strip it; the alphabet is the standard one.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    request
        .items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            // base64 holds 3 bytes per 4 characters: reject before decoding a huge string.
            if item.image.len() / 4 * 3 > options.max_image_bytes + 3 {
                return Err(ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "item {index}: image of about {} bytes exceeds the server's per-image limit of {} bytes",
                        item.image.len() / 4 * 3,
                        options.max_image_bytes
                    ),
                ));
            }
            let bytes = engine.decode(item.image.trim()).map_err(|e| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("item {index}: image is not valid base64: {e}"),
                )
            })?;
            if bytes.len() > options.max_image_bytes {
                return Err(ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "item {index}: image of {} bytes exceeds the server's per-image limit of {} bytes",
                        bytes.len(),
                        options.max_image_bytes
                    ),
                ));
            }
            let image = decode_image(&bytes, options.max_image_side).map_err(|why| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("item {index}: cannot decode the image (PNG or JPEG expected): {why}"),
                )
            })?;
            Ok((item.prompt, image))
        })
        .collect()
}

fn decode_image(bytes: &[u8], max_side: u32) -> Result<RgbImage, String> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    reader.limits(limits);
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        Some(other) => return Err(format!("{other:?} images are not accepted")),
        None => return Err("unknown image format".into()),
    }
    Ok(reader.decode().map_err(|e| e.to_string())?.to_rgb8())
}

/// Binds `addr` (e.g. `127.0.0.1:8787`; port 0 picks a free one).
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| HttpError::Serve {
            addr: addr.to_owned(),
            why: format!("cannot listen: {e}"),
        })?;
    let local = listener.local_addr().map_err(|e| HttpError::Serve {
        addr: addr.to_owned(),
        why: e.to_string(),
    })?;
    Ok((listener, local))
}

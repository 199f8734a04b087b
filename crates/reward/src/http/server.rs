//! Serves any [`Scorer`] over protocol v1. Requests are decoded concurrently; their items meet in
//! a batching queue that fills a device batch (up to `max_batch` items, or whatever arrived within
//! `batch_window`) and scores it in one call on a dedicated thread, so the model never blocks
//! the HTTP runtime and concurrent clients share forward passes.
//!
//! Every cost a client can impose is bounded (docs/reward-protocol.md, "Limits"): headers and
//! bodies must arrive within a deadline, idle connections are closed, the number of open
//! connections is capped (at the cap the connection idle longest makes room, so a flood of idle
//! sockets cannot lock out a real client), the token is checked before a body is read, and
//! prompts and decoded pixels per request have ceilings.

use std::collections::HashMap;
use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use image::RgbImage;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;

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
    /// Most pixels (width × height, summed over the items) one request may have decoded.
    pub max_request_pixels: u64,
    /// Largest prompt in bytes of UTF-8; CLIP-family scorers read only its first 77 tokens.
    pub max_prompt_bytes: usize,
    /// Most connections open at once; at the limit the one idle longest is closed to make room.
    pub max_connections: usize,
    /// Time a client has to send a request's headers; also how long a connection may sit idle
    /// before or between requests.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its headers arrived.
    pub body_timeout: Duration,
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
            max_request_pixels: 64 << 20,
            max_prompt_bytes: 8 << 10,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
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
    if let Some(why) = options_problem(&options) {
        return Err(HttpError::Serve { addr, why });
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
        // Outermost, so that it runs before any body is read, for every path.
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state);
    accept_loop(listener, app, &options, shutdown).await;
    // Every connection (and with it every clone of the router and the queue's sender) is gone:
    // the batcher drains and exits.
    batcher.join().map_err(|_| HttpError::Serve {
        addr,
        why: "the scorer thread panicked".into(),
    })
}

/// What is wrong with `options`, if anything.
fn options_problem(options: &ServerOptions) -> Option<String> {
    if options.max_batch == 0 {
        return Some("max_batch must be at least 1".into());
    }
    if options.max_connections == 0 {
        return Some("max_connections must be at least 1".into());
    }
    if options.header_timeout.is_zero() || options.body_timeout.is_zero() {
        return Some("the header and body timeouts must be longer than zero".into());
    }
    None
}

/// Accepts connections until `shutdown`, serving each on its own task under the header timeout
/// and the connection limit; then asks every connection to finish its request in flight and
/// waits for all of them.
async fn accept_loop(
    listener: TcpListener,
    app: Router,
    options: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let table = Arc::new(Connections::new(options.max_connections));
    let (stopping, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait for connections to close
                    // instead of spinning or giving up.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Some(admitted) = table.admit() else {
            // Every open connection is mid-request: this one waits for nothing better.
            drop(stream);
            continue;
        };
        tasks.spawn(serve_connection(
            stream,
            app.clone(),
            admitted,
            options.header_timeout,
            stop.clone(),
        ));
    }
    drop(listener);
    let _ = stopping.send(true);
    while tasks.join_next().await.is_some() {}
}

/// Serves one connection until the client closes it, a timeout closes it, it is evicted to make
/// room for another, or the server stops (after the request in flight).
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    admitted: Admitted,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let hyper_app = TowerToHyperService::new(app);
    let conn = admitted.conn.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        let busy = Busy::enter(conn.clone());
        let response = hyper_app.call(request);
        async move {
            let response = response.await;
            drop(busy);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let evicted = admitted.conn.evict.notified();
    tokio::pin!(evicted);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => break,
            () = evicted.as_mut() => break,
            changed = stop.changed(), if !stopping => {
                stopping = true;
                let _ = changed;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The open connections, so that at the limit the one idle longest can make room.
struct Connections {
    limit: usize,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnectionState>>>,
}

/// What the admission logic needs to know about one connection.
struct ConnectionState {
    /// Requests being answered on it.
    busy: AtomicUsize,
    /// When it last finished a request (or opened), in ms since [`Connections::epoch`].
    idle_since_ms: AtomicU64,
    /// Notified to close it.
    evict: Notify,
    epoch: Instant,
}

/// A connection's place in the table; leaving it (drop) frees the place.
struct Admitted {
    table: Arc<Connections>,
    id: u64,
    conn: Arc<ConnectionState>,
}

/// Marks a connection busy while a request on it is answered.
struct Busy(Arc<ConnectionState>);

impl Connections {
    fn new(limit: usize) -> Self {
        Connections {
            limit,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a new connection, closing the one idle longest if the table is full; `None` when
    /// it is full of connections that are all answering a request.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.limit {
            let victim = open
                .iter()
                .filter(|(_, c)| c.busy.load(Ordering::SeqCst) == 0)
                .min_by_key(|(_, c)| c.idle_since_ms.load(Ordering::SeqCst))
                .map(|(id, _)| *id)?;
            if let Some(evicted) = open.remove(&victim) {
                evicted.evict.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let conn = Arc::new(ConnectionState {
            busy: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(millis_since(self.epoch)),
            evict: Notify::new(),
            epoch: self.epoch,
        });
        open.insert(id, conn.clone());
        Some(Admitted {
            table: self.clone(),
            id,
            conn,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.id);
    }
}

impl Busy {
    fn enter(conn: Arc<ConnectionState>) -> Self {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(millis_since(self.0.epoch), Ordering::SeqCst);
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
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

/// Refuses a request without the right token before its body is read or any work is done.
async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    match check_token(&state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
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

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        name: state.info.name.clone(),
        version: state.info.version.clone(),
        higher_is_better: state.info.higher_is_better,
        max_batch: state.options.max_batch,
        protocol: PROTOCOL_VERSION,
    })
}

async fn score(
    State(state): State<Arc<AppState>>,
    body: axum::body::Body,
) -> Result<Json<ScoreResponse>, ApiError> {
    let body = read_body(body, &state.options).await?;
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

/// Reads a request body within the size limit and the body timeout.
async fn read_body(
    body: axum::body::Body,
    options: &ServerOptions,
) -> Result<axum::body::Bytes, ApiError> {
    let limited = Limited::new(body, options.max_body_bytes).collect();
    match tokio::time::timeout(options.body_timeout, limited).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the server's limit of {} bytes; send fewer or smaller images",
                options.max_body_bytes
            ),
        )),
        Ok(Err(e)) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?}; send it faster or in smaller \
                 requests",
                options.body_timeout
            ),
        )),
    }
}

/// Checks every item against the limits, cheapest checks first (prompt length, encoded size,
/// the dimensions in the image header, the request's pixel total), and only then decodes.
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
    let too_large = |message: String| ApiError(StatusCode::PAYLOAD_TOO_LARGE, message);
    let mut encoded = Vec::with_capacity(request.items.len());
    let mut pixels = 0u64;
    for (index, item) in request.items.into_iter().enumerate() {
        if item.prompt.len() > options.max_prompt_bytes {
            return Err(too_large(format!(
                "item {index}: prompt of {} bytes exceeds the server's limit of {} bytes; \
                 shorten it (CLIP-family scorers read only its first 77 tokens)",
                item.prompt.len(),
                options.max_prompt_bytes
            )));
        }
        // base64 holds 3 bytes per 4 characters: reject before decoding a huge string.
        if item.image.len() / 4 * 3 > options.max_image_bytes + 3 {
            return Err(too_large(format!(
                "item {index}: image of about {} bytes exceeds the server's per-image limit of {} bytes",
                item.image.len() / 4 * 3,
                options.max_image_bytes
            )));
        }
        let bytes = engine.decode(item.image.trim()).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("item {index}: image is not valid base64: {e}"),
            )
        })?;
        if bytes.len() > options.max_image_bytes {
            return Err(too_large(format!(
                "item {index}: image of {} bytes exceeds the server's per-image limit of {} bytes",
                bytes.len(),
                options.max_image_bytes
            )));
        }
        let (width, height) = image_dimensions(&bytes).map_err(|why| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("item {index}: cannot decode the image (PNG or JPEG expected): {why}"),
            )
        })?;
        if width.max(height) > options.max_image_side {
            return Err(too_large(format!(
                "item {index}: image of {width}x{height} pixels exceeds the server's limit of \
                 {side} pixels a side; send images of at most {side}x{side}",
                side = options.max_image_side
            )));
        }
        pixels += u64::from(width) * u64::from(height);
        if pixels > options.max_request_pixels {
            return Err(too_large(format!(
                "items 0..={index} hold {pixels} pixels, over the server's limit of {} pixels \
                 per request; send fewer or smaller images per request",
                options.max_request_pixels
            )));
        }
        encoded.push((item.prompt, bytes));
    }
    encoded
        .into_iter()
        .enumerate()
        .map(|(index, (prompt, bytes))| {
            let image = decode_image(&bytes, options.max_image_side).map_err(|why| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("item {index}: cannot decode the image (PNG or JPEG expected): {why}"),
                )
            })?;
            Ok((prompt, image))
        })
        .collect()
}

/// A reader for an accepted (PNG or JPEG) image.
fn image_reader(bytes: &[u8]) -> Result<image::ImageReader<Cursor<&[u8]>>, String> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => Ok(reader),
        Some(other) => Err(format!("{other:?} images are not accepted")),
        None => Err("unknown image format".into()),
    }
}

/// Width and height from the image's header, without decoding its pixels.
fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    image_reader(bytes)?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

fn decode_image(bytes: &[u8], max_side: u32) -> Result<RgbImage, String> {
    let mut reader = image_reader(bytes)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    reader.limits(limits);
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

//! The HTTP reward protocol on loopback: the client against the real server with a counting fake
//! scorer, against a fault-injecting server (every case ends in the right scores or a clear
//! error, never a wrong score), auth and size limits, and the example Python server.

use std::io::{BufRead, BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use image::RgbImage;
use reward::http::{
    reply_limit, serve, HttpError, HttpScorer, HttpScorerOptions, ScoreRequest, ServerOptions,
    WireItem,
};
use reward::{score_checked, RewardError, ScoreItem, Scorer, ScorerInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Every test finishes within this, whatever the server does.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// The fake's score: how red the image is, plus a prompt-dependent offset, so a score that is
/// routed to the wrong item or request shows.
fn toy_score(prompt: &str, image: &RgbImage) -> f32 {
    let pixels = image.pixels().len().max(1) as f64;
    let red: f64 = image
        .pixels()
        .map(|p| p[0] as f64 - (p[1] as f64 + p[2] as f64) / 2.0)
        .sum::<f64>()
        / pixels
        / 255.0;
    (red + prompt.len() as f64 * 0.01) as f32
}

/// "Mean redness", as scripts/reward_server_example.py scores.
fn redness(image: &RgbImage) -> f64 {
    let pixels = image.pixels().len() as f64;
    image
        .pixels()
        .map(|p| p[0] as f64 - (p[1] as f64 + p[2] as f64) / 2.0)
        .sum::<f64>()
        / pixels
        / 255.0
}

/// A scorer that counts its calls and items.
#[derive(Default)]
struct Counting {
    calls: Arc<AtomicUsize>,
    items: Arc<AtomicUsize>,
}

#[async_trait]
impl Scorer for Counting {
    fn info(&self) -> ScorerInfo {
        ScorerInfo {
            name: "toy".into(),
            version: "counting-1".into(),
            higher_is_better: true,
        }
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.items.fetch_add(items.len(), Ordering::SeqCst);
        // The prompt "nan" makes the model misbehave, as a broken checkpoint would.
        Ok(items
            .iter()
            .map(|it| match it.prompt {
                "nan" => f32::NAN,
                "panic" => panic!("injected scorer panic"),
                _ => toy_score(it.prompt, it.image),
            })
            .collect())
    }
}

fn image(seed: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 40) % 256) as u8,
            ((y * 5 + seed * 3) % 256) as u8,
            ((x + y + seed) % 256) as u8,
        ])
    })
}

fn noisy(seed: u32, w: u32, h: u32) -> RgbImage {
    let mut state = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    RgbImage::from_fn(w, h, |_, _| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (state >> 32).to_le_bytes();
        image::Rgb([b[0], b[1], b[2]])
    })
}

fn encode(image: &RgbImage, format: image::ImageFormat) -> String {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn fast_options() -> HttpScorerOptions {
    HttpScorerOptions {
        timeout: Duration::from_millis(1000),
        connect_timeout: Duration::from_millis(1000),
        max_attempts: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        ..Default::default()
    }
}

/// A running server; dropping `stop` (or sending on it) shuts it down.
struct Running {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), HttpError>>,
}

impl Running {
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }
}

async fn start(scorer: Box<dyn Scorer>, options: ServerOptions) -> Running {
    let (listener, addr) = reward::http::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(listener, scorer, options, async {
        let _ = stopped.await;
    }));
    Running {
        url: format!("http://{addr}"),
        stop: Some(stop),
        done,
    }
}

fn items<'a>(prompts: &'a [String], images: &'a [RgbImage]) -> Vec<ScoreItem<'a>> {
    prompts
        .iter()
        .zip(images)
        .map(|(prompt, image)| ScoreItem { prompt, image })
        .collect()
}

#[tokio::test]
async fn client_gets_the_scorers_scores_in_order_across_split_batches() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = Counting::default();
        let calls = fake.calls.clone();
        let options = ServerOptions {
            max_batch: 3,
            ..Default::default()
        };
        let server = start(Box::new(fake), options).await;
        let client = HttpScorer::connect(&server.url, fast_options())
            .await
            .unwrap();
        assert_eq!(client.max_batch(), 3);
        assert_eq!(
            client.info(),
            ScorerInfo {
                name: "toy".into(),
                version: "counting-1".into(),
                higher_is_better: true
            }
        );
        let prompts: Vec<String> = (0..7)
            .map(|i| format!("prompt {}", "x".repeat(i)))
            .collect();
        let images: Vec<RgbImage> = (0..7).map(|i| image(i, 9 + i, 5 + 2 * i)).collect();
        let batch = items(&prompts, &images);
        let scores = score_checked(&client, &batch).await.unwrap();
        let expected: Vec<f32> = batch
            .iter()
            .map(|it| toy_score(it.prompt, it.image))
            .collect();
        assert_eq!(scores, expected);
        // 7 items at max_batch 3: three requests, hence at least three scorer calls.
        assert!(calls.load(Ordering::SeqCst) >= 3);
        assert!(score_checked(&client, &[]).await.unwrap().is_empty());
        server.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn two_concurrent_requests_are_scored_in_one_call() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = Counting::default();
        let (calls, counted) = (fake.calls.clone(), fake.items.clone());
        let options = ServerOptions {
            max_batch: 8,
            // Long enough that the second request always lands in the first one's window.
            batch_window: Duration::from_millis(400),
            ..Default::default()
        };
        let server = start(Box::new(fake), options).await;
        let client = HttpScorer::connect(&server.url, fast_options())
            .await
            .unwrap();
        let prompts_a = vec!["a red cat".to_string(), "a red cat".to_string()];
        let prompts_b = vec!["b".to_string(), "a blue dog".to_string()];
        let images_a = vec![image(1, 8, 8), image(2, 4, 6)];
        let images_b = vec![image(3, 7, 3), image(4, 5, 5)];
        let (batch_a, batch_b) = (items(&prompts_a, &images_a), items(&prompts_b, &images_b));
        let (a, b) = tokio::join!(
            score_checked(&client, &batch_a),
            score_checked(&client, &batch_b)
        );
        let want = |batch: &[ScoreItem]| -> Vec<f32> {
            batch
                .iter()
                .map(|it| toy_score(it.prompt, it.image))
                .collect()
        };
        assert_eq!(a.unwrap(), want(&batch_a));
        assert_eq!(b.unwrap(), want(&batch_b));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one batched scorer call");
        assert_eq!(counted.load(Ordering::SeqCst), 4);
        server.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bearer_token_is_required_when_configured() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = Counting::default();
        let options = ServerOptions {
            token: Some("s3cret".into()),
            ..Default::default()
        };
        let server = start(Box::new(fake), options).await;
        let err = HttpScorer::connect(&server.url, fast_options())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, HttpError::Rejected { .. }), "{text}");
        assert!(
            text.contains("401") && text.contains("missing bearer token"),
            "{text}"
        );
        assert!(text.contains("--token-file"), "{text}");
        let wrong = HttpScorerOptions {
            token: Some("guess".into()),
            ..fast_options()
        };
        let text = HttpScorer::connect(&server.url, wrong)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("401") && text.contains("wrong bearer token"),
            "{text}"
        );
        // Score requests are guarded too, not only health.
        let raw = reqwest::Client::new()
            .post(format!("{}/v1/score", server.url))
            .body(r#"{"items": []}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(raw.status(), 401);
        assert_eq!(raw.headers()["www-authenticate"], "Bearer");
        let right = HttpScorerOptions {
            token: Some("s3cret".into()),
            ..fast_options()
        };
        let client = HttpScorer::connect(&server.url, right).await.unwrap();
        let (prompts, images) = (vec!["p".to_string()], vec![image(9, 3, 3)]);
        let scores = score_checked(&client, &items(&prompts, &images))
            .await
            .unwrap();
        assert_eq!(scores, vec![toy_score("p", &images[0])]);
        server.shutdown().await;
    })
    .await
    .unwrap();
}

async fn post_json(url: &str, body: String) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/score"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let json: serde_json::Value = response.json().await.unwrap();
    let message = json["error"].as_str().unwrap_or("").to_owned();
    (status, message)
}

fn request(items: Vec<(&str, String)>) -> String {
    serde_json::to_string(&ScoreRequest {
        items: items
            .into_iter()
            .map(|(prompt, image)| WireItem {
                prompt: prompt.into(),
                image,
            })
            .collect(),
    })
    .unwrap()
}

#[tokio::test]
async fn size_limits_give_413_and_bad_items_400_naming_the_item() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = Counting::default();
        let calls = fake.calls.clone();
        let options = ServerOptions {
            max_batch: 4,
            max_body_bytes: 200_000,
            max_image_bytes: 20_000,
            ..Default::default()
        };
        let server = start(Box::new(fake), options).await;
        let small = encode(&image(1, 8, 8), image::ImageFormat::Png);
        // Noise barely compresses: ~30 KB as PNG, over the per-image limit.
        let big = encode(&noisy(2, 100, 100), image::ImageFormat::Png);
        let (status, message) = post_json(
            &server.url,
            request(vec![("a", small.clone()), ("b", big.clone())]),
        )
        .await;
        assert_eq!(status, 413, "{message}");
        assert!(
            message.contains("item 1") && message.contains("20000 bytes"),
            "{message}"
        );
        // Eight such images: over the body limit.
        let (status, message) = post_json(
            &server.url,
            request((0..8).map(|_| ("c", big.clone())).collect()),
        )
        .await;
        assert_eq!(status, 413, "{message}");
        assert!(message.contains("200000 bytes"), "{message}");
        let (status, message) = post_json(
            &server.url,
            request((0..5).map(|_| ("d", small.clone())).collect()),
        )
        .await;
        assert_eq!(status, 413, "{message}");
        assert!(message.contains("max_batch of 4"), "{message}");

        let not_base64 = "@@not base64@@".to_string();
        let not_an_image =
            base64::engine::general_purpose::STANDARD.encode(b"GIF89a but not really");
        let (status, message) = post_json(
            &server.url,
            request(vec![("a", small.clone()), ("b", not_base64)]),
        )
        .await;
        assert_eq!(status, 400, "{message}");
        assert!(
            message.contains("item 1") && message.contains("base64"),
            "{message}"
        );
        let (status, message) = post_json(
            &server.url,
            request(vec![
                ("a", small.clone()),
                ("b", small.clone()),
                ("c", not_an_image),
            ]),
        )
        .await;
        assert_eq!(status, 400, "{message}");
        assert!(
            message.contains("item 2") && message.contains("decode"),
            "{message}"
        );
        let (status, message) = post_json(&server.url, "{\"items\": [".into()).await;
        assert_eq!(status, 400, "{message}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "no bad request reached the scorer"
        );

        // JPEG is accepted, and unpadded base64 too.
        let jpeg = encode(&image(3, 16, 16), image::ImageFormat::Jpeg);
        let unpadded = small.trim_end_matches('=').to_string();
        let response = reqwest::Client::new()
            .post(format!("{}/v1/score", server.url))
            .body(request(vec![("j", jpeg), ("p", unpadded)]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let json: serde_json::Value = response.json().await.unwrap();
        assert_eq!(json["scores"].as_array().unwrap().len(), 2);
        assert_eq!(json["scorer"]["name"], "toy");
        let health: serde_json::Value = reqwest::get(format!("{}/v1/health", server.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["protocol"], 1);
        assert_eq!(health["max_batch"], 4);
        server.shutdown().await;
    })
    .await
    .unwrap();
}

/// What the fault-injecting server does with one `POST /v1/score`.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Correct scores.
    Ok,
    /// Correct scores after a delay.
    Slow(Duration),
    /// This status with an error body.
    Status(u16),
    /// A 200 whose body is not JSON.
    Garbage,
    /// A 200 with one score too few.
    WrongCount,
    /// A 200 with a literal `NaN` (what Python's json.dumps writes).
    NanLiteral,
    /// A 200 with a score beyond f32 range (an infinity once narrowed).
    Overflow,
    /// Headers and half the body, then the connection closes.
    DropMidBody,
    /// Correct scores from a scorer whose `higher_is_better` differs from the one at connect.
    FlippedScorer,
    /// A 200 announcing a 10 GB body and streaming zeros until the client hangs up.
    HugeReply,
    /// A chunked 200 (no length announced) streaming zeros until the client hangs up.
    EndlessChunks,
    /// Correct scores, one byte every 100 ms: each read is quick, the whole is not.
    Trickle,
}

/// What the fault server saw: score requests, and the most it was handling at once.
#[derive(Default)]
struct Stats {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

/// Counts a score request as in flight until dropped.
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn enter(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak.fetch_max(now, Ordering::SeqCst);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A hand-written HTTP/1.1 server (one request per connection) that follows `script`, one entry
/// per score request, repeating the last entry, and reports `max_batch` in its health reply.
async fn fault_server(script: Vec<Fault>, max_batch: usize) -> (String, Arc<Stats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stats = Arc::new(Stats::default());
    let shared = stats.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let (script, stats) = (script.clone(), shared.clone());
            tokio::spawn(async move { handle(socket, &script, &stats, max_batch).await });
        }
    });
    (url, stats)
}

async fn handle(
    mut socket: tokio::net::TcpStream,
    script: &[Fault],
    stats: &Stats,
    max_batch: usize,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = &buf[header_end..header_end + length];
    let respond = |status: &str, body: String| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let scorer = r#"{"name": "toy", "version": "faulty-1", "higher_is_better": true}"#;
    if head.starts_with("get /v1/health") {
        let health = format!(
            r#"{{"name": "toy", "version": "faulty-1", "higher_is_better": true,
                 "max_batch": {max_batch}, "protocol": 1}}"#
        );
        let _ = socket.write_all(respond("200 OK", health).as_bytes()).await;
        return;
    }
    let _in_flight = InFlight::enter(stats);
    let index = stats.requests.fetch_add(1, Ordering::SeqCst);
    let fault = script[index.min(script.len() - 1)];
    let request: ScoreRequest = serde_json::from_slice(body).unwrap();
    let mut scores: Vec<String> = request
        .items
        .iter()
        .map(|item| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&item.image)
                .unwrap();
            let image = image::load_from_memory(&bytes).unwrap().to_rgb8();
            format!("{:?}", toy_score(&item.prompt, &image))
        })
        .collect();
    let ok = |scores: &[String]| {
        format!(
            r#"{{"scores": [{}], "scorer": {scorer}}}"#,
            scores.join(", ")
        )
    };
    let reply = match fault {
        Fault::Ok => respond("200 OK", ok(&scores)),
        Fault::Slow(delay) => {
            tokio::time::sleep(delay).await;
            respond("200 OK", ok(&scores))
        }
        Fault::Status(code) => respond(
            &format!("{code} Injected"),
            format!(r#"{{"error": "injected {code}"}}"#),
        ),
        Fault::Garbage => respond("200 OK", "<html>proxy error</html>".into()),
        Fault::WrongCount => {
            scores.pop();
            respond("200 OK", ok(&scores))
        }
        Fault::NanLiteral => {
            scores[0] = "NaN".into();
            respond("200 OK", ok(&scores))
        }
        Fault::Overflow => {
            scores[0] = "1e39".into();
            respond("200 OK", ok(&scores))
        }
        Fault::FlippedScorer => respond(
            "200 OK",
            ok(&scores).replace(
                r#""higher_is_better": true"#,
                r#""higher_is_better": false"#,
            ),
        ),
        Fault::DropMidBody => {
            let full = respond("200 OK", ok(&scores));
            let _ = socket.write_all(&full.as_bytes()[..full.len() - 10]).await;
            return;
        }
        Fault::HugeReply | Fault::EndlessChunks => {
            let head = if matches!(fault, Fault::HugeReply) {
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10000000000\r\n\r\n"
            } else {
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            };
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let zeros = vec![b'0'; 64 << 10];
            let mut chunk = format!("{:x}\r\n", zeros.len()).into_bytes();
            chunk.extend_from_slice(&zeros);
            chunk.extend_from_slice(b"\r\n");
            let piece = if matches!(fault, Fault::HugeReply) {
                &zeros
            } else {
                &chunk
            };
            // Stops when the client hangs up; bounded in case it never does.
            for _ in 0..100_000 {
                if socket.write_all(piece).await.is_err() {
                    return;
                }
            }
            return;
        }
        Fault::Trickle => {
            for byte in respond("200 OK", ok(&scores)).bytes() {
                if socket.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return;
        }
    };
    let _ = socket.write_all(reply.as_bytes()).await;
}

/// Scores two items against a fault server following `script`; returns the result and how many
/// score requests the server saw.
async fn against(script: Vec<Fault>) -> (Result<Vec<f32>, RewardError>, usize, Vec<f32>) {
    let (url, stats) = fault_server(script, 8).await;
    let client = HttpScorer::connect(&url, fast_options()).await.unwrap();
    let prompts = vec!["a red cat".to_string(), "dog".to_string()];
    let images = vec![image(5, 6, 4), image(6, 3, 9)];
    let batch = items(&prompts, &images);
    let expected = batch
        .iter()
        .map(|it| toy_score(it.prompt, it.image))
        .collect();
    let result = score_checked(&client, &batch).await;
    (result, stats.requests.load(Ordering::SeqCst), expected)
}

#[tokio::test]
async fn transient_faults_are_retried_to_the_right_scores() {
    tokio::time::timeout(TEST_LIMIT, async {
        for fault in [
            Fault::Slow(Duration::from_millis(2500)),
            Fault::Status(500),
            Fault::Status(503),
            Fault::Status(429),
            Fault::Garbage,
            Fault::WrongCount,
            Fault::NanLiteral,
            Fault::Overflow,
            Fault::DropMidBody,
        ] {
            let (result, requests, expected) = against(vec![fault, Fault::Ok]).await;
            assert_eq!(result.unwrap(), expected, "{fault:?}");
            assert_eq!(requests, 2, "{fault:?}: one failure, one retry");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn persistent_faults_end_in_a_clear_error_after_the_retry_budget() {
    tokio::time::timeout(TEST_LIMIT, async {
        for (fault, cause) in [
            (Fault::Slow(Duration::from_millis(2500)), "timed out"),
            (Fault::Status(500), "500"),
            (Fault::Garbage, "not valid score JSON"),
            (Fault::WrongCount, "1 scores for 2 items"),
            (Fault::NanLiteral, "not valid score JSON"),
            (Fault::Overflow, "out-of-range score"),
            (Fault::DropMidBody, "reading the reply body"),
        ] {
            let (result, requests, _) = against(vec![fault]).await;
            let err = result.unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(
                    err,
                    RewardError::Http(HttpError::Exhausted { attempts: 3, .. })
                ),
                "{fault:?}: {text}"
            );
            assert_eq!(requests, 3, "{fault:?}");
            assert!(
                text.contains("/v1/score") && text.contains("3 attempts"),
                "{text}"
            );
            assert!(text.contains(cause), "{fault:?}: {text}");
        }
    })
    .await
    .unwrap();
}

/// A reply larger than any protocol v1 reply (announced or streamed) is cut at the client's cap,
/// at once and without retrying: memory stays bounded and the error says what happened.
#[tokio::test]
async fn an_endless_reply_is_cut_at_the_cap_and_not_retried() {
    tokio::time::timeout(TEST_LIMIT, async {
        for (fault, what) in [
            (Fault::HugeReply, "announces 10000000000 bytes"),
            (Fault::EndlessChunks, "runs past"),
        ] {
            let started = std::time::Instant::now();
            let (result, requests, _) = against(vec![fault, Fault::Ok]).await;
            let text = result.unwrap_err().to_string();
            assert_eq!(requests, 1, "{fault:?}: an oversized reply is not retried");
            assert!(
                text.contains(what) && text.contains(&format!("limit of {}", reply_limit(2))),
                "{fault:?}: {text}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{fault:?} took {:?}",
                started.elapsed()
            );
        }
        // The cap is configurable: a tiny one refuses even a correct reply.
        let (url, _) = fault_server(vec![Fault::Ok], 8).await;
        let options = HttpScorerOptions {
            max_reply_bytes: Some(10),
            ..fast_options()
        };
        let text = HttpScorer::connect(&url, options)
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains("limit of 10 bytes"), "{text}");
    })
    .await
    .unwrap();
}

/// The per-request timeout covers the whole reply, not each read: a server that trickles a
/// correct reply byte by byte is cut at the timeout on every attempt.
#[tokio::test]
async fn a_trickled_reply_is_cut_at_the_request_timeout() {
    tokio::time::timeout(TEST_LIMIT, async {
        let started = std::time::Instant::now();
        let (result, requests, _) = against(vec![Fault::Trickle]).await;
        let text = result.unwrap_err().to_string();
        assert_eq!(requests, 3, "{text}");
        assert!(text.contains("timed out after 1s"), "{text}");
        // Three attempts of 1 s plus backoff; the whole reply would take over 10 s each.
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
    })
    .await
    .unwrap();
}

/// A server whose scorer changed since the client connected is refused, and the message shows
/// the field that differs (here only `higher_is_better`).
#[tokio::test]
async fn a_scorer_that_changed_since_connect_is_refused_naming_what_differs() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (result, requests, _) = against(vec![Fault::FlippedScorer]).await;
        let text = result.unwrap_err().to_string();
        assert_eq!(requests, 1, "an incompatible scorer is not retried");
        assert!(
            text.contains("higher_is_better = false") && text.contains("higher_is_better = true"),
            "{text}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    tokio::time::timeout(TEST_LIMIT, async {
        for code in [400, 401, 413] {
            let (result, requests, _) = against(vec![Fault::Status(code), Fault::Ok]).await;
            let err = result.unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, RewardError::Http(HttpError::Rejected { .. })),
                "{text}"
            );
            assert_eq!(requests, 1, "{code} must not be retried");
            assert!(text.contains(&format!("injected {code}")), "{text}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn unreachable_server_names_the_url_and_attempts() {
    tokio::time::timeout(TEST_LIMIT, async {
        // Bind and drop, so the port is (almost certainly) closed.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        let text = HttpScorer::connect(&url, fast_options())
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains(&format!("{url}/v1/health")), "{text}");
        assert!(text.contains("3 attempts"), "{text}");
        let text = HttpScorer::connect("localhost:8787", fast_options())
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains("http or https"), "{text}");
    })
    .await
    .unwrap();
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kills the example server when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn example_python_server_speaks_the_protocol() {
    let python = std::env::var_os("PSO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let script = workspace().join("scripts/reward_server_example.py");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "py-token\n").unwrap();
    let mut child = Command::new(&python)
        .arg(&script)
        .args(["--port", "0", "--max-batch", "2", "--token-file"])
        .arg(&token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (run scripts/setup.sh): {e}",
                python.display()
            )
        });
    let stdout = child.stdout.take().unwrap();
    let child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the example server prints `listening on URL` within 30 s");
    tokio::time::timeout(TEST_LIMIT, async {
        let text = HttpScorer::connect(&url, fast_options())
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains("401"), "{text}");
        let options = HttpScorerOptions {
            token: Some("py-token".into()),
            timeout: Duration::from_secs(10),
            ..fast_options()
        };
        let client = HttpScorer::connect(&url, options).await.unwrap();
        assert_eq!(client.max_batch(), 2);
        assert_eq!(client.info().name, "redness");
        let prompts: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
        let images: Vec<RgbImage> = (0..5).map(|i| image(i * 11, 10 + i, 7)).collect();
        let scores = score_checked(&client, &items(&prompts, &images))
            .await
            .unwrap();
        for (score, image) in scores.iter().zip(&images) {
            assert!(
                (*score as f64 - redness(image)).abs() < 1e-6,
                "{score} vs {}",
                redness(image)
            );
        }
    })
    .await
    .unwrap();
    drop(child);
}

#[tokio::test]
async fn a_scorer_that_returns_nan_or_panics_is_a_server_error_never_a_score() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = Counting::default();
        let calls = fake.calls.clone();
        let server = start(Box::new(fake), ServerOptions::default()).await;
        let client = HttpScorer::connect(&server.url, fast_options())
            .await
            .unwrap();
        let (prompts, images) = (
            vec!["fine".to_string(), "nan".to_string()],
            vec![image(1, 4, 4), image(2, 4, 4)],
        );
        let err = score_checked(&client, &items(&prompts, &images))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                RewardError::Http(HttpError::Exhausted { attempts: 3, .. })
            ),
            "{text}"
        );
        assert!(
            text.contains("500") && text.contains("non-finite"),
            "{text}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "each attempt reached the scorer"
        );
        // A panicking scorer is answered 500 too, and the server keeps serving.
        let panics = vec!["panic".to_string()];
        let text = score_checked(&client, &items(&panics, &images[..1]))
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains("injected scorer panic"), "{text}");
        let fine = vec!["fine".to_string()];
        let scores = score_checked(&client, &items(&fine, &images[..1]))
            .await
            .unwrap();
        assert_eq!(scores, vec![toy_score("fine", &images[0])]);
        server.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn split_batches_go_out_concurrently_up_to_the_limit_and_come_back_in_order() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (url, stats) = fault_server(vec![Fault::Slow(Duration::from_millis(150))], 1).await;
        let options = HttpScorerOptions {
            max_concurrency: 2,
            timeout: Duration::from_secs(5),
            ..fast_options()
        };
        let client = HttpScorer::connect(&url, options).await.unwrap();
        assert_eq!(client.max_batch(), 1);
        let prompts: Vec<String> = (0..6).map(|i| "p".repeat(i + 1)).collect();
        let images: Vec<RgbImage> = (0..6).map(|i| image(i * 7, 5, 4 + i)).collect();
        let batch = items(&prompts, &images);
        let scores = score_checked(&client, &batch).await.unwrap();
        let expected: Vec<f32> = batch
            .iter()
            .map(|it| toy_score(it.prompt, it.image))
            .collect();
        assert_eq!(scores, expected);
        assert_eq!(
            stats.requests.load(Ordering::SeqCst),
            6,
            "one request per item"
        );
        assert_eq!(stats.peak.load(Ordering::SeqCst), 2, "max_concurrency 2");
    })
    .await
    .unwrap();
}

/// Opens a connection and sends `bytes` (maybe nothing), keeping it open.
async fn open_idle(url: &str, bytes: &[u8]) -> tokio::net::TcpStream {
    let mut socket = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    socket.write_all(bytes).await.unwrap();
    socket
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(socket: &mut tokio::net::TcpStream) -> String {
    let mut reply = Vec::new();
    let _ = socket.read_to_end(&mut reply).await;
    String::from_utf8_lossy(&reply).into_owned()
}

/// The slow-loris probe: hundreds of sockets that never finish a request do not lock a real
/// client out. At the connection limit the connection idle longest makes room, so health and
/// scoring answer at once, long before any timeout would have freed a place.
#[tokio::test]
async fn idle_sockets_do_not_lock_out_a_client() {
    tokio::time::timeout(TEST_LIMIT, async {
        let options = ServerOptions {
            max_connections: 16,
            header_timeout: Duration::from_secs(50),
            token: Some("s3cret".into()),
            ..Default::default()
        };
        let server = start(Box::new(Counting::default()), options).await;
        let mut idle = Vec::new();
        for i in 0..300 {
            let partial: &[u8] = if i % 3 == 0 {
                b"POST /v1/score HTTP/1.1\r\nhost: x\r\n"
            } else {
                b""
            };
            idle.push(open_idle(&server.url, partial).await);
        }
        let started = std::time::Instant::now();
        let client = HttpScorer::connect(
            &server.url,
            HttpScorerOptions {
                token: Some("s3cret".into()),
                ..fast_options()
            },
        )
        .await
        .unwrap();
        let (prompts, images) = (vec!["p".to_string()], vec![image(9, 3, 3)]);
        let scores = score_checked(&client, &items(&prompts, &images))
            .await
            .unwrap();
        assert_eq!(scores, vec![toy_score("p", &images[0])]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        // The oldest idle sockets were closed to make room.
        assert!(read_to_close(&mut idle[0]).await.is_empty());
        drop(idle);
        server.shutdown().await;
    })
    .await
    .unwrap();
}

/// A connection that sends nothing, or headers that never end, is closed after the header
/// timeout; a body that never ends gets 408 after the body timeout.
#[tokio::test]
async fn stalled_connections_are_closed_after_their_timeouts() {
    tokio::time::timeout(TEST_LIMIT, async {
        let options = ServerOptions {
            header_timeout: Duration::from_millis(300),
            body_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let server = start(Box::new(Counting::default()), options).await;
        let started = std::time::Instant::now();
        let mut silent = open_idle(&server.url, b"").await;
        let mut half_head = open_idle(&server.url, b"GET /v1/health HTTP/1.1\r\n").await;
        let mut half_body = open_idle(
            &server.url,
            b"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"items\"",
        )
        .await;
        // Meanwhile the server answers others.
        let health = reqwest::get(format!("{}/v1/health", server.url))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        assert!(!read_to_close(&mut silent).await.contains("200"));
        assert!(!read_to_close(&mut half_head).await.contains("200"));
        let reply = read_to_close(&mut half_body).await;
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert!(reply.contains("did not arrive within"), "{reply}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A keep-alive connection idle between requests is closed too.
        let mut kept = open_idle(&server.url, b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let reply = read_to_close(&mut kept).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        server.shutdown().await;
    })
    .await
    .unwrap();
}

/// Without the token nothing is read or done: a request announcing a large body is refused
/// from its headers alone, and an unknown path answers 401 (not 404, which would tell a
/// stranger what exists).
#[tokio::test]
async fn the_token_is_checked_before_the_body_is_read() {
    tokio::time::timeout(TEST_LIMIT, async {
        let options = ServerOptions {
            token: Some("s3cret".into()),
            body_timeout: Duration::from_secs(50),
            ..Default::default()
        };
        let server = start(Box::new(Counting::default()), options).await;
        let mut socket = open_idle(
            &server.url,
            b"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-length: 60000000\r\n\r\n",
        )
        .await;
        let mut head = vec![0u8; 12];
        socket.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 401");
        let response = reqwest::get(format!("{}/no/such/path", server.url))
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        let response = reqwest::Client::new()
            .get(format!("{}/no/such/path", server.url))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        drop(socket);
        server.shutdown().await;
    })
    .await
    .unwrap();
}

/// PNG bytes whose header claims `width` x `height` (the pixel data is empty): enough for the
/// checks that read only the header.
fn png_header_claiming(width: u32, height: u32) -> String {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let crc = crc32(&ihdr);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc.to_be_bytes());
    // An empty IDAT: decoders read the header up to the first data chunk.
    png.extend_from_slice(&0u32.to_be_bytes());
    png.extend_from_slice(b"IDAT");
    png.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The work one request can cause is bounded before any pixel is decoded: prompt bytes, image
/// sides (413, as the docs say, not 400) and the request's pixel total.
#[tokio::test]
async fn prompt_length_image_sides_and_pixel_total_are_bounded() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = Counting::default();
        let calls = fake.calls.clone();
        let options = ServerOptions {
            max_prompt_bytes: 100,
            max_request_pixels: 3000 * 3000,
            ..Default::default()
        };
        let server = start(Box::new(fake), options).await;
        let small = encode(&image(1, 8, 8), image::ImageFormat::Png);
        let long = "a".repeat(20_000_000);
        let (status, message) = post_json(
            &server.url,
            request(vec![("ok", small.clone()), (&long, small.clone())]),
        )
        .await;
        assert_eq!(status, 413, "{message}");
        assert!(
            message.contains("item 1") && message.contains("limit of 100 bytes"),
            "{message}"
        );
        let (status, message) = post_json(
            &server.url,
            request(vec![("tall", png_header_claiming(10, 5000))]),
        )
        .await;
        assert_eq!(status, 413, "{message}");
        assert!(
            message.contains("10x5000") && message.contains("4096"),
            "{message}"
        );
        let big = png_header_claiming(2500, 2500);
        let (status, message) = post_json(
            &server.url,
            request(vec![("a", big.clone()), ("b", big.clone())]),
        )
        .await;
        assert_eq!(status, 413, "{message}");
        assert!(message.contains("9000000 pixels"), "{message}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // Within the limits the same server scores.
        let (status, message) = post_json(&server.url, request(vec![("ok", small)])).await;
        assert_eq!(status, 200, "{message}");
        server.shutdown().await;
    })
    .await
    .unwrap();
}

/// Several replicas of one scorer as one: a batch is spread over them and comes back in order;
/// when one replica goes away its share is scored by another; replicas of different scorers
/// are refused at connect.
#[tokio::test]
async fn a_pool_of_servers_spreads_batches_and_survives_one_going_away() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (a, b) = (Counting::default(), Counting::default());
        let (calls_a, calls_b) = (a.calls.clone(), b.calls.clone());
        let first = start(Box::new(a), ServerOptions::default()).await;
        let second = start(Box::new(b), ServerOptions::default()).await;
        let pool = reward::http::HttpPool::connect(&[&first.url, &second.url], fast_options())
            .await
            .unwrap();
        assert_eq!(pool.urls(), [first.url.as_str(), second.url.as_str()]);
        let prompts: Vec<String> = (0..5).map(|i| format!("prompt {i}")).collect();
        let images: Vec<RgbImage> = (0..5).map(|i| image(i, 6, 4)).collect();
        let batch = items(&prompts, &images);
        let expected: Vec<f32> = batch
            .iter()
            .map(|it| toy_score(it.prompt, it.image))
            .collect();
        assert_eq!(score_checked(&pool, &batch).await.unwrap(), expected);
        assert!(calls_a.load(Ordering::SeqCst) >= 1 && calls_b.load(Ordering::SeqCst) >= 1);
        second.shutdown().await;
        assert_eq!(score_checked(&pool, &batch).await.unwrap(), expected);

        struct Other;
        #[async_trait]
        impl Scorer for Other {
            fn info(&self) -> ScorerInfo {
                ScorerInfo {
                    name: "toy".into(),
                    version: "another-model".into(),
                    higher_is_better: true,
                }
            }
            async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
                Ok(vec![0.0; items.len()])
            }
        }
        let other = start(Box::new(Other), ServerOptions::default()).await;
        let e = reward::http::HttpPool::connect(&[&first.url, &other.url], fast_options())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("another-model") && e.contains("same scorer"),
            "{e}"
        );
        other.shutdown().await;
        first.shutdown().await;
    })
    .await
    .unwrap();
}

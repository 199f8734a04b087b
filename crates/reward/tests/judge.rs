//! The `openai` scorer (a VLM judge behind an OpenAI-compatible chat endpoint) against a fake
//! endpoint on loopback: each image reaches the judge with its prompt, the answer's number is
//! the score in item order, transient faults are retried, and an answer without a usable number
//! fails the batch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use image::RgbImage;
use reward::http::{JudgeConfig, OpenAiJudge};
use reward::{score_checked, ScoreItem, Scorer};
use serde_json::{json, Value};

/// What the fake judge answers.
#[derive(Clone, Copy)]
enum Behaviour {
    /// "Score: <mean red / 10>" after the reasoning the template asks for.
    Rate,
    /// 503 on every other request, then a rating.
    Flaky,
    /// Words without a number.
    Refuse,
    /// "Score: nan".
    Nan,
}

struct Fake {
    behaviour: Behaviour,
    requests: AtomicUsize,
}

fn mean_red(image: &RgbImage) -> f64 {
    image.pixels().map(|p| p[0] as f64).sum::<f64>() / image.pixels().len() as f64
}

async fn complete(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, (StatusCode, String)> {
    let n = fake.requests.fetch_add(1, Ordering::SeqCst);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sk-test") {
        return Err((StatusCode::UNAUTHORIZED, "{\"error\": \"bad key\"}".into()));
    }
    assert_eq!(body["model"], "judge-vl");
    let content = &body["messages"][0]["content"];
    let question = content[0]["text"].as_str().unwrap();
    assert!(question.starts_with("Rate this image for: "), "{question}");
    let url = content[1]["image_url"]["url"].as_str().unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(url.strip_prefix("data:image/png;base64,").unwrap())
        .unwrap();
    let image = image::load_from_memory(&png).unwrap().to_rgb8();
    let answer = match fake.behaviour {
        Behaviour::Flaky if n % 2 == 0 => {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "busy".into()));
        }
        Behaviour::Rate | Behaviour::Flaky => {
            format!(
                "The prompt has {} words. Score: {}",
                question.split(' ').count(),
                mean_red(&image) / 10.0
            )
        }
        Behaviour::Refuse => "I cannot rate images.".into(),
        Behaviour::Nan => "Score: nan".into(),
    };
    Ok(Json(
        json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}),
    ))
}

async fn fake(behaviour: Behaviour) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake {
        behaviour,
        requests: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, fake)
}

fn judge(url: &str, token: Option<&str>) -> OpenAiJudge {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("judge.toml");
    std::fs::write(
        &path,
        format!(
            "url = \"{url}\"\nmodel = \"judge-vl\"\ntemplate = \"Rate this image for: {{prompt}}\"\n\
             score_after = \"Score:\"\nmax_attempts = 3\ntimeout_seconds = 10\n"
        ),
    )
    .unwrap();
    OpenAiJudge::new(JudgeConfig::load(&path).unwrap(), token.map(str::to_owned)).unwrap()
}

fn images() -> (Vec<String>, Vec<RgbImage>) {
    let images: Vec<RgbImage> = [10u8, 200, 90]
        .iter()
        .map(|&red| RgbImage::from_pixel(8, 8, image::Rgb([red, 5, 5])))
        .collect();
    let prompts = vec![
        "a red cat".to_string(),
        "dog".into(),
        "a small house".into(),
    ];
    (prompts, images)
}

fn items<'a>(prompts: &'a [String], images: &'a [RgbImage]) -> Vec<ScoreItem<'a>> {
    prompts
        .iter()
        .zip(images)
        .map(|(prompt, image)| ScoreItem { prompt, image })
        .collect()
}

#[tokio::test]
async fn the_judge_scores_each_image_in_order_and_retries_transient_faults() {
    for behaviour in [Behaviour::Rate, Behaviour::Flaky] {
        let (url, fake) = fake(behaviour).await;
        let judge = judge(&url, Some("sk-test"));
        let (prompts, images) = images();
        let scores = tokio::time::timeout(
            Duration::from_secs(30),
            score_checked(&judge, &items(&prompts, &images)),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(scores, vec![1.0, 20.0, 9.0]);
        let expected = if matches!(behaviour, Behaviour::Flaky) {
            6
        } else {
            3
        };
        assert_eq!(fake.requests.load(Ordering::SeqCst), expected);
        assert_eq!(judge.info().name, "openai");
        assert!(judge.info().version.starts_with("judge-vl@http://"));
    }
}

#[tokio::test]
async fn answers_without_a_usable_number_or_a_wrong_key_fail_the_batch() {
    for (behaviour, token, cause) in [
        (
            Behaviour::Refuse,
            Some("sk-test"),
            "no number after \"Score:\"",
        ),
        (
            Behaviour::Nan,
            Some("sk-test"),
            "no number after \"Score:\"",
        ),
        (Behaviour::Rate, None, "--token-file"),
    ] {
        let (url, _) = fake(behaviour).await;
        let judge = judge(&url, token);
        let (prompts, images) = images();
        let e = score_checked(&judge, &items(&prompts, &images))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(cause) && e.contains("/chat/completions"), "{e}");
    }
}

#[test]
fn a_judge_file_without_the_prompt_or_a_url_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("judge.toml");
    std::fs::write(
        &path,
        "url = \"http://x/v1\"\nmodel = \"m\"\ntemplate = \"Rate it\"\n",
    )
    .unwrap();
    let e = JudgeConfig::load(&path).unwrap_err().to_string();
    assert!(e.contains("{prompt}"), "{e}");
    std::fs::write(
        &path,
        "url = \"x\"\nmodel = \"m\"\ntemplate = \"{prompt}\"\n",
    )
    .unwrap();
    let e = JudgeConfig::load(&path).unwrap_err().to_string();
    assert!(e.contains("not an http(s) URL"), "{e}");
}

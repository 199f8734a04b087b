//! Several reward servers of one scorer as one [`Scorer`]: each batch is split into contiguous
//! chunks, one per server, scored concurrently, and put back in order. A chunk whose server
//! fails (after that server's own retries) is scored by the next server instead, so a run keeps
//! labelling while one replica restarts; only when every server fails does the batch fail.

use async_trait::async_trait;
use tokio::task::JoinSet;

use super::{HttpError, HttpScorer, HttpScorerOptions};
use crate::{check_scores, RewardError, ScoreItem, Scorer, ScorerInfo};

/// Reward servers that serve the same scorer.
#[derive(Debug, Clone)]
pub struct HttpPool {
    servers: Vec<HttpScorer>,
}

impl HttpPool {
    /// Connects to every URL (each checked with its health endpoint) and refuses servers that
    /// report different scorers: their scores could not label the same run's pairs.
    pub async fn connect(urls: &[&str], options: HttpScorerOptions) -> Result<HttpPool, HttpError> {
        let mut servers = Vec::with_capacity(urls.len());
        for url in urls {
            servers.push(HttpScorer::connect(url, options.clone()).await?);
        }
        let Some(first) = servers.first() else {
            return Err(HttpError::Url {
                url: String::new(),
                why: "no reward server URL given".into(),
            });
        };
        if let Some(other) = servers.iter().find(|s| s.info() != first.info()) {
            return Err(HttpError::Incompatible {
                url: other.url().to_owned(),
                why: format!(
                    "serves {}, but {} serves {}; every URL of reward.model must serve the same \
                     scorer",
                    other.info(),
                    first.url(),
                    first.info()
                ),
            });
        }
        Ok(HttpPool { servers })
    }

    /// The servers' URLs, in order.
    pub fn urls(&self) -> Vec<&str> {
        self.servers.iter().map(HttpScorer::url).collect()
    }
}

#[async_trait]
impl Scorer for HttpPool {
    fn info(&self) -> ScorerInfo {
        self.servers[0].info()
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        let n = self.servers.len().min(items.len().max(1));
        let size = items.len().div_ceil(n).max(1);
        let mut tasks = JoinSet::new();
        for (index, chunk) in items.chunks(size).enumerate() {
            // Owned copies: the tasks outlive this borrow of `items`.
            let owned: Vec<(String, image::RgbImage)> = chunk
                .iter()
                .map(|it| (it.prompt.to_owned(), it.image.clone()))
                .collect();
            let servers = self.servers.clone();
            tasks.spawn(async move {
                let items: Vec<ScoreItem> = owned
                    .iter()
                    .map(|(prompt, image)| ScoreItem { prompt, image })
                    .collect();
                let mut failures = Vec::new();
                // This chunk's own server first, then the others in turn.
                for k in 0..servers.len() {
                    let server = &servers[(index + k) % servers.len()];
                    match server.score(&items).await {
                        Ok(scores) => return (index, Ok(scores)),
                        Err(e) => failures.push(format!("{}: {e}", server.url())),
                    }
                }
                (index, Err(failures.join("; ")))
            });
        }
        let mut parts: Vec<Option<Vec<f32>>> = vec![None; tasks.len()];
        while let Some(joined) = tasks.join_next().await {
            let (index, result) =
                joined.map_err(|e| RewardError::Config(format!("a scoring task failed: {e}")))?;
            parts[index] = Some(result.map_err(|why| {
                RewardError::Config(format!("every reward server failed a batch: {why}"))
            })?);
        }
        let scores = parts.into_iter().flatten().flatten().collect();
        check_scores(&self.info(), items, scores)
    }
}

//! Rust-side pair records: one [`PairRecord`] per row of the store, with its labels and enums.

use super::schema::col;

/// Which side won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// Side 0 is preferred.
    Side0,
    /// Side 1 is preferred.
    Side1,
    /// Neither is preferred (equal scores, or a human tie).
    Tie,
}

impl Label {
    /// The stored value: 0, 1, or -1 for a tie.
    pub fn code(self) -> i8 {
        match self {
            Label::Side0 => 0,
            Label::Side1 => 1,
            Label::Tie => -1,
        }
    }

    /// Parses a stored value.
    pub fn from_code(code: i8) -> Option<Label> {
        match code {
            0 => Some(Label::Side0),
            1 => Some(Label::Side1),
            -1 => Some(Label::Tie),
            _ => None,
        }
    }

    /// The label that prefers the higher score (or the lower one when lower is better).
    pub fn from_scores(score_0: f32, score_1: f32, higher_is_better: bool) -> Label {
        let (a, b) = if higher_is_better {
            (score_0, score_1)
        } else {
            (score_1, score_0)
        };
        if a > b {
            Label::Side0
        } else if b > a {
            Label::Side1
        } else {
            Label::Tie
        }
    }
}

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored text.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "`{s}` is not one of: {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// Where a pair came from.
    Source {
        /// Sampled by the policy during an online run.
        Online => "online",
        /// Imported from a human-preference dataset.
        Imported => "imported",
        /// Copied from another store and labelled again by another scorer.
        Relabelled => "relabelled",
    }
}

string_enum! {
    /// Encoding of the image bytes of both sides.
    ImageFormat {
        /// PNG (lossless; what the online loop writes).
        Png => "png",
        /// JPEG, kept as imported.
        Jpeg => "jpeg",
    }
}

string_enum! {
    /// Element type of stored latents (little-endian, row-major).
    LatentDType {
        /// IEEE half precision.
        F16 => "f16",
        /// bfloat16.
        Bf16 => "bf16",
        /// IEEE single precision.
        F32 => "f32",
    }
}

impl LatentDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            LatentDType::F16 | LatentDType::Bf16 => 2,
            LatentDType::F32 => 4,
        }
    }
}

impl ImageFormat {
    /// Whether `bytes` start with this format's signature.
    pub fn matches(self, bytes: &[u8]) -> bool {
        match self {
            ImageFormat::Png => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            ImageFormat::Jpeg => bytes.starts_with(&[0xFF, 0xD8, 0xFF]),
        }
    }
}

/// Latents of both sides: the final latent, and optionally the whole sampling trajectory.
#[derive(Debug, Clone, PartialEq)]
pub struct Latents {
    /// Element type of every latent buffer.
    pub dtype: LatentDType,
    /// Shape of one latent, `[C, H, W]`.
    pub shape: Vec<i32>,
    /// Final latent (x0) of each side.
    pub final_latents: [Vec<u8>; 2],
    /// Every latent of each side's trajectory, x_T first and x0 last:
    /// `timesteps.len() + 1` latents of `shape`, stacked.
    pub trajectories: Option<[Vec<u8>; 2]>,
}

impl Latents {
    /// Bytes of one latent.
    pub fn latent_bytes(&self) -> usize {
        self.dtype.size()
            * self
                .shape
                .iter()
                .map(|&d| d.max(0) as usize)
                .product::<usize>()
    }
}

/// What is stored of one side of a pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// Seed of the initial noise (unknown for imported pairs).
    pub seed: Option<u64>,
    /// Encoded image ([`PairRecord::image_format`]).
    pub image: Vec<u8>,
    /// Reward of this side.
    pub score: f32,
}

/// One labelled pair: a row of the store.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRecord {
    /// Run that produced (or imported) the pair.
    pub run_id: String,
    /// Sequence number within the run, from 0.
    pub pair_id: i64,
    /// Microseconds since the Unix epoch, UTC.
    pub created_at_us: i64,
    /// Learner step whose policy sampled the pair; `None` when imported.
    pub policy_version: Option<i64>,
    /// Where the pair came from.
    pub source: Source,
    /// Text prompt (or class name for class-conditional models).
    pub prompt: String,
    /// Negative prompt, when guidance used one.
    pub negative_prompt: Option<String>,
    /// Model folder or hub id that sampled the images.
    pub model_id: String,
    /// Sampler name (e.g. `euler_ancestral`); `unknown` when imported.
    pub sampler: String,
    /// Timesteps of the sampling schedule, first to last; empty when unknown.
    pub timesteps: Vec<i32>,
    /// Classifier-free guidance scale; `None` when unknown.
    pub guidance: Option<f32>,
    /// Image height in pixels.
    pub height: i32,
    /// Image width in pixels.
    pub width: i32,
    /// Encoding of both images.
    pub image_format: ImageFormat,
    /// Side 0 and side 1.
    pub sides: [Side; 2],
    /// Scorer that labelled the pair (`human` for imported preferences).
    pub scorer: String,
    /// Version of that scorer (model revision, protocol version, dataset name).
    pub scorer_version: String,
    /// Which side won.
    pub label: Label,
    /// Latents of both sides, when kept.
    pub latents: Option<Latents>,
}

impl PairRecord {
    /// Checks the invariants the schema cannot express; the message names the column.
    pub fn check(&self) -> Result<(), String> {
        if self.run_id.is_empty() {
            return Err(format!("{}: empty", col::RUN_ID));
        }
        if self.pair_id < 0 {
            return Err(format!("{}: {} is negative", col::PAIR_ID, self.pair_id));
        }
        if self.height <= 0 || self.width <= 0 {
            return Err(format!(
                "{}/{}: {}x{} is not a positive size",
                col::HEIGHT,
                col::WIDTH,
                self.height,
                self.width
            ));
        }
        if let Some(g) = self.guidance {
            if !g.is_finite() {
                return Err(format!("{}: {g} is not finite", col::GUIDANCE));
            }
        }
        for (i, side) in self.sides.iter().enumerate() {
            if !side.score.is_finite() {
                return Err(format!("score_{i}: {} is not finite", side.score));
            }
            if !self.image_format.matches(&side.image) {
                return Err(format!(
                    "image_{i}: {} bytes that do not start with a {} signature",
                    side.image.len(),
                    self.image_format
                ));
            }
        }
        if let Some(lat) = &self.latents {
            if lat.shape.is_empty() || lat.shape.iter().any(|&d| d <= 0) {
                return Err(format!(
                    "{}: {:?} is not a shape of positive sizes",
                    col::LATENT_SHAPE,
                    lat.shape
                ));
            }
            let one = lat.latent_bytes();
            for (i, buf) in lat.final_latents.iter().enumerate() {
                if buf.len() != one {
                    return Err(format!(
                        "latents_{i}: {} bytes, expected {one} ({} {:?})",
                        buf.len(),
                        lat.dtype,
                        lat.shape
                    ));
                }
            }
            if let Some(trajectories) = &lat.trajectories {
                let want = one * (self.timesteps.len() + 1);
                for (i, buf) in trajectories.iter().enumerate() {
                    if buf.len() != want {
                        return Err(format!(
                            "trajectory_{i}: {} bytes, expected {want} ({} latents of {} {:?}: one per timestep plus x0)",
                            buf.len(),
                            self.timesteps.len() + 1,
                            lat.dtype,
                            lat.shape
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

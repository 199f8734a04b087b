//! What a config section's own checks return: the dotted key and what is expected, for each
//! check that failed. A leaf, so every module that owns a section can check it.

/// (dotted key, what is expected) for each failed check, in check order.
pub type Problems = Vec<(&'static str, String)>;

/// The checks among `checks` (holds, key, what is expected) that do not hold.
pub fn failing<const N: usize>(checks: [(bool, &'static str, String); N]) -> Problems {
    checks
        .into_iter()
        .filter(|(holds, _, _)| !holds)
        .map(|(_, key, expected)| (key, expected))
        .collect()
}

//! Seeds derived from the run seed, so every random draw can be repeated after a resume.

/// A seed for (run seed, step, micro-batch): every random draw of a step derives from it, so a
/// resumed run draws exactly what an uninterrupted one would.
pub fn step_seed(seed: u64, step: u64, micro: u32) -> u64 {
    // SplitMix64 over the three words.
    let mut z = seed
        ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (micro as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

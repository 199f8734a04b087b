//! The procedural dataset: one shape (circle, square or triangle) of one colour and size, at a
//! random position on a plain background of another colour, with its caption ("a small red
//! circle on a blue background"). Everything is drawn from a seeded generator, so a seed names
//! a dataset.

use image::{Rgb, RgbImage};
use rand::Rng;

/// Shape names, as they appear in captions.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// Colour names and their sRGB values; backgrounds use the same palette.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 210, 40]),
    ("white", [240, 240, 240]),
    ("black", [20, 20, 20]),
];
/// Size names; a size is a range of radii relative to the image side.
pub const SIZES: [&str; 2] = ["small", "large"];

/// Radius range (fraction of the side) per size: small 4–6 px and large 9–12 px at 32².
const RADII: [(f32, f32); 2] = [(0.125, 0.1875), (0.28, 0.375)];
/// Supersampling per axis: edges are anti-aliased as a renderer would.
const SUPERSAMPLE: u32 = 4;

/// What a caption says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`] of the shape.
    pub colour: usize,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Index into [`COLOURS`] of the background (never the shape's).
    pub background: usize,
}

impl Attributes {
    /// Uniform attributes with background ≠ colour.
    pub fn random(rng: &mut impl Rng) -> Attributes {
        let colour = rng.random_range(0..COLOURS.len());
        let mut background = rng.random_range(0..COLOURS.len() - 1);
        if background >= colour {
            background += 1;
        }
        Attributes {
            shape: rng.random_range(0..SHAPES.len()),
            colour,
            size: rng.random_range(0..SIZES.len()),
            background,
        }
    }

    /// "a small red circle on a blue background".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} {} on a {} background",
            SIZES[self.size],
            COLOURS[self.colour].0,
            SHAPES[self.shape],
            COLOURS[self.background].0
        )
    }

    /// Reads a caption written by [`Attributes::caption`] (case and spacing free).
    pub fn parse(caption: &str) -> Option<Attributes> {
        let words: Vec<String> = caption.split_whitespace().map(str::to_lowercase).collect();
        let [a, size, colour, shape, on, a2, background, tail] = words.as_slice() else {
            return None;
        };
        if (a, on, a2, tail) != (&"a".into(), &"on".into(), &"a".into(), &"background".into()) {
            return None;
        }
        let colour_index = |name: &str| COLOURS.iter().position(|(c, _)| *c == name);
        let attributes = Attributes {
            shape: SHAPES.iter().position(|s| s == shape)?,
            colour: colour_index(colour)?,
            size: SIZES.iter().position(|s| s == size)?,
            background: colour_index(background)?,
        };
        (attributes.colour != attributes.background).then_some(attributes)
    }

    /// Every caption word, for the tokenizer's vocabulary.
    pub fn words() -> Vec<&'static str> {
        let mut words = vec!["a", "on", "background"];
        words.extend(SIZES);
        words.extend(COLOURS.iter().map(|(c, _)| *c));
        words.extend(SHAPES);
        words
    }
}

/// One image of the dataset and where its shape is.
#[derive(Debug, Clone)]
pub struct Example {
    /// What the caption says.
    pub attributes: Attributes,
    /// The shape's centre in pixels (x, y).
    pub centre: (f32, f32),
    /// The shape's radius in pixels.
    pub radius: f32,
    /// The rendered image.
    pub image: RgbImage,
}

/// Draws one example of side `side` (the shape lies wholly inside, with a pixel to spare).
pub fn example(rng: &mut impl Rng, side: u32) -> Example {
    let attributes = Attributes::random(rng);
    let (lo, hi) = RADII[attributes.size];
    let s = side as f32;
    let radius = rng.random_range(lo * s..hi * s);
    let margin = radius + 1.0;
    let centre = (
        rng.random_range(margin..s - margin),
        rng.random_range(margin..s - margin),
    );
    let image = render(&attributes, centre, radius, side);
    Example {
        attributes,
        centre,
        radius,
        image,
    }
}

/// Whether the point (x, y) lies inside the shape.
fn inside(shape: usize, (cx, cy): (f32, f32), r: f32, x: f32, y: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match SHAPES[shape] {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        // Equilateral, apex up (y grows downwards), inscribed in the circle of radius r: the
        // half-width grows linearly from 0 at the apex to r·√3/2 at the base.
        _ => {
            let half_width = (dy + r) / (1.5 * r) * r * 3f32.sqrt() / 2.0;
            (-r..=r / 2.0).contains(&dy) && dx.abs() <= half_width
        }
    }
}

/// Renders the shape with anti-aliased edges.
pub fn render(attributes: &Attributes, centre: (f32, f32), radius: f32, side: u32) -> RgbImage {
    let fg = COLOURS[attributes.colour].1.map(f32::from);
    let bg = COLOURS[attributes.background].1.map(f32::from);
    let n = SUPERSAMPLE;
    RgbImage::from_fn(side, side, |px, py| {
        let mut hits = 0;
        for sy in 0..n {
            for sx in 0..n {
                let x = px as f32 + (sx as f32 + 0.5) / n as f32;
                let y = py as f32 + (sy as f32 + 0.5) / n as f32;
                hits += inside(attributes.shape, centre, radius, x, y) as u32;
            }
        }
        let cover = hits as f32 / (n * n) as f32;
        Rgb(std::array::from_fn(|c| {
            (fg[c] * cover + bg[c] * (1.0 - cover)).round() as u8
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn captions_round_trip_and_bad_ones_are_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let a = Attributes::random(&mut rng);
            assert_ne!(a.colour, a.background);
            assert_eq!(Attributes::parse(&a.caption()), Some(a));
        }
        assert_eq!(
            Attributes::parse("A  Large GREEN square on a red background")
                .unwrap()
                .caption(),
            "a large green square on a red background"
        );
        for bad in [
            "a large green square on a green background",
            "a large green hexagon on a red background",
            "a large green square",
        ] {
            assert_eq!(Attributes::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn shapes_cover_what_their_size_says_and_stay_inside() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..100 {
            let e = example(&mut rng, 32);
            let bg = COLOURS[e.attributes.background].1;
            let covered = e.image.pixels().filter(|p| p.0 != bg).count() as f32;
            let area = std::f32::consts::PI * e.radius * e.radius;
            // Circle πr², square (1.7r)², triangle (3√3/4)r²: all within a factor of 3 of πr².
            assert!(
                covered > area / 3.0 && covered < area * 1.3,
                "{covered} vs {area}"
            );
            let border = (0..32).flat_map(|i| [(i, 0), (0, i), (i, 31), (31, i)]);
            for (x, y) in border {
                assert_eq!(e.image.get_pixel(x, y).0, bg, "shape touches the border");
            }
        }
    }

    #[test]
    fn a_seed_names_a_dataset() {
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..4)
                .map(|_| example(&mut rng, 32).image)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }
}

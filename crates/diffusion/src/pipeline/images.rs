//! 8-bit images out of the pipelines: a [K, H, W, 3] tensor as `RgbImage`s, and PNG bytes.

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder as _, RgbImage};
use tch::{Kind, Tensor};

/// Decoded images [N, 3, H, W] in [-1, 1] as diffusers' `output_type="pil"` makes them:
/// [N, H, W, 3] uint8 on the CPU, (x / 2 + 0.5) clamped, times 255, rounded.
pub fn pil_uint8(images: &Tensor) -> Tensor {
    ((images.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .to_device(tch::Device::Cpu)
}

/// The images of a [K, H, W, 3] uint8 tensor.
pub fn rgb_images(images: &Tensor) -> Vec<RgbImage> {
    let images = images.to_kind(Kind::Uint8).contiguous();
    let (h, w) = (images.size()[1] as u32, images.size()[2] as u32);
    (0..images.size()[0])
        .map(|i| {
            let bytes = Vec::<u8>::try_from(&images.get(i).flatten(0, -1))
                .expect("a uint8 tensor converts to bytes");
            RgbImage::from_raw(w, h, bytes).expect("H·W·3 bytes")
        })
        .collect()
}

/// PNG bytes of an image: `Fast` for images written while training (what `image` writes by
/// default), `Best` where the bytes are kept and sent around (report pages).
pub fn png(image: &RgbImage, compression: CompressionType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, compression, FilterType::Adaptive)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("PNG encoding of an RgbImage into memory cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_png_is_what_image_writes_by_default() {
        let image = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let mut default = Vec::new();
        image
            .write_to(
                &mut std::io::Cursor::new(&mut default),
                image::ImageFormat::Png,
            )
            .unwrap();
        assert_eq!(png(&image, CompressionType::Fast), default);
        let best = png(&image, CompressionType::Best);
        let back = image::load_from_memory(&best).unwrap().to_rgb8();
        assert_eq!(back, image);
    }

    #[test]
    fn rgb_images_splits_the_batch() {
        let t = Tensor::arange(2 * 2 * 3 * 3, (Kind::Uint8, tch::Device::Cpu)).view([2, 2, 3, 3]);
        let images = rgb_images(&t);
        assert_eq!(images.len(), 2);
        assert_eq!((images[1].width(), images[1].height()), (3, 2));
        assert_eq!(images[1].get_pixel(0, 0).0, [18, 19, 20]);
    }
}

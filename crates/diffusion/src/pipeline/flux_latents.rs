//! The FLUX pipelines' latent layout (pipelines/flux/pipeline_flux.py): the 16-channel VAE
//! latent packed into tokens of 2 × 2 patches (`_pack_latents` / `_unpack_latents`), and the
//! (0, row, column) position ids of those tokens (`_prepare_latent_image_ids`) that the
//! transformer's rotary embedding reads; the prompt's ids are zeros.

use tch::{Device, Kind, Tensor};

/// [B, C, H, W] → [B, (H/2)·(W/2), 4C]: each token is a 2 × 2 patch, channels first.
pub fn pack(latents: &Tensor) -> Result<Tensor, String> {
    let size = latents.size();
    let [b, c, h, w] = size[..] else {
        return Err(format!("a FLUX latent is [B, C, H, W], not {size:?}"));
    };
    if h % 2 != 0 || w % 2 != 0 {
        return Err(format!(
            "a {h}x{w} latent: FLUX packs 2 × 2 patches, so both sides must be even (image \
             sides multiples of 16)"
        ));
    }
    Ok(latents
        .view([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / 2) * (w / 2), c * 4]))
}

/// The inverse of [`pack`] for a latent of `height` × `width`.
pub fn unpack(tokens: &Tensor, height: i64, width: i64) -> Result<Tensor, String> {
    let size = tokens.size();
    let [b, n, channels] = size[..] else {
        return Err(format!("packed FLUX tokens are [B, N, 4C], not {size:?}"));
    };
    if height % 2 != 0 || width % 2 != 0 || n != (height / 2) * (width / 2) || channels % 4 != 0 {
        return Err(format!(
            "{n} tokens of {channels} values do not make a {height}x{width} latent"
        ));
    }
    Ok(tokens
        .view([b, height / 2, width / 2, channels / 4, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, channels / 4, height, width]))
}

/// Position ids [rows · columns, 3] of a token grid: (0, row, column), row-major.
pub fn image_ids(rows: i64, columns: i64, device: Device) -> Tensor {
    let row = Tensor::arange(rows, (Kind::Float, device))
        .unsqueeze(1)
        .expand([rows, columns], false);
    let column = Tensor::arange(columns, (Kind::Float, device))
        .unsqueeze(0)
        .expand([rows, columns], false);
    Tensor::stack(&[row.zeros_like(), row, column], -1).reshape([rows * columns, 3])
}

/// The prompt tokens' position ids: zeros [L, 3].
pub fn text_ids(tokens: i64, device: Device) -> Tensor {
    Tensor::zeros([tokens, 3], (Kind::Float, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_and_refuses_odd_sides() {
        let x = Tensor::randn([2, 16, 4, 6], (Kind::Float, Device::Cpu));
        let packed = pack(&x).unwrap();
        assert_eq!(packed.size(), [2, 6, 64]);
        assert!(unpack(&packed, 4, 6).unwrap().equal(&x));
        assert!(pack(&Tensor::zeros([1, 16, 3, 4], (Kind::Float, Device::Cpu))).is_err());
        assert!(unpack(&packed, 4, 8).is_err());
    }

    #[test]
    fn image_ids_are_row_and_column() {
        let ids = image_ids(2, 3, Device::Cpu);
        let v = Vec::<f32>::try_from(ids.flatten(0, -1)).unwrap();
        assert_eq!(
            v,
            [0., 0., 0., 0., 0., 1., 0., 0., 2., 0., 1., 0., 0., 1., 1., 0., 1., 2.]
        );
    }
}

//! FLUX generation against diffusers' `FluxPipeline` on tiny random folders built by the oracle
//! (scripts/oracle/make_flux_pipeline.py): schnell (no guidance embedding, static shift) and a
//! dev-like folder (embedded guidance, dynamic shift by the image's token count), from given
//! latents, 2 steps, through pso's one `Pipeline` and `pso sample`.

mod common;

use tch::Tensor;

#[test]
fn flux_schnell_and_dev_generations_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_flux_pipeline.py", &[dir.path().as_os_str()]);
    let prompts = [
        "a red cat",
        "a photo of a dog on the grass",
        "a cat and a dog",
    ];
    for variant in ["schnell", "dev"] {
        let folder = dir.path().join(variant);
        let io: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(folder.join("io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let images = common::generate_each(&folder, &prompts, &io["latents"], 2, 3.5);
        let theirs = &io["images"];
        assert_eq!(images.size(), theirs.size(), "{variant}");
        let diff = (&images - theirs).abs().max().double_value(&[]);
        assert!(diff <= 1e-4, "{variant} images: max |Δ| {diff}");
        common::sample_matches(
            &folder,
            &prompts,
            &io["latents"],
            theirs,
            &[
                "--steps",
                "2",
                "--guidance",
                "3.5",
                "--max-sequence-length",
                "12",
            ],
        );
    }
}

//! The multimodal golden checks, generic over the backend: images decoded and preprocessed by
//! our code, soft tokens from our vision tower, then logits and greedy continuations of prompts
//! that place images among text, all against transformers.

use gemma4_conformance::{name, vision_fixtures};
use gemma4_model::golden::*;
use gemma4_model::vision::preprocess::{
    decode_image, preprocess, DecodeLimits, ImageProcessorConfig,
};
use gemma4_model::vision::PreprocessedImage;
use gemma4_model::{Gemma4Backend, Logits, Model};

use burn::tensor::Tensor;

fn to_vec<B: Gemma4Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn image(dir: &std::path::Path, file: &str, budget: usize) -> PreprocessedImage {
    let bytes = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let rgb =
        decode_image(&bytes, &DecodeLimits::default()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let cfg = ImageProcessorConfig::from_dir(dir).expect("processor config");
    preprocess(&rgb, &cfg, budget).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The image as PIL decoded it (for files whose decoders legitimately differ, i.e. JPEG).
fn image_from_reference_pixels(
    dir: &std::path::Path,
    tensor: &str,
    budget: usize,
) -> PreprocessedImage {
    let (pixels, shape) = reference_u8(dir, tensor).unwrap();
    let rgb = image::RgbImage::from_raw(shape[1] as u32, shape[0] as u32, pixels)
        .expect("[h, w, 3] pixels");
    let cfg = ImageProcessorConfig::from_dir(dir).expect("processor config");
    preprocess(&rgb, &cfg, budget).unwrap()
}

/// Every fixture image: our preprocessing + vision tower against the reference's soft tokens.
pub fn soft_tokens_match_reference<B: Gemma4Backend>(device: &B::Device, tol: Tolerances) {
    for dir in vision_fixtures() {
        let model = crate::suite::load::<B>(&dir, device);
        for case in load_vision_reference(&dir).unwrap().images {
            let img = match (&case.decoded_tensor, case.decode_exact) {
                // JPEG: our decoder and libjpeg differ by a few levels, which is measured in the
                // preprocessing tests; here the tower is checked on PIL's pixels.
                (Some(t), false) => image_from_reference_pixels(&dir, t, case.max_soft_tokens),
                _ => image(&dir, &case.file, case.max_soft_tokens),
            };
            assert_eq!(
                img.num_soft_tokens, case.num_soft_tokens,
                "{}: soft token count",
                case.file
            );
            let got = to_vec(model.encode_image(&img).unwrap());
            let (expected, shape) = reference_f32(&dir, &case.soft_tokens_tensor).unwrap();
            assert_eq!(shape[0], case.num_soft_tokens);
            let (d, at) = max_abs_diff(&got, &expected);
            println!(
                "{}/{}: {} soft tokens, max|Δ| = {d:.2e} (tolerance {:.1e})",
                name(&dir),
                case.file,
                shape[0],
                tol.soft_tokens
            );
            assert!(
                d <= tol.soft_tokens,
                "{}: soft tokens differ by {d} at flat index {at}",
                case.file
            );
        }
    }
}

/// Soft tokens of a case's images, concatenated in prompt order.
fn case_soft<B: Gemma4Backend>(
    model: &Model<B>,
    dir: &std::path::Path,
    case: &MultimodalCase,
    budgets: &[ImageCase],
) -> Tensor<B, 2> {
    let rows: Vec<Tensor<B, 2>> = case
        .images
        .iter()
        .map(|file| {
            let budget = budgets
                .iter()
                .find(|c| &c.file == file)
                .map_or(70, |c| c.max_soft_tokens);
            model.encode_image(&image(dir, file, budget)).unwrap()
        })
        .collect();
    Tensor::cat(rows, 0)
}

/// Logits at every position within `tol.logits`, and greedy continuations (through the KV
/// cache, image tokens prefilled in one piece) identical to the reference's.
pub fn multimodal_cases_match_reference<B: Gemma4Backend>(device: &B::Device, tol: Tolerances) {
    for dir in vision_fixtures() {
        let model = crate::suite::load::<B>(&dir, device);
        let reference = load_vision_reference(&dir).unwrap();
        for case in &reference.multimodal_cases {
            let soft = case_soft(&model, &dir, case, &reference.images);
            let mut seq = case.prompt_ids.clone();
            seq.extend(&case.greedy_ids);
            let got = to_vec(
                model
                    .text
                    .forward_multimodal(
                        &seq,
                        Some(soft.clone()),
                        &mut model.text.new_cache(),
                        Logits::All,
                    )
                    .unwrap(),
            );
            let (expected, shape) = reference_logits(&dir, &case.name).unwrap();
            let (d, at) = max_abs_diff(&got, &expected);
            println!(
                "{}/{}: {} positions, {} images, max|Δlogit| = {d:.2e} (tolerance {:.1e})",
                name(&dir),
                case.name,
                shape[0],
                case.images.len(),
                tol.logits
            );
            assert!(
                d <= tol.logits,
                "{}/{}: max|Δ| {d} at position {}",
                name(&dir),
                case.name,
                at / shape[1]
            );

            // Greedy through the cache: the prompt (with its images) in one prefill, then one
            // token at a time.
            let mut cache = model.text.new_cache();
            let mut row = to_vec(
                model
                    .text
                    .forward_multimodal(&case.prompt_ids, Some(soft), &mut cache, Logits::Last)
                    .unwrap(),
            );
            let mut tokens = Vec::new();
            for _ in 0..case.greedy_ids.len() {
                let next = gemma4_model::sampling::argmax(&row, &[]).expect("a finite logit");
                tokens.push(next);
                row = to_vec(
                    model
                        .text
                        .forward(&[next], &mut cache, Logits::Last)
                        .unwrap(),
                );
            }
            super::assert_greedy(
                &dir,
                &case.name,
                case.min_greedy_margin.into(),
                &tokens,
                &case.greedy_ids,
            );
        }
    }
}

/// Prefix caching with images (`suite::prefix::image_cases`), on two fixture images of the
/// same soft-token count.
pub fn prefix_cases<B: Gemma4Backend>(device: &B::Device, tol: Tolerances) {
    for dir in vision_fixtures() {
        let a = image(&dir, "images/noise_square.png", 70);
        let b = image(&dir, "images/checker_gray.png", 70);
        crate::suite::prefix::image_cases::<B>(&dir, [&a, &b], device, tol);
    }
}

//! Image preprocessing against the reference processor (fixtures/tiny-vision, made by
//! transformers 5.23.0's Gemma4ImageProcessor, torchvision backend): decoded RGB, pixel values,
//! positions and soft-token counts of every fixture image, the resize kernel on direct cases, the
//! target-size table, the processor config, and decode errors. Tolerance: exact (bit-identical
//! pixel values), everywhere.
//!
//! `pixel_diff_real_photos` (ignored) measures real photographs against reference values written by
//! `conformance/fixtures_gen/pixel_diff.py`.

use std::path::{Path, PathBuf};

use gemma4_model::testing::png_header;
use gemma4_model::vision::preprocess::{
    aspect_ratio_preserving_size, decode_image, preprocess, resize_bicubic_antialias, DecodeLimits,
    ImageProcessorConfig, PreprocessError, PreprocessedImage, RESCALE_FACTOR,
    SUPPORTED_SOFT_TOKENS,
};
use image::RgbImage;
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-vision")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture().join("reference.json"))
        .expect("fixtures/tiny-vision/reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

struct Tensors(Vec<u8>);

impl Tensors {
    fn load() -> Self {
        Tensors(
            std::fs::read(fixture().join("reference.safetensors")).expect("reference.safetensors"),
        )
    }
    fn get(&self, name: &str) -> (safetensors::Dtype, Vec<usize>, Vec<u8>) {
        let st =
            safetensors::SafeTensors::deserialize(&self.0).expect("reference.safetensors parses");
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }
    fn u8_image(&self, name: &str) -> RgbImage {
        let (dt, shape, data) = self.get(name);
        assert_eq!(dt, safetensors::Dtype::U8, "{name}");
        assert_eq!(shape.len(), 3, "{name}");
        assert_eq!(shape[2], 3, "{name}");
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).expect("sized")
    }
    fn i64s(&self, name: &str) -> Vec<i64> {
        let (dt, _, data) = self.get(name);
        assert_eq!(dt, safetensors::Dtype::I64, "{name}");
        data.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// JPEG decoding (zune-jpeg, in the `image` crate) against Pillow's libjpeg-turbo: max |d| per
/// value, in 1/255 (IDCT, chroma upsampling and YCbCr -> RGB rounding differ).
const JPEG_TOLERANCE: i32 = 4;
/// The same difference after the bicubic resize (whose negative lobes can enlarge it): max |d| of
/// the pixel values from a JPEG, in 1/255.
const JPEG_PIXEL_TOLERANCE: f32 = 6.0;

/// Asserts max |got - want| <= tol per value, and prints the statistics.
fn assert_close_image(what: &str, got: &RgbImage, want: &RgbImage, tol: i32) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}: size");
    let (mut n, mut max, mut sum) = (0usize, 0i32, 0i64);
    for (&a, &b) in got.as_raw().iter().zip(want.as_raw()) {
        let d = (i32::from(a) - i32::from(b)).abs();
        n += usize::from(d > 0);
        max = max.max(d);
        sum += i64::from(d);
    }
    let len = got.as_raw().len();
    println!(
        "{what}: max |d| {max}/255, mean {:.4}/255, {:.2}% of values differ",
        sum as f64 / len as f64,
        100.0 * n as f64 / len as f64
    );
    assert!(
        max <= tol,
        "{what}: max |d| = {max}/255 > {tol}/255 ({n} of {len} values differ)"
    );
}

/// Compares two u8 images; on mismatch, says how many values differ and by how much.
fn assert_same_image(what: &str, got: &RgbImage, want: &RgbImage) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}: size");
    let (n, max) =
        got.as_raw()
            .iter()
            .zip(want.as_raw())
            .fold((0usize, 0i32), |(n, m), (&a, &b)| {
                let d = (i32::from(a) - i32::from(b)).abs();
                (n + usize::from(d > 0), m.max(d))
            });
    assert!(
        n == 0,
        "{what}: {n} of {} values differ, max |d| = {max}/255",
        got.as_raw().len()
    );
}

/// The reference pixel values: the resized uint8 image (stored losslessly as PNG) patchified and
/// multiplied by float32(1/255), as the processor computes them.
fn expected_pixels(resized: &RgbImage, patch: usize) -> Vec<f32> {
    let (w, h) = (resized.width() as usize, resized.height() as usize);
    let raw = resized.as_raw();
    let mut out = Vec::with_capacity(w * h * 3);
    for py in 0..h / patch {
        for px in 0..w / patch {
            for r in 0..patch {
                let row = (py * patch + r) * w * 3 + px * patch * 3;
                out.extend(
                    raw[row..row + patch * 3]
                        .iter()
                        .map(|&v| v as f32 * RESCALE_FACTOR),
                );
            }
        }
    }
    out
}

fn check_pixels(what: &str, got: &PreprocessedImage, resized: &RgbImage, patch: usize) {
    assert_eq!(
        got.patches_h * patch,
        resized.height() as usize,
        "{what}: patches_h"
    );
    assert_eq!(
        got.patches_w * patch,
        resized.width() as usize,
        "{what}: patches_w"
    );
    let want = expected_pixels(resized, patch);
    assert_eq!(got.pixel_values.len(), want.len(), "{what}: pixel count");
    let mut n = 0usize;
    let mut max = 0f32;
    for (a, b) in got.pixel_values.iter().zip(&want) {
        if a.to_bits() != b.to_bits() {
            n += 1;
            max = max.max((a - b).abs() * 255.0);
        }
    }
    assert!(
        n == 0,
        "{what}: {n} of {} pixel values differ, max |d| = {max:.1}/255",
        want.len()
    );
}

fn load_png(rel: &str) -> RgbImage {
    image::load_from_memory_with_format(&read(rel), image::ImageFormat::Png)
        .expect(rel)
        .to_rgb8()
}

#[test]
fn processor_config_of_the_fixture() {
    let cfg = ImageProcessorConfig::from_dir(&fixture()).unwrap();
    assert_eq!(
        cfg,
        ImageProcessorConfig {
            patch_size: 16,
            pooling_kernel_size: 3,
            max_soft_tokens: 70
        }
    );
}

#[test]
fn processor_config_files_and_defaults() {
    let dir = std::env::temp_dir().join(format!("gemma4-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clean = |d: &Path| {
        let _ = std::fs::remove_file(d.join("processor_config.json"));
        let _ = std::fs::remove_file(d.join("preprocessor_config.json"));
    };
    clean(&dir);
    assert_eq!(
        ImageProcessorConfig::from_dir(&dir).unwrap(),
        ImageProcessorConfig::default()
    );
    assert_eq!(
        ImageProcessorConfig::default(),
        ImageProcessorConfig {
            patch_size: 16,
            pooling_kernel_size: 3,
            max_soft_tokens: 280
        }
    );
    // Flat (older) file.
    std::fs::write(
        dir.join("preprocessor_config.json"),
        r#"{"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 560}"#,
    )
    .unwrap();
    assert_eq!(
        ImageProcessorConfig::from_dir(&dir)
            .unwrap()
            .max_soft_tokens,
        560
    );
    // The nested one wins when it has an image_processor.
    std::fs::write(
        dir.join("processor_config.json"),
        r#"{"image_processor": {"max_soft_tokens": 1120, "patch_size": 16}}"#,
    )
    .unwrap();
    assert_eq!(
        ImageProcessorConfig::from_dir(&dir)
            .unwrap()
            .max_soft_tokens,
        1120
    );
    // ... and is skipped when it has none.
    std::fs::write(
        dir.join("processor_config.json"),
        r#"{"processor_class": "Gemma4Processor"}"#,
    )
    .unwrap();
    assert_eq!(
        ImageProcessorConfig::from_dir(&dir)
            .unwrap()
            .max_soft_tokens,
        560
    );
    // Unsupported budget, bad types, bad JSON: errors naming the file.
    std::fs::write(
        dir.join("processor_config.json"),
        r#"{"image_processor": {"max_soft_tokens": 100}}"#,
    )
    .unwrap();
    let e = ImageProcessorConfig::from_dir(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("processor_config.json") && e.contains("100"),
        "{e}"
    );
    std::fs::write(
        dir.join("processor_config.json"),
        r#"{"image_processor": {"patch_size": "16"}}"#,
    )
    .unwrap();
    assert!(ImageProcessorConfig::from_dir(&dir)
        .unwrap_err()
        .to_string()
        .contains("patch_size"));
    std::fs::write(dir.join("processor_config.json"), "{not json").unwrap();
    assert!(matches!(
        ImageProcessorConfig::from_dir(&dir),
        Err(PreprocessError::ConfigFile { .. })
    ));
    clean(&dir);
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn fixture_images_match_the_reference_processor() {
    let reference = reference();
    let tensors = Tensors::load();
    let cfg = ImageProcessorConfig::from_dir(&fixture()).unwrap();
    let images = reference["images"].as_array().expect("images");
    assert!(images.len() >= 10);
    let mut failures = Vec::new();
    for meta in images {
        if let Err(e) = std::panic::catch_unwind(|| check_fixture_image(meta, &tensors, &cfg)) {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "panic".into()),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} images differ from the reference:\n{}",
        failures.len(),
        images.len(),
        failures.join("\n")
    );
}

fn check_fixture_image(meta: &Value, tensors: &Tensors, cfg: &ImageProcessorConfig) {
    let file = meta["file"].as_str().unwrap();
    let decoded = decode_image(&read(file), &DecodeLimits::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(
        (decoded.width() as u64, decoded.height() as u64),
        (
            meta["width"].as_u64().unwrap(),
            meta["height"].as_u64().unwrap()
        ),
        "{file}: decoded size"
    );
    let budget = meta["max_soft_tokens"].as_u64().unwrap() as usize;
    let resized = load_png(meta["resized_file"].as_str().unwrap());
    let got = if meta["decode_exact"].as_bool().unwrap() {
        if let Some(name) = meta["decoded_tensor"].as_str() {
            assert_same_image(
                &format!("{file}: decoded RGB vs PIL"),
                &decoded,
                &tensors.u8_image(name),
            );
        }
        let got = preprocess(&decoded, cfg, budget).unwrap_or_else(|e| panic!("{file}: {e}"));
        check_pixels(file, &got, &resized, cfg.patch_size);
        got
    } else {
        // JPEG: zune-jpeg is not libjpeg-turbo: within JPEG_TOLERANCE, and the rest of the pipeline
        // exact on PIL's decoded RGB.
        let pil = tensors.u8_image(
            meta["decoded_tensor"]
                .as_str()
                .expect("JPEG images store PIL's decoded RGB"),
        );
        assert_close_image(
            &format!("{file}: decoded RGB vs PIL"),
            &decoded,
            &pil,
            JPEG_TOLERANCE,
        );
        check_pixels(
            &format!("{file} from PIL's decoded RGB"),
            &preprocess(&pil, cfg, budget).unwrap(),
            &resized,
            cfg.patch_size,
        );
        let got = preprocess(&decoded, cfg, budget).unwrap();
        let want = expected_pixels(&resized, cfg.patch_size);
        let max = got
            .pixel_values
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() * 255.0)
            .fold(0f32, f32::max);
        println!("{file}: pixel values from the Rust decode: max |d| {max:.1}/255");
        assert!(
            max <= JPEG_PIXEL_TOLERANCE + 1e-3,
            "{file}: pixel values from the Rust decode: max |d| {max}/255"
        );
        got
    };
    assert_eq!(
        got.patches_h as u64,
        meta["patches_h"].as_u64().unwrap(),
        "{file}"
    );
    assert_eq!(
        got.patches_w as u64,
        meta["patches_w"].as_u64().unwrap(),
        "{file}"
    );
    assert_eq!(
        got.num_soft_tokens as u64,
        meta["num_soft_tokens"].as_u64().unwrap(),
        "{file}"
    );
    let pos: Vec<i64> = got.positions.iter().flat_map(|p| *p).collect();
    assert_eq!(
        pos,
        tensors.i64s(meta["image_position_ids_tensor"].as_str().unwrap()),
        "{file}: positions"
    );
    // Not resized when the target is the input size.
    if !meta["resized"].as_bool().unwrap() {
        assert_same_image(&format!("{file}: unresized"), &decoded, &resized);
    }
    println!(
        "{file}: {}x{} -> {}x{}, {} soft tokens: exact",
        decoded.width(),
        decoded.height(),
        resized.width(),
        resized.height(),
        got.num_soft_tokens
    );
}

#[test]
fn decoder_cases_match_pil() {
    let reference = reference();
    let tensors = Tensors::load();
    let cases = reference["decode_cases"].as_array().expect("decode_cases");
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let want = tensors.u8_image(c["decoded_tensor"].as_str().unwrap());
        let r = std::panic::catch_unwind(|| {
            let got = decode_image(&read(file), &DecodeLimits::default())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            if c["exact"].as_bool().unwrap() {
                assert_same_image(file, &got, &want);
                println!("{file}: exact");
            } else {
                assert_close_image(file, &got, &want, JPEG_TOLERANCE);
            }
        });
        if let Err(e) = r {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("{file}: panic")),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} decoder cases differ from PIL:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn other_budgets_match_the_reference_processor() {
    let reference = reference();
    let cfg = ImageProcessorConfig::from_dir(&fixture()).unwrap();
    let cases = reference["budgets"].as_array().expect("budgets");
    assert!(!cases.is_empty());
    for c in cases {
        let file = c["image"].as_str().unwrap();
        let budget = c["max_soft_tokens"].as_u64().unwrap() as usize;
        let decoded = decode_image(&read(file), &DecodeLimits::default()).unwrap();
        let got = preprocess(&decoded, &cfg, budget).unwrap();
        check_pixels(
            &format!("{file} at {budget}"),
            &got,
            &load_png(c["resized_file"].as_str().unwrap()),
            cfg.patch_size,
        );
        assert_eq!(
            got.num_soft_tokens as u64,
            c["num_soft_tokens"].as_u64().unwrap()
        );
    }
}

#[test]
fn resize_kernel_matches_torchvision() {
    let reference = reference();
    let tensors = Tensors::load();
    let cases = reference["resize_cases"].as_array().expect("resize_cases");
    assert!(cases.len() >= 10);
    for c in cases {
        let input = tensors.u8_image(c["input_tensor"].as_str().unwrap());
        let want = tensors.u8_image(c["output_tensor"].as_str().unwrap());
        let t: Vec<usize> = c["target_hw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let got = resize_bicubic_antialias(&input, t[0], t[1]);
        assert_same_image(
            &format!(
                "resize {}x{} -> {}x{}",
                input.height(),
                input.width(),
                t[0],
                t[1]
            ),
            &got,
            &want,
        );
    }
}

#[test]
fn target_sizes_match_the_reference_table() {
    let reference = reference();
    let table = reference["size_table"].as_array().expect("size_table");
    assert!(table.len() > 500);
    for row in table {
        let r: Vec<usize> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let (h, w, budget, th, tw) = (r[0], r[1], r[2], r[3], r[4]);
        assert_eq!(
            aspect_ratio_preserving_size(h, w, 16, budget * 9, 3),
            Ok((th, tw)),
            "{h}x{w} at {budget}"
        );
    }
}

#[test]
fn size_edge_cases_and_errors() {
    // One side rounds to 0: that side becomes 48, the other min(floor(long/short) * 48, budget * 48).
    assert_eq!(
        aspect_ratio_preserving_size(6, 700, 16, 630, 3),
        Ok((48, 3360))
    );
    assert_eq!(
        aspect_ratio_preserving_size(1, 100_000, 16, 630, 3),
        Ok((48, 3360))
    );
    // The reference's 0 x 0 error needs max_patches < k² (not a supported budget); its
    // "exceeds max_patches" error is unreachable but by float rounding (th <= ideal_h,
    // tw <= ideal_w, and the edge branch stays within (max_patches / k²) cells).
    assert_eq!(
        aspect_ratio_preserving_size(10, 10, 16, 1, 3),
        Err(PreprocessError::ZeroTarget { side: 48 })
    );
    assert!(matches!(
        aspect_ratio_preserving_size(0, 10, 16, 630, 3),
        Err(PreprocessError::EmptyImage { .. })
    ));
    let img = RgbImage::new(10, 10);
    let cfg = ImageProcessorConfig::default();
    for b in SUPPORTED_SOFT_TOKENS {
        let p = preprocess(&img, &cfg, b).unwrap();
        assert!(p.num_soft_tokens <= b && p.num_soft_tokens * 9 == p.num_patches());
        assert_eq!(p.pixel_values.len(), p.num_patches() * 768);
    }
    for b in [0, 1, 69, 71, 280 * 9, usize::MAX] {
        assert_eq!(
            preprocess(&img, &cfg, b),
            Err(PreprocessError::UnsupportedBudget { budget: b })
        );
    }
}

#[test]
fn decode_errors_not_panics() {
    let limits = DecodeLimits::default();
    assert_eq!(decode_image(&[], &limits), Err(PreprocessError::EmptyInput));
    assert_eq!(
        decode_image(b"definitely not an image", &limits),
        Err(PreprocessError::UnknownFormat)
    );
    assert!(matches!(
        decode_image(
            b"BM\x36\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00",
            &limits
        ),
        Err(PreprocessError::UnsupportedFormat { .. })
    ));
    let small = DecodeLimits {
        max_bytes: 100,
        ..limits
    };
    let png = read("images/gradient_tall.png");
    assert_eq!(
        decode_image(&png, &small),
        Err(PreprocessError::InputTooLarge {
            bytes: png.len(),
            max: 100
        })
    );

    // Truncated files of every format.
    for file in [
        "images/gradient_tall.png",
        "images/photo.jpg",
        "images/stripes.webp",
        "images/stripes_anim.gif",
        "images/lossless_alpha.webp",
    ] {
        let data = read(file);
        for cut in [1, 8, 20, data.len() / 3, data.len() / 2, data.len() - 1] {
            match decode_image(&data[..cut], &limits) {
                Err(_) => {}
                // Some decoders tolerate a missing tail; then the image must still be whole.
                Ok(img) => assert!(img.width() > 0 && img.height() > 0, "{file} cut at {cut}"),
            }
        }
    }

    // Pixel bombs: the header's size is refused before any pixel is decoded.
    let bomb = png_header(30_000, 30_000, 2);
    match decode_image(&bomb, &limits) {
        Err(PreprocessError::TooManyPixels {
            width: 30_000,
            height: 30_000,
            pixels: 900_000_000,
            max: 50_000_000,
        }) => {}
        other => panic!("PNG bomb: {other:?}"),
    }
    let e = decode_image(&bomb, &limits).unwrap_err().to_string();
    assert!(e.contains("30000x30000") && e.contains("50000000"), "{e}");
    // Larger than the decoder's own allocation limit: refused too.
    assert!(decode_image(&png_header(1 << 30, 1 << 30, 6), &limits).is_err());
    let tight = DecodeLimits {
        max_pixels: 1000,
        ..limits
    };
    assert!(matches!(
        decode_image(&png_header(100, 11, 2), &tight),
        Err(PreprocessError::TooManyPixels { pixels: 1100, .. })
    ));
    // GIF: logical screen 65535 x 65535.
    let mut gif = b"GIF89a".to_vec();
    gif.extend([0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00]);
    gif.extend(b"\x2c\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02\x44\x01\x00\x3b");
    assert!(
        matches!(
            decode_image(&gif, &limits),
            Err(PreprocessError::TooManyPixels { .. })
        ),
        "{:?}",
        decode_image(&gif, &limits)
    );
    // PNG of 0 x 0.
    assert!(decode_image(&png_header(0, 0, 2), &limits).is_err());
}

/// Deterministic xorshift for the mutation loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn mutated_files_never_panic() {
    let limits = DecodeLimits {
        max_pixels: 4_000_000,
        ..DecodeLimits::default()
    };
    let cfg = ImageProcessorConfig {
        max_soft_tokens: 70,
        ..Default::default()
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut decoded = 0;
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["images", "images/decode"] {
        for entry in std::fs::read_dir(fixture().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    for path in files {
        let data = std::fs::read(&path).unwrap();
        for _ in 0..40 {
            let mut d = data.clone();
            for _ in 0..1 + rng.next() % 8 {
                let i = (rng.next() % d.len() as u64) as usize;
                d[i] = rng.next() as u8;
            }
            if rng.next().is_multiple_of(4) {
                d.truncate((rng.next() % d.len() as u64) as usize);
            }
            if let Ok(img) = decode_image(&d, &limits) {
                decoded += 1;
                let p = preprocess(&img, &cfg, 70).expect("a decoded image always preprocesses");
                assert_eq!(p.pixel_values.len(), p.num_patches() * 768);
            }
        }
    }
    println!("{decoded} mutated files still decoded");
}

/// Real photographs (`conformance/fixtures_gen/pixel_diff.py` writes the reference to
/// $PIXEL_DIFF_DIR, default /tmp/gemma4-pixel-diff): max and mean |Rust - reference| in 1/255
/// units, for the decoded RGB and for the pixel values at every budget.
#[test]
#[ignore]
fn pixel_diff_real_photos() {
    let dir = PathBuf::from(
        std::env::var("PIXEL_DIFF_DIR").unwrap_or_else(|_| "/tmp/gemma4-pixel-diff".into()),
    );
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("index.json")).expect("run pixel_diff.py first"),
    )
    .unwrap();
    let cfg = ImageProcessorConfig::default();
    println!("| photo | format | size | decode max / mean | budget | resized | pixels max / mean (values differing) | same, from PIL's decoded RGB |");
    println!("|---|---|---|---|---|---|---|---|");
    for photo in index["photos"].as_array().unwrap() {
        let src = std::fs::read(photo["path"].as_str().unwrap()).unwrap();
        let decoded = decode_image(&src, &DecodeLimits::default()).unwrap();
        let raw = |rel: &str, h: usize, w: usize| {
            let data = std::fs::read(dir.join(rel)).unwrap();
            RgbImage::from_raw(w as u32, h as u32, data).expect("raw size")
        };
        let (h, w) = (
            photo["height"].as_u64().unwrap() as usize,
            photo["width"].as_u64().unwrap() as usize,
        );
        let pil = raw(photo["decoded"].as_str().unwrap(), h, w);
        let (mut dmax, mut dsum) = (0i32, 0f64);
        for (&x, &y) in decoded.as_raw().iter().zip(pil.as_raw()) {
            let d = (i32::from(x) - i32::from(y)).abs();
            dmax = dmax.max(d);
            dsum += f64::from(d);
        }
        let dmean = dsum / pil.as_raw().len() as f64;
        // max, mean (in 1/255) and fraction of values differing
        let compare = |got: &PreprocessedImage, want: &[f32]| {
            let (mut max, mut sum, mut n) = (0f32, 0f64, 0usize);
            for (a, b) in got.pixel_values.iter().zip(want) {
                let d = (a - b).abs() * 255.0;
                max = max.max(d);
                sum += f64::from(d);
                n += usize::from(a.to_bits() != b.to_bits());
            }
            (max, sum / want.len() as f64, n as f64 / want.len() as f64)
        };
        for b in photo["budgets"].as_array().unwrap() {
            let budget = b["max_soft_tokens"].as_u64().unwrap() as usize;
            let (th, tw) = (
                b["height"].as_u64().unwrap() as usize,
                b["width"].as_u64().unwrap() as usize,
            );
            let want = expected_pixels(&raw(b["resized"].as_str().unwrap(), th, tw), 16);
            let got = preprocess(&decoded, &cfg, budget).unwrap();
            assert_eq!((got.patches_h * 16, got.patches_w * 16), (th, tw));
            let (max, mean, frac) = compare(&got, &want);
            let (pmax, pmean, _) = compare(&preprocess(&pil, &cfg, budget).unwrap(), &want);
            println!(
                "| {} | {} | {w}x{h} | {dmax} / {dmean:.4} | {budget} | {tw}x{th} | {max:.0} / {mean:.4} ({:.2}%) | {pmax:.0} / {pmean:.4} |",
                photo["name"].as_str().unwrap(),
                photo["format"].as_str().unwrap(),
                100.0 * frac
            );
        }
    }
}

//! Image preprocessing for the Gemma 4 vision tower: decode, resize, rescale, patchify.
//!
//! Reproduces transformers 5.23.0 `Gemma4ImageProcessor` (`models/gemma4/image_processing_gemma4.py`,
//! the torchvision backend that `AutoProcessor` picks) bit for bit, given the image as the processor
//! receives it from `PIL.Image.open` (checked against `fixtures/tiny-vision`, see its README):
//!
//! 1. decode (PNG, JPEG, WebP, GIF first frame) to RGB the way transformers' `convert_to_rgb` does
//!    with a PIL image: an alpha channel (or a transparency entry) is composited onto white with
//!    PIL's integer `alpha_composite` arithmetic, anything else is `convert("RGB")`. No EXIF rotation
//!    (the processor applies none to a PIL image).
//! 2. target size from `get_aspect_ratio_preserving_size` (same float64 operations, same edge cases
//!    and errors); no resize when it equals the input size.
//! 3. torchvision `resize(BICUBIC, antialias=True)` of the uint8 image, i.e. ATen's
//!    `_upsample_bicubic2d_aa` uint8 CPU kernel (a port of Pillow's `Resample.c`): separable,
//!    horizontal pass first, then vertical, each rounded to uint8; filter support scaled by the
//!    downscale factor, cubic a = -0.5, weights normalised in float64 then converted to int16 fixed
//!    point with a precision chosen from the largest weight (not Pillow's fixed 22 bits, which is why
//!    the PIL backend differs by up to 2/255 on a few pixels).
//! 4. `pixel = float32(u8) * float32(1/255)` (a float32 product, not u8 / 255 rounded).
//! 5. patches of `patch_size`² × 3 in patch-grid row-major order, each flattened (row, column,
//!    channel); positions (x, y) per patch.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

/// The soft-token budgets the processor accepts (`_SUPPORTED_SOFT_TOKENS`).
pub const SUPPORTED_SOFT_TOKENS: [usize; 5] = [70, 140, 280, 560, 1120];

/// Errors of decoding or preprocessing an image. Every input, however malformed, gives one of these
/// (never a panic).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreprocessError {
    #[error("max_soft_tokens {budget} is not supported (supported: 70, 140, 280, 560, 1120)")]
    UnsupportedBudget { budget: usize },
    #[error("invalid image processor config: {msg}")]
    InvalidConfig { msg: String },
    #[error("{path}: {msg}")]
    ConfigFile { path: String, msg: String },
    #[error("the image data is empty")]
    EmptyInput,
    #[error("the image data is {bytes} bytes, more than the limit of {max} bytes")]
    InputTooLarge { bytes: usize, max: usize },
    #[error("unrecognised image format (supported: PNG, JPEG, WebP, GIF)")]
    UnknownFormat,
    #[error("{format} images are not supported (supported: PNG, JPEG, WebP, GIF)")]
    UnsupportedFormat { format: String },
    #[error(
        "the image is {width}x{height} = {pixels} pixels, more than the limit of {max} pixels"
    )]
    TooManyPixels {
        width: u64,
        height: u64,
        pixels: u64,
        max: u64,
    },
    #[error("the image is too large to decode within the decoder's memory limit: {msg}")]
    DecoderLimit { msg: String },
    #[error("could not decode the {format} image: {msg}")]
    Undecodable { format: String, msg: String },
    #[error("the image has no pixels ({width}x{height})")]
    EmptyImage { width: u64, height: u64 },
    #[error(
        "attempting to resize to a 0 x 0 image: the resized height should be divisible by pooling_kernel_size * patch_size = {side}"
    )]
    ZeroTarget { side: usize },
    #[error("resizing [{height}x{width}] to [{target_height}x{target_width}] exceeds {max_patches} patches with patch_size {patch_size}")]
    ExceedsBudget {
        height: usize,
        width: usize,
        target_height: usize,
        target_width: usize,
        max_patches: usize,
        patch_size: usize,
    },
}

/// The image processor settings the engine needs (`patch_size`, `pooling_kernel_size`,
/// `max_soft_tokens` of `Gemma4ImageProcessor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageProcessorConfig {
    pub patch_size: usize,
    pub pooling_kernel_size: usize,
    /// The default budget (soft tokens per image); a request may pick another supported one.
    pub max_soft_tokens: usize,
}

impl Default for ImageProcessorConfig {
    /// The class defaults of `Gemma4ImageProcessor`: 16, 3, 280.
    fn default() -> Self {
        ImageProcessorConfig {
            patch_size: 16,
            pooling_kernel_size: 3,
            max_soft_tokens: 280,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads the checkpoint directory's processor config as transformers does: the
    /// `image_processor` object of `processor_config.json` (transformers 5) if present, else
    /// `preprocessor_config.json` (the older flat file); keys missing there, or both files missing,
    /// take the class defaults (16 / 3 / 280).
    pub fn from_dir(dir: &Path) -> Result<Self, PreprocessError> {
        let nested = dir.join("processor_config.json");
        if nested.exists() {
            let v = read_json(&nested)?;
            if let Some(ip) = v.get("image_processor") {
                return Self::from_json(ip).map_err(|e| file_err(&nested, e));
            }
        }
        let flat = dir.join("preprocessor_config.json");
        if flat.exists() {
            let v = read_json(&flat)?;
            return Self::from_json(&v).map_err(|e| file_err(&flat, e));
        }
        Ok(Self::default())
    }

    /// From the image processor's JSON object (keys `patch_size`, `pooling_kernel_size`,
    /// `max_soft_tokens`; absent or null ones take the defaults).
    pub fn from_json(v: &serde_json::Value) -> Result<Self, PreprocessError> {
        if !v.is_object() {
            return Err(PreprocessError::InvalidConfig {
                msg: "the image processor config is not a JSON object".into(),
            });
        }
        let d = Self::default();
        let get = |key: &str, default: usize| -> Result<usize, PreprocessError> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| PreprocessError::InvalidConfig {
                        msg: format!("`{key}` must be a non-negative integer, found {x}"),
                    }),
            }
        };
        let cfg = ImageProcessorConfig {
            patch_size: get("patch_size", d.patch_size)?,
            pooling_kernel_size: get("pooling_kernel_size", d.pooling_kernel_size)?,
            max_soft_tokens: get("max_soft_tokens", d.max_soft_tokens)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), PreprocessError> {
        if self.patch_size == 0 || self.patch_size > 1024 {
            return Err(PreprocessError::InvalidConfig {
                msg: format!("patch_size {} is out of range", self.patch_size),
            });
        }
        if self.pooling_kernel_size == 0 || self.pooling_kernel_size > 64 {
            return Err(PreprocessError::InvalidConfig {
                msg: format!(
                    "pooling_kernel_size {} is out of range",
                    self.pooling_kernel_size
                ),
            });
        }
        check_budget(self.max_soft_tokens)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, PreprocessError> {
    let text = std::fs::read_to_string(path).map_err(|e| PreprocessError::ConfigFile {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| PreprocessError::ConfigFile {
        path: path.display().to_string(),
        msg: format!("invalid JSON: {e}"),
    })
}

fn file_err(path: &Path, e: PreprocessError) -> PreprocessError {
    PreprocessError::ConfigFile {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

fn check_budget(budget: usize) -> Result<(), PreprocessError> {
    if SUPPORTED_SOFT_TOKENS.contains(&budget) {
        Ok(())
    } else {
        Err(PreprocessError::UnsupportedBudget { budget })
    }
}

// ------------------------------------------------------------------------------------------------
// decoding

/// Limits checked before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width × height accepted (read from the header, before decoding).
    pub max_pixels: u64,
    /// Largest encoded size accepted.
    pub max_bytes: usize,
}

impl Default for DecodeLimits {
    /// 50 megapixels (PIL warns about decompression bombs from 89 M), 32 MiB of encoded data.
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 50_000_000,
            max_bytes: 32 << 20,
        }
    }
}

/// Decodes PNG, JPEG, WebP or GIF (first frame) to RGB as the reference sees it: what
/// transformers' `convert_to_rgb` makes of `PIL.Image.open(bytes)`. Alpha is composited onto
/// white (PIL `alpha_composite` arithmetic); grey is replicated; palettes are expanded; 16-bit
/// samples follow PIL (RGB(A): the high byte; 16-bit grey: clipped to 255). The header's
/// dimensions are checked against `limits` before the pixels are decoded.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::EmptyInput);
    }
    if bytes.len() > limits.max_bytes {
        return Err(PreprocessError::InputTooLarge {
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| PreprocessError::UnknownFormat)?;
    let name = match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        other => {
            return Err(PreprocessError::UnsupportedFormat {
                format: format!("{other:?}"),
            })
        }
    };
    let undecodable = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => PreprocessError::DecoderLimit { msg: l.to_string() },
        other => PreprocessError::Undecodable {
            format: name.to_string(),
            msg: other.to_string(),
        },
    };
    // The reader's default limits (512 MiB of allocations) guard the header parsing itself.
    let decoder = ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .map_err(undecodable)?;
    let (w, h) = decoder.dimensions();
    let (w, h) = (u64::from(w), u64::from(h));
    if w == 0 || h == 0 {
        return Err(PreprocessError::EmptyImage {
            width: w,
            height: h,
        });
    }
    let pixels = w * h;
    if pixels > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width: w,
            height: h,
            pixels,
            max: limits.max_pixels,
        });
    }
    let img = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    Ok(to_rgb_like_pil(img))
}

/// PIL's `alpha_composite(white, rgba)` for one channel: integer arithmetic of Pillow's
/// `AlphaComposite.c` with an opaque white destination (checked against Pillow for all
/// 256 × 256 (value, alpha) pairs).
#[inline]
fn composite_on_white(v: u8, a: u8) -> u8 {
    let (v, a) = (u32::from(v), u32::from(a));
    // coef1 = a * 128, coef2 = (255 - a) * 128 (PRECISION_BITS 7, outa255 = 255 * 255)
    let t = 128 * (v * a + 255 * (255 - a)) + (0x80 << 7);
    ((((t >> 8) + t) >> 8) >> 7) as u8
}

fn composite_rgba(it: impl Iterator<Item = [u8; 4]>, w: u32, h: u32) -> RgbImage {
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for [r, g, b, a] in it {
        out.extend_from_slice(&[
            composite_on_white(r, a),
            composite_on_white(g, a),
            composite_on_white(b, a),
        ]);
    }
    RgbImage::from_raw(w, h, out).expect("buffer sized from the image")
}

fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(b) => b,
        DynamicImage::ImageLuma8(b) => RgbImage::from_raw(
            w,
            h,
            b.into_raw().into_iter().flat_map(|v| [v, v, v]).collect(),
        )
        .expect("sized"),
        DynamicImage::ImageRgba8(b) => composite_rgba(b.pixels().map(|p| p.0), w, h),
        DynamicImage::ImageLumaA8(b) => {
            composite_rgba(b.pixels().map(|p| [p.0[0], p.0[0], p.0[0], p.0[1]]), w, h)
        }
        // PIL keeps the high byte of 16-bit RGB(A) samples ...
        DynamicImage::ImageRgb16(b) => RgbImage::from_raw(
            w,
            h,
            b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        )
        .expect("sized"),
        DynamicImage::ImageRgba16(b) => {
            composite_rgba(b.pixels().map(|p| p.0.map(|v| (v >> 8) as u8)), w, h)
        }
        DynamicImage::ImageLumaA16(b) => composite_rgba(
            b.pixels().map(|p| {
                let (l, a) = ((p.0[0] >> 8) as u8, (p.0[1] >> 8) as u8);
                [l, l, l, a]
            }),
            w,
            h,
        ),
        // ... but opens 16-bit grey as mode "I;16", whose convert("RGB") clips to 255.
        DynamicImage::ImageLuma16(b) => RgbImage::from_raw(
            w,
            h,
            b.into_raw()
                .into_iter()
                .flat_map(|v| {
                    let c = v.min(255) as u8;
                    [c, c, c]
                })
                .collect(),
        )
        .expect("sized"),
        other => {
            if other.color().has_alpha() {
                let rgba = other.to_rgba8();
                composite_rgba(rgba.pixels().map(|p| p.0), w, h)
            } else {
                other.to_rgb8()
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// target size

/// `get_aspect_ratio_preserving_size` of the reference, with the same float64 operations: the
/// largest (height, width), both multiples of `pooling_kernel_size * patch_size`, whose patch count
/// is at most `max_patches`, keeping the aspect ratio; when one side rounds to 0 it becomes one
/// `side` and the other `min(floor(long / short) * side, (max_patches / k²) * side)`.
pub fn aspect_ratio_preserving_size(
    height: usize,
    width: usize,
    patch_size: usize,
    max_patches: usize,
    pooling_kernel_size: usize,
) -> Result<(usize, usize), PreprocessError> {
    if height == 0 || width == 0 {
        return Err(PreprocessError::EmptyImage {
            width: width as u64,
            height: height as u64,
        });
    }
    if patch_size == 0 || pooling_kernel_size == 0 {
        return Err(PreprocessError::InvalidConfig {
            msg: "patch_size and pooling_kernel_size must be positive".into(),
        });
    }
    // Python ints: exact products; `/` of two ints is the correctly rounded quotient, which is the
    // f64 quotient whenever both are exact in f64 (< 2^53, far above any accepted image).
    let total_px = (height as u128) * (width as u128);
    let target_px = (max_patches as u128) * (patch_size as u128) * (patch_size as u128);
    let factor = (target_px as f64 / total_px as f64).sqrt();
    let ideal_height = factor * height as f64;
    let ideal_width = factor * width as f64;
    let side = pooling_kernel_size * patch_size;
    let mut target_height = (ideal_height / side as f64).floor() as usize * side;
    let mut target_width = (ideal_width / side as f64).floor() as usize * side;
    if target_height == 0 && target_width == 0 {
        return Err(PreprocessError::ZeroTarget { side });
    }
    let max_side_length = (max_patches / (pooling_kernel_size * pooling_kernel_size)) * side;
    if target_height == 0 {
        target_height = side;
        target_width = (((width as f64 / height as f64).floor() as usize).saturating_mul(side))
            .min(max_side_length);
    } else if target_width == 0 {
        target_width = side;
        target_height = (((height as f64 / width as f64).floor() as usize).saturating_mul(side))
            .min(max_side_length);
    }
    if (target_height as u128) * (target_width as u128) > target_px {
        return Err(PreprocessError::ExceedsBudget {
            height,
            width,
            target_height,
            target_width,
            max_patches,
            patch_size,
        });
    }
    Ok((target_height, target_width))
}

// ------------------------------------------------------------------------------------------------
// resize

/// Per-output-pixel taps of one resize axis: `start[i]`, `len[i]` and `weights[i * stride ..]`
/// (int16 values), and the fixed-point precision.
struct AxisWeights {
    start: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    weights: Vec<i32>,
    precision: u32,
}

/// Pillow's bicubic filter with a = -0.5 (ATen `aa_filter` of `HelperInterpCubic`).
#[inline]
fn cubic_filter(x: f64) -> f64 {
    let x = x.abs();
    let a = -0.5f64;
    if x < 1.0 {
        // cubic_convolution1
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        // cubic_convolution2
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// ATen `HelperInterpBase::_compute_index_ranges_weights` (antialias, align_corners false,
/// scale = in / out in float64) followed by `_compute_index_ranges_int16_weights`.
fn axis_weights(in_size: usize, out_size: usize) -> AxisWeights {
    let scale = in_size as f64 / out_size as f64;
    let interp_size = 4.0f64; // bicubic
    let support = if scale >= 1.0 {
        (interp_size * 0.5) * scale
    } else {
        interp_size * 0.5
    };
    let max_interp_size = (support.ceil() as usize) * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut wf = vec![0f64; out_size * max_interp_size];
    let mut wt_max = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // static_cast<int64_t> truncates toward zero
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xsize = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let xsize = xsize.clamp(0, max_interp_size as i64) as usize;
        let w = &mut wf[i * max_interp_size..(i + 1) * max_interp_size];
        let mut total = 0f64;
        for (j, wj) in w.iter_mut().enumerate().take(xsize) {
            // (j + xmin - center + 0.5): integer sum first, as in the C++
            let v = cubic_filter((((j as i64 + xmin) as f64) - center + 0.5) * invscale);
            *wj = v;
            total += v;
        }
        if total != 0.0 {
            for wj in w.iter_mut().take(xsize) {
                *wj /= total;
                wt_max = wt_max.max(*wj);
            }
        }
        start.push(xmin as usize);
        len.push(xsize);
    }
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + wt_max * (1u64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let unit = (1u64 << precision) as f64;
    let weights = wf
        .iter()
        .map(|&w| {
            let v = w * unit;
            // (int)(±0.5 + v): round half away from zero, then int16
            (if v < 0.0 {
                (-0.5 + v) as i32
            } else {
                (0.5 + v) as i32
            }) as i16 as i32
        })
        .collect();
    AxisWeights {
        start,
        len,
        stride: max_interp_size,
        weights,
        precision,
    }
}

#[inline]
fn fixed_to_u8(acc: i64, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// One separable pass over `src` (`rows` × `cols` pixels of 3 channels, row-major): resamples
/// along the columns (`horizontal`) or the rows into `out_len` samples.
fn resample_pass(
    src: &[u8],
    rows: usize,
    cols: usize,
    out_len: usize,
    horizontal: bool,
) -> Vec<u8> {
    let in_len = if horizontal { cols } else { rows };
    let aw = axis_weights(in_len, out_len);
    let round = 1i64 << aw.precision.saturating_sub(1);
    if horizontal {
        let mut out = vec![0u8; rows * out_len * 3];
        for y in 0..rows {
            let row = &src[y * cols * 3..(y + 1) * cols * 3];
            let orow = &mut out[y * out_len * 3..(y + 1) * out_len * 3];
            for x in 0..out_len {
                let w = &aw.weights[x * aw.stride..x * aw.stride + aw.len[x]];
                let s0 = aw.start[x];
                let mut acc = [round; 3];
                for (j, &wj) in w.iter().enumerate() {
                    let p = &row[(s0 + j) * 3..(s0 + j) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += i64::from(p[c]) * i64::from(wj);
                    }
                }
                for c in 0..3 {
                    orow[x * 3 + c] = fixed_to_u8(acc[c], aw.precision);
                }
            }
        }
        out
    } else {
        let stride = cols * 3;
        let mut out = vec![0u8; out_len * stride];
        let mut acc = vec![0i64; stride];
        for y in 0..out_len {
            let w = &aw.weights[y * aw.stride..y * aw.stride + aw.len[y]];
            let s0 = aw.start[y];
            acc.iter_mut().for_each(|a| *a = round);
            for (j, &wj) in w.iter().enumerate() {
                let row = &src[(s0 + j) * stride..(s0 + j + 1) * stride];
                let wj = i64::from(wj);
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += i64::from(p) * wj;
                }
            }
            for (o, &a) in out[y * stride..(y + 1) * stride].iter_mut().zip(&acc) {
                *o = fixed_to_u8(a, aw.precision);
            }
        }
        out
    }
}

/// torchvision `resize(img, [height, width], BICUBIC, antialias=True)` of a uint8 RGB image on the
/// CPU (ATen's uint8 antialiased bicubic kernel), bit-exact: horizontal pass first, then vertical,
/// each rounded to uint8; an axis whose size does not change is not resampled.
///
/// Panics if `height`, `width` or a side of `img` is 0.
pub fn resize_bicubic_antialias(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    assert!(
        height > 0 && width > 0 && w0 > 0 && h0 > 0,
        "resize of an empty image"
    );
    let mut buf: Vec<u8> = img.as_raw().clone();
    let mut cols = w0;
    if width != w0 {
        buf = resample_pass(&buf, h0, cols, width, true);
        cols = width;
    }
    if height != h0 {
        buf = resample_pass(&buf, h0, cols, height, false);
    }
    RgbImage::from_raw(width as u32, height as u32, buf).expect("resized buffer")
}

// ------------------------------------------------------------------------------------------------
// preprocess

/// One image ready for the vision tower (real patches only, no padding rows).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessedImage {
    /// [num_patches, patch_size² · 3] row-major; patches in grid order (row-major over
    /// (patch_y, patch_x)), each flattened (row, column, channel); values in [0, 1].
    pub pixel_values: Vec<f32>,
    /// (x, y) patch coordinates, one per patch, x fastest.
    pub positions: Vec<[i64; 2]>,
    pub patches_h: usize,
    pub patches_w: usize,
    /// patches_h · patches_w / pooling_kernel_size²: the `<|image|>` placeholders of this image.
    pub num_soft_tokens: usize,
}

impl PreprocessedImage {
    pub fn num_patches(&self) -> usize {
        self.patches_h * self.patches_w
    }
}

/// float32(1/255): the processor's `rescale_factor` as torch multiplies a uint8 tensor by it.
pub const RESCALE_FACTOR: f32 = (1.0f64 / 255.0) as f32;

/// The target (height, width) of an image of `height` × `width` pixels for a budget of
/// `max_soft_tokens` soft tokens.
pub fn target_size(
    height: usize,
    width: usize,
    cfg: &ImageProcessorConfig,
    max_soft_tokens: usize,
) -> Result<(usize, usize), PreprocessError> {
    check_budget(max_soft_tokens)?;
    let k = cfg.pooling_kernel_size;
    aspect_ratio_preserving_size(height, width, cfg.patch_size, max_soft_tokens * k * k, k)
}

/// Resize (keeping the aspect ratio, within `max_soft_tokens`), rescale to [0, 1] and patchify,
/// as `Gemma4ImageProcessor` does.
pub fn preprocess(
    img: &RgbImage,
    cfg: &ImageProcessorConfig,
    max_soft_tokens: usize,
) -> Result<PreprocessedImage, PreprocessError> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let (th, tw) = target_size(h, w, cfg, max_soft_tokens)?;
    let resized;
    let src = if (th, tw) == (h, w) {
        img
    } else {
        resized = resize_bicubic_antialias(img, th, tw);
        &resized
    };
    let p = cfg.patch_size;
    let k = cfg.pooling_kernel_size;
    let (ph, pw) = (th / p, tw / p);
    let raw = src.as_raw();
    let mut pixel_values = Vec::with_capacity(ph * pw * p * p * 3);
    let mut positions = Vec::with_capacity(ph * pw);
    for py in 0..ph {
        for px in 0..pw {
            for r in 0..p {
                let row = (py * p + r) * tw * 3 + px * p * 3;
                pixel_values.extend(
                    raw[row..row + p * 3]
                        .iter()
                        .map(|&v| f32::from(v) * RESCALE_FACTOR),
                );
            }
            positions.push([px as i64, py as i64]);
        }
    }
    Ok(PreprocessedImage {
        pixel_values,
        positions,
        patches_h: ph,
        patches_w: pw,
        num_soft_tokens: ph * pw / (k * k),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_pil_corners() {
        assert_eq!(composite_on_white(0, 0), 255);
        assert_eq!(composite_on_white(0, 255), 0);
        assert_eq!(composite_on_white(200, 255), 200);
        assert_eq!(composite_on_white(0, 128), 127);
    }

    #[test]
    fn rescale_factor_is_the_f32_of_one_over_255() {
        assert_eq!(RESCALE_FACTOR.to_bits(), 0x3B80_8081);
    }

    #[test]
    fn identity_resize_copies() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        assert_eq!(resize_bicubic_antialias(&img, 5, 7), img);
        // one axis unchanged: the other pass alone
        let r = resize_bicubic_antialias(&img, 5, 3);
        assert_eq!((r.width(), r.height()), (3, 5));
    }
}

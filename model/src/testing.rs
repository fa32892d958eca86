//! Test helpers: the kernels crate's ([`Cpu`], [`Lcg`], packed weights), and what the model's
//! and the server's image tests share.

pub use gemma4_kernels::testing::*;

/// The start of a PNG that claims `width` × `height` pixels (8-bit, PNG color type `color_type`:
/// 2 RGB, 6 RGBA): a valid signature and IHDR, then an IDAT holding a few bytes of a zlib stream.
/// Enough for a decoder to read the dimensions from the header (the pixel-bomb check), not to
/// decode an image.
pub fn png_header(width: u32, height: u32, color_type: u8) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let mut c = kind.to_vec();
        c.extend(data);
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(&c);
        out.extend(crc32(&c).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, color_type, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x01, 0x00, 0x00]);
    out
}

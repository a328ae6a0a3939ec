//! QEMU's screendump format: binary PPM (P6, netpbm's `ppm(5)`), 8 bits per channel.
//! One decoder for everyone who reads a screendump: vdd's panel thumbnails and xtask's
//! checks of what a screen shows.

/// Why bytes are not a screendump we can read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a PPM file")]
    NotPpm,
    #[error("not an 8-bit P6 PPM")]
    Format,
    #[error("bad PPM size {0:?}")]
    Size(String),
    #[error("PPM shorter than {0}x{1}")]
    Short(usize, usize),
}

/// A decoded image: `width * height` pixels of RGB, row by row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image<'a> {
    pub width: usize,
    pub height: usize,
    pub rgb: &'a [u8],
}

/// The largest side we accept: QEMU's biggest framebuffers are far smaller.
const MAX_SIDE: usize = 16384;

/// Decodes a P6 PPM with maxval 255 (comments are not used by QEMU and not accepted).
pub fn parse(ppm: &[u8]) -> Result<Image<'_>, Error> {
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while ppm.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        let start = i;
        while ppm.get(i).is_some_and(|b| !b.is_ascii_whitespace()) {
            i += 1;
        }
        if start == i {
            return Err(Error::NotPpm);
        }
        fields.push(String::from_utf8_lossy(&ppm[start..i]).into_owned());
    }
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(Error::Format);
    }
    let side = |s: &str| {
        s.parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_SIDE).contains(n))
            .ok_or_else(|| Error::Size(s.to_string()))
    };
    let (width, height) = (side(&fields[1])?, side(&fields[2])?);
    // One whitespace byte ends the header.
    let px = ppm.get(i + 1..).unwrap_or_default();
    let n = width * height * 3;
    if px.len() < n {
        return Err(Error::Short(width, height));
    }
    Ok(Image {
        width,
        height,
        rgb: &px[..n],
    })
}

impl Image<'_> {
    /// Pixels for which `f(r, g, b)` holds.
    pub fn count(&self, f: impl Fn(&[u8]) -> bool) -> usize {
        self.rgb.chunks_exact(3).filter(|p| f(p)).count()
    }

    /// The image scaled down to at most `max_width` wide (never up), each output pixel
    /// the mean of the box of input pixels it covers: a thumbnail that keeps text
    /// readable as grey rather than dropping every other line.
    pub fn shrink(&self, max_width: usize) -> (usize, usize, Vec<u8>) {
        let (w, h) = (self.width, self.height);
        if max_width == 0 || w <= max_width {
            return (w, h, self.rgb.to_vec());
        }
        let ow = max_width;
        let oh = (h * ow).div_ceil(w).max(1);
        let mut out = vec![0u8; ow * oh * 3];
        for oy in 0..oh {
            let (y0, y1) = (oy * h / oh, ((oy + 1) * h / oh).max(oy * h / oh + 1));
            for ox in 0..ow {
                let (x0, x1) = (ox * w / ow, ((ox + 1) * w / ow).max(ox * w / ow + 1));
                let mut sum = [0u32; 3];
                for y in y0..y1 {
                    let row = &self.rgb[(y * w + x0) * 3..(y * w + x1) * 3];
                    for p in row.chunks_exact(3) {
                        sum[0] += u32::from(p[0]);
                        sum[1] += u32::from(p[1]);
                        sum[2] += u32::from(p[2]);
                    }
                }
                let n = ((y1 - y0) * (x1 - x0)) as u32;
                let o = (oy * ow + ox) * 3;
                for c in 0..3 {
                    out[o + c] = (sum[c] / n) as u8;
                }
            }
        }
        (ow, oh, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(w: usize, h: usize, px: &[u8]) -> Vec<u8> {
        let mut v = format!("P6\n{w} {h}\n255\n").into_bytes();
        v.extend_from_slice(px);
        v
    }

    #[test]
    fn decodes_and_refuses() {
        let b = ppm(2, 1, &[1, 2, 3, 4, 5, 6]);
        let i = parse(&b).unwrap();
        assert_eq!((i.width, i.height, i.rgb), (2, 1, &[1, 2, 3, 4, 5, 6][..]));
        assert_eq!(parse(b"P5\n1 1\n255\n\0"), Err(Error::Format));
        assert_eq!(parse(b"P6\n4 4\n255\n\0\0\0"), Err(Error::Short(4, 4)));
        assert_eq!(parse(b"P6\n0 4\n255\n"), Err(Error::Size("0".into())));
        assert_eq!(parse(b"P6 1"), Err(Error::NotPpm));
        assert_eq!(parse(b""), Err(Error::NotPpm));
    }

    #[test]
    fn shrinks_by_box_means() {
        // 4x2: left half black, right half white; to 2 wide: one black, one white column.
        let mut px = Vec::new();
        for _ in 0..2 {
            px.extend_from_slice(&[0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255]);
        }
        let b = ppm(4, 2, &px);
        let (w, h, out) = parse(&b).unwrap().shrink(2);
        assert_eq!((w, h), (2, 1));
        assert_eq!(out, vec![0, 0, 0, 255, 255, 255]);
        // Never scaled up.
        assert_eq!(parse(&b).unwrap().shrink(100).0, 4);
        // 720x400 to 240 wide keeps the aspect.
        let big = ppm(720, 400, &vec![7; 720 * 400 * 3]);
        let (w, h, out) = parse(&big).unwrap().shrink(240);
        assert_eq!((w, h), (240, 134));
        assert!(out.iter().all(|&c| c == 7));
    }
}

//! The seat's screen: the display mode a thin client reports with its pick (its monitor's
//! preferred mode, from DRM or EDID), so the guest starts at that size and fills it.

use serde::{Deserialize, Serialize};

/// A display size in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ScreenSize {
    pub width: u32,
    pub height: u32,
}

/// The largest screen a guest is started at: QEMU's VGA has 16 MiB of video memory by
/// default, and 2560x1600 at 32 bits per pixel is the largest common mode that fits.
pub const MAX: ScreenSize = ScreenSize {
    width: 2560,
    height: 1600,
};

/// The smallest: what every VGA guest can show.
pub const MIN: ScreenSize = ScreenSize {
    width: 640,
    height: 480,
};

impl ScreenSize {
    /// What a guest is started at for a seat that reported `self`: within [`MIN`] and
    /// [`MAX`], the width a multiple of 8 (VGA's and VBE's granule). A larger monitor gets
    /// the largest size of the same aspect that fits, and its viewer scales it up.
    pub fn for_guest(self) -> ScreenSize {
        let (mut w, mut h) = (self.width.max(1) as u64, self.height.max(1) as u64);
        if w > MAX.width as u64 || h > MAX.height as u64 {
            // Shrink both sides by the same factor, keeping the aspect.
            let (num, den) = if w * MAX.height as u64 > h * MAX.width as u64 {
                (MAX.width as u64, w)
            } else {
                (MAX.height as u64, h)
            };
            w = w * num / den;
            h = h * num / den;
        }
        let w = (w as u32).clamp(MIN.width, MAX.width) & !7;
        let h = (h as u32).clamp(MIN.height, MAX.height);
        ScreenSize {
            width: w,
            height: h,
        }
    }
}

impl std::fmt::Display for ScreenSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(width: u32, height: u32) -> ScreenSize {
        ScreenSize { width, height }
    }

    #[test]
    fn guests_get_the_seats_mode_within_vga_limits() {
        assert_eq!(s(1920, 1080).for_guest(), s(1920, 1080));
        assert_eq!(s(1366, 768).for_guest(), s(1360, 768));
        assert_eq!(s(320, 200).for_guest(), s(640, 480));
        // A 4K monitor: the largest 16:9 that fits, scaled up by the viewer.
        assert_eq!(s(3840, 2160).for_guest(), s(2560, 1440));
        assert_eq!(s(2560, 1600).for_guest(), s(2560, 1600));
        assert_eq!(s(1600, 4000).for_guest(), s(640, 1600));
        assert_eq!(s(0, 0).for_guest(), s(640, 480));
        assert_eq!(s(1920, 1080).to_string(), "1920x1080");
    }
}

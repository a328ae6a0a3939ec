//! The guests' screens for the panel: QMP `screendump` through the dispatcher, scaled
//! down and encoded as PNG. Taken only when a browser asks (the panel asks every few
//! seconds for the screens on its page, and only while the page is visible), and shared
//! between browsers: a screen younger than [`FRESH`] is sent again rather than taken
//! again, and one screen of a VM is taken at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dispatch::{self, Sessions};

/// How long a screen is sent again instead of taken again.
pub const FRESH: Duration = Duration::from_millis(1500);
/// The widths asked for are rounded to one of these (a few cached sizes, not one per
/// window width).
const WIDTHS: [usize; 4] = [160, 320, 640, 1024];
/// Screens kept (sessions times widths); old ones go first.
const MAX_CACHED: usize = 128;

type Slot = Arc<tokio::sync::Mutex<Option<(Instant, Arc<Vec<u8>>)>>>;

/// The cache of PNGs by (session, width).
#[derive(Default)]
pub struct Screens {
    slots: Mutex<HashMap<(String, usize), Slot>>,
}

/// A width rounded to the nearest one cached, at most the largest.
pub fn width(asked: Option<usize>) -> usize {
    let w = asked.unwrap_or(320);
    *WIDTHS
        .iter()
        .min_by_key(|c| c.abs_diff(w))
        .expect("WIDTHS is not empty")
}

impl Screens {
    /// The screen of session `id`, at most `width` pixels wide, as PNG.
    pub async fn png(
        &self,
        sessions: &Arc<dyn Sessions>,
        id: &str,
        width: usize,
    ) -> Result<Arc<Vec<u8>>, dispatch::Error> {
        let slot = {
            let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() >= MAX_CACHED && !m.contains_key(&(id.to_string(), width)) {
                m.clear();
            }
            m.entry((id.to_string(), width)).or_default().clone()
        };
        // One screendump of this (session, width) at a time; who waited gets its result.
        let mut cached = slot.lock().await;
        if let Some((at, png)) = cached.as_ref() {
            if at.elapsed() < FRESH {
                return Ok(png.clone());
            }
        }
        let screen = sessions.screenshot(id).await?;
        let png = tokio::task::spawn_blocking(move || encode(&screen, width))
            .await
            .map_err(|e| dispatch::Error::ToolFailed {
                tool: "PNG encoder".into(),
                said: e.to_string(),
            })?;
        let png = Arc::new(png);
        *cached = Some((Instant::now(), png.clone()));
        Ok(png)
    }

    /// Forgets the screens of sessions not in `live`.
    pub fn retain(&self, live: &[String]) {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|(id, _), _| live.contains(id));
    }
}

/// Scales `s` down to `width` and encodes it (fast zlib: thumbnails are sent once or
/// twice and thrown away, so encoding time counts more than a few bytes).
pub fn encode(s: &dispatch::Screen, width: usize) -> Vec<u8> {
    let img = qemu_ctl::ppm::Image {
        width: s.width,
        height: s.height,
        rgb: &s.rgb,
    };
    let (w, h, rgb) = img.shrink(width);
    let mut out = Vec::with_capacity(rgb.len() / 4);
    {
        let mut e = png::Encoder::new(&mut out, w as u32, h as u32);
        e.set_color(png::ColorType::Rgb);
        e.set_depth(png::BitDepth::Eight);
        e.set_compression(png::Compression::Fast);
        let mut wr = e.write_header().expect("writing to a Vec");
        wr.write_image_data(&rgb).expect("the sizes match");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_png() {
        assert_eq!(width(None), 320);
        assert_eq!(width(Some(300)), 320);
        assert_eq!(width(Some(5000)), 1024);
        assert_eq!(width(Some(0)), 160);
        let s = dispatch::Screen {
            width: 720,
            height: 400,
            rgb: [170u8, 0, 170].repeat(720 * 400),
        };
        let png = encode(&s, 320);
        let d = png::Decoder::new(std::io::Cursor::new(png));
        let mut r = d.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (320, 178));
        assert_eq!(&buf[..3], &[170, 0, 170]);
    }
}

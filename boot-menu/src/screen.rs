//! The seat's screen: its monitor's preferred mode, which the thin client sends with a
//! pick so the guest starts at that size and fills the screen. Read from the kernel's DRM
//! connectors in sysfs (`/sys/class/drm/CARD-CONNECTOR/`): the first line of `modes` is
//! the preferred mode; when a driver lists none, the EDID's first detailed timing
//! descriptor (VESA E-EDID 1.4, section 3.10.2) is.

use std::path::Path;

/// A screen size in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Screen {
    pub width: u32,
    pub height: u32,
}

/// A DRM mode name ("1920x1080", "1920x1080i"): its size.
pub fn parse_mode(line: &str) -> Option<Screen> {
    let (w, h) = line.trim().split_once('x')?;
    let h: String = h.chars().take_while(|c| c.is_ascii_digit()).collect();
    let s = Screen {
        width: w.parse().ok()?,
        height: h.parse().ok()?,
    };
    (s.width > 0 && s.height > 0).then_some(s)
}

/// The preferred mode of an EDID: its first detailed timing descriptor (bytes 54-71 of
/// the base block), which E-EDID 1.4 says is the preferred timing.
pub fn parse_edid(edid: &[u8]) -> Option<Screen> {
    const HEADER: [u8; 8] = [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0];
    if edid.len() < 128 || edid[..8] != HEADER {
        return None;
    }
    let d = &edid[54..72];
    // A pixel clock of 0 marks a display descriptor, not a timing.
    if d[0] == 0 && d[1] == 0 {
        return None;
    }
    let width = d[2] as u32 | ((d[4] as u32 & 0xf0) << 4);
    let height = d[5] as u32 | ((d[7] as u32 & 0xf0) << 4);
    (width > 0 && height > 0).then_some(Screen { width, height })
}

/// The preferred mode of the first connected monitor under `sys` (`/sys`).
pub fn preferred(sys: &Path) -> Option<Screen> {
    let mut connectors: Vec<_> = std::fs::read_dir(sys.join("class/drm"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        // "card0-VGA-1": connectors; "card0", "renderD128": devices.
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("card") && n.contains('-'))
        })
        .collect();
    connectors.sort();
    connectors.into_iter().find_map(|c| {
        let status = std::fs::read_to_string(c.join("status")).unwrap_or_default();
        if status.trim() != "connected" {
            return None;
        }
        let modes = std::fs::read_to_string(c.join("modes")).unwrap_or_default();
        modes
            .lines()
            .next()
            .and_then(parse_mode)
            .or_else(|| parse_edid(&std::fs::read(c.join("edid")).ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EDID base block whose first descriptor is CEA-861's 1920x1080 at 60 Hz.
    fn edid_1080p() -> Vec<u8> {
        let mut e = vec![0u8; 128];
        e[..8].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        e[54..72].copy_from_slice(&[
            0x02, 0x3a, 0x80, 0x18, 0x71, 0x38, 0x2d, 0x40, 0x58, 0x2c, 0x45, 0x00, 0x0f, 0x28,
            0x21, 0x00, 0x00, 0x1e,
        ]);
        e
    }

    fn s(width: u32, height: u32) -> Screen {
        Screen { width, height }
    }

    #[test]
    fn modes_and_edid() {
        assert_eq!(parse_mode("1920x1080\n"), Some(s(1920, 1080)));
        assert_eq!(parse_mode("1280x720i"), Some(s(1280, 720)));
        assert_eq!(parse_mode("garbage"), None);
        assert_eq!(parse_mode("0x0"), None);
        assert_eq!(parse_edid(&edid_1080p()), Some(s(1920, 1080)));
        let mut no_timing = edid_1080p();
        no_timing[54] = 0;
        no_timing[55] = 0;
        assert_eq!(parse_edid(&no_timing), None);
        assert_eq!(parse_edid(&edid_1080p()[..100]), None);
        let mut bad = edid_1080p();
        bad[0] = 1;
        assert_eq!(parse_edid(&bad), None);
    }

    #[test]
    fn the_first_connected_connector_counts() {
        let sys = std::env::temp_dir().join(format!("bm-screen-{}", std::process::id()));
        let drm = sys.join("class/drm");
        for (c, status, modes) in [
            ("card0-VGA-1", "disconnected", "1024x768\n"),
            ("card0-Virtual-1", "connected", "1600x900\n1024x768\n"),
        ] {
            std::fs::create_dir_all(drm.join(c)).unwrap();
            std::fs::write(drm.join(c).join("status"), status).unwrap();
            std::fs::write(drm.join(c).join("modes"), modes).unwrap();
        }
        std::fs::create_dir_all(drm.join("card0")).unwrap();
        assert_eq!(preferred(&sys), Some(s(1600, 900)));
        // No modes listed: the EDID says.
        std::fs::write(drm.join("card0-Virtual-1/modes"), "").unwrap();
        std::fs::write(drm.join("card0-Virtual-1/edid"), edid_1080p()).unwrap();
        assert_eq!(preferred(&sys), Some(s(1920, 1080)));
        std::fs::remove_dir_all(&sys).unwrap();
        assert_eq!(preferred(&sys), None);
    }
}

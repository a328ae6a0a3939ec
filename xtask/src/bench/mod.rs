//! `cargo xtask bench <service>`: benchmarks of vdd against real clients and real peer
//! servers, inside lab namespaces only.

pub mod bootmenu;
pub mod dhcp;
pub mod floods;
pub mod http;
pub mod nbd;
pub mod tftp;

/// The median of some samples (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(super::median(vec![]).is_nan());
    }
}

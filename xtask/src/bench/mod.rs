//! `cargo xtask bench ...`: benchmarks, one module each. Every loop is bounded in count and
//! time, and traffic stays on loopback or inside lab namespaces.

pub mod bootmenu;

/// Median of a sample (mean of the two middle values for an even count).
pub fn median(v: &mut [f64]) -> f64 {
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

//! Sizes on the command line: `4096`, `64K`, `256MiB`, `1G`, `2TiB`.
//!
//! Every suffix is binary (K = KiB = 1024). Zero, fractions, overflow and
//! anything else are refused with a message that says what is accepted.

/// What a SIZE may look like, for error messages and `--help`.
pub const SIZE_SYNTAX: &str =
    "a whole number of bytes, optionally with a suffix K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024)";

/// Parse a size. The suffix is case-insensitive; a space before it is allowed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty size; expected {SIZE_SYNTAX}"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size; expected {SIZE_SYNTAX}"));
    }
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(format!(
                "'{s}' has an unknown suffix '{suffix}'; expected {SIZE_SYNTAX}"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is too large (the limit is {} bytes)", u64::MAX))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large (the limit is {} bytes)", u64::MAX))?;
    if bytes == 0 {
        return Err(format!("'{s}': a size must be greater than zero"));
    }
    Ok(bytes)
}

/// A SIZE where 0 means "off" (e.g. `--sequential-cutoff 0`).
pub fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b == b'0') {
        return Ok(0);
    }
    parse_size(s)
}

/// Parse a cache block size: a SIZE that is a power of two from 512 to 64 KiB.
pub fn parse_block_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    let (min, max) = (
        pmcache_engine::format::MIN_BLOCK as u64,
        pmcache_engine::format::MAX_BLOCK as u64,
    );
    if !n.is_power_of_two() || n < min || n > max {
        return Err(format!(
            "block size {n} must be a power of two from {min} to {max} bytes (e.g. 4K)"
        ));
    }
    Ok(n as u32)
}

/// Human form of a byte count: `256 MiB`, `1.5 GiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_a_size_only_where_it_means_off() {
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("000"), Ok(0));
        assert_eq!(parse_size_or_zero("4MiB"), Ok(4 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size_or_zero("0x").is_err());
        assert!(parse_size_or_zero("").is_err());
    }

    #[test]
    fn accepts_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256 MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
    }

    #[test]
    fn rejects_garbage_zero_and_overflow() {
        for bad in [
            "", " ", "abc", "12x", "1.5G", "-1", "+1", "0", "0K", "K", "1 2", "1KB", "1GB", "1e3",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16777216T").is_err());
        assert_eq!(parse_size("16777215T"), Ok(16777215u64 << 40));
    }

    #[test]
    fn block_sizes() {
        assert_eq!(parse_block_size("4K"), Ok(4096));
        assert_eq!(parse_block_size("512"), Ok(512));
        assert_eq!(parse_block_size("64KiB"), Ok(65536));
        assert!(parse_block_size("256").is_err());
        assert!(parse_block_size("3000").is_err());
        assert!(parse_block_size("128K").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(256 << 20), "256 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}

//! Amounts of money: rounded once to minor units (cents), written as
//! decimals (`"12.34"`).
//!
//! A month by node has two million amounts. Each is a [`Money`]: the
//! decimal's bytes kept inline, not on the heap, since a `String` each was
//! two million allocations to make and as many to free.

use std::{fmt, ops::Deref, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Rounds `amount` (in currency units) to minor units, half away from zero.
pub(crate) fn to_minor(amount: f64, decimals: u32) -> i64 {
    (amount * 10f64.powi(decimals as i32)).round() as i64
}

/// Formats minor units as a decimal amount (`1234`, 2 → `"12.34"`).
/// Digit by digit: the `format!` machinery was a tenth of the pricing.
pub(crate) fn format_minor(minor: i64, decimals: u32) -> Money {
    let mut digits = [0u8; CAPACITY];
    let mut at = digits.len();
    let mut m = minor.unsigned_abs();
    let mut places = 0;
    while m > 0 || places <= decimals {
        if places == decimals && decimals > 0 {
            at -= 1;
            digits[at] = b'.';
        }
        at -= 1;
        digits[at] = b'0' + (m % 10) as u8;
        m /= 10;
        places += 1;
    }
    if minor < 0 {
        at -= 1;
        digits[at] = b'-';
    }
    let mut money = Money {
        bytes: [0; CAPACITY],
        len: (CAPACITY - at) as u8,
    };
    money.bytes[..CAPACITY - at].copy_from_slice(&digits[at..]);
    money
}

/// The longest amount: 19 digits of an `i64`, a point and a sign, or
/// `-0.` and 6 decimals (`[prices] decimals` is 0..=6).
const CAPACITY: usize = 23;

/// A decimal amount of money, as [`format_minor`] writes it; empty by
/// default (an answer of an aggregator from before the field).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct Money {
    bytes: [u8; CAPACITY],
    len: u8,
}

impl Deref for Money {
    type Target = str;
    fn deref(&self) -> &str {
        // Only ASCII digits, `.` and `-` are ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq<str> for Money {
    fn eq(&self, other: &str) -> bool {
        **self == *other
    }
}

impl PartialEq<&str> for Money {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

/// Why a text is not an amount.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MoneyError {
    #[error("amount `{0}` is not a decimal number (`12.34`, `-0.05`, `7`)")]
    NotDecimal(String),
    #[error("amount `{0}` is longer than {CAPACITY} characters")]
    TooLong(String),
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, MoneyError> {
        let unsigned = s.strip_prefix('-').unwrap_or(s);
        let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(fraction) {
            return Err(MoneyError::NotDecimal(s.to_owned()));
        }
        if s.len() > CAPACITY {
            return Err(MoneyError::TooLong(s.to_owned()));
        }
        let mut money = Money {
            bytes: [0; CAPACITY],
            len: s.len() as u8,
        };
        money.bytes[..s.len()].copy_from_slice(s.as_bytes());
        Ok(money)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_formats_exactly() {
        assert_eq!(format_minor(1234, 2), "12.34");
        assert_eq!(format_minor(5, 2), "0.05");
        assert_eq!(format_minor(-5, 2), "-0.05");
        assert_eq!(format_minor(7, 0), "7");
        assert_eq!(format_minor(0, 0), "0");
        assert_eq!(format_minor(100, 2), "1.00");
        assert_eq!(format_minor(-120, 0), "-120");
        assert_eq!(format_minor(1, 6), "0.000001");
        assert_eq!(format_minor(-1, 6), "-0.000001");
        assert_eq!(format_minor(i64::MAX, 2), "92233720368547758.07");
        assert_eq!(format_minor(i64::MIN, 3), "-9223372036854775.808");
        assert_eq!(format_minor(i64::MIN, 0), "-9223372036854775808");
        assert_eq!(format_minor(i64::MIN, 6), "-9223372036854.775808");
        assert_eq!(to_minor(0.125, 2), 13, "half away from zero");
        assert_eq!(to_minor(2.49 * 10.0, 2), 2490);
    }

    #[test]
    fn amounts_read_back_as_written_and_refuse_other_text() {
        for minor in [0, 1, -1, 1234, -120, i64::MAX, i64::MIN] {
            for decimals in 0..=6 {
                let m = format_minor(minor, decimals);
                let json = serde_json::to_string(&m).unwrap();
                assert_eq!(json, format!("\"{m}\""));
                assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
            }
        }
        for bad in ["", "-", "1.", ".5", "1e3", "12,34", " 1", "0x10", "1.2.3"] {
            let e = bad.parse::<Money>().unwrap_err();
            assert!(e.to_string().contains("not a decimal"), "{bad:?}: {e}");
        }
        let long = "1".repeat(CAPACITY + 1);
        let e = serde_json::from_str::<Money>(&format!("\"{long}\"")).unwrap_err();
        assert!(e.to_string().contains("longer than 23"), "{e}");
    }
}

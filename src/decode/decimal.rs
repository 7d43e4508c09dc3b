//! Exact decimal parsing for quantities and prices.
//!
//! Strict grammar (JSON's number syntax, plus an optional leading `+`):
//! `[+-]? digits ( . digits )? ( [eE] [+-]? digits )?`. No rounding ever: a value that needs more
//! than 28 decimal places or more than 96 bits of mantissa is refused, not approximated.
//! `NaN`, `inf`, `1_000`, `0x10`, `.5` and `" 5"` are refused.

use rust_decimal::Decimal;

/// rust_decimal's largest scale.
const MAX_SCALE: i64 = 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("is not a decimal number")]
    Syntax,
    #[error("has more than 28 decimal places")]
    TooPrecise,
    #[error("is too large (the limit is about 7.9e28)")]
    TooLarge,
}

/// Parses a decimal exactly, keeping its scale (`"12.50"` has scale 2).
pub fn parse_decimal(s: &str) -> Result<Decimal, DecimalError> {
    let (negative, rest) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int_digits, rest) = split_digits(rest);
    if int_digits.is_empty() {
        return Err(DecimalError::Syntax);
    }
    let (frac_digits, rest) = match rest.strip_prefix('.') {
        Some(after) => match split_digits(after) {
            ("", _) => return Err(DecimalError::Syntax),
            split => split,
        },
        None => ("", rest),
    };
    let (exponent, rest): (i64, &str) = match rest.strip_prefix(['e', 'E']) {
        Some(after) => {
            let (exp_negative, after) = match after.strip_prefix('-') {
                Some(after) => (true, after),
                None => (false, after.strip_prefix('+').unwrap_or(after)),
            };
            let (digits, rest) = split_digits(after);
            if digits.is_empty() {
                return Err(DecimalError::Syntax);
            }
            let digits = digits.trim_start_matches('0');
            // Any exponent beyond a few hundred cannot fit; don't build huge strings for it.
            if digits.len() > 4 {
                return Err(if exp_negative {
                    DecimalError::TooPrecise
                } else {
                    DecimalError::TooLarge
                });
            }
            let e: i64 = if digits.is_empty() {
                0
            } else {
                digits.parse().map_err(|_| DecimalError::Syntax)?
            };
            // |e| ≤ 9999: negating cannot overflow.
            (if exp_negative { e.saturating_neg() } else { e }, rest)
        }
        None => (0, rest),
    };
    if !rest.is_empty() {
        return Err(DecimalError::Syntax);
    }

    // value = digits × 10^-scale
    let mut digits: String =
        String::with_capacity(int_digits.len().saturating_add(frac_digits.len()));
    digits.push_str(int_digits);
    digits.push_str(frac_digits);
    let frac_len = i64::try_from(frac_digits.len()).map_err(|_| DecimalError::TooPrecise)?;
    let mut scale = frac_len.saturating_sub(exponent);
    if scale < 0 {
        if digits.trim_start_matches('0').is_empty() {
            scale = 0;
        } else {
            if scale < -40 {
                return Err(DecimalError::TooLarge);
            }
            // 1 ..= 40 zeros.
            digits.extend(std::iter::repeat_n('0', scale.unsigned_abs() as usize));
            scale = 0;
        }
    }
    // Only trailing zeros may be dropped to fit the scale: that keeps the value exact.
    while scale > MAX_SCALE && digits.ends_with('0') {
        digits.pop();
        scale = scale.saturating_sub(1);
    }
    if scale > MAX_SCALE {
        return Err(DecimalError::TooPrecise);
    }
    // 0 ..= 28 from here.
    let scale = u32::try_from(scale).map_err(|_| DecimalError::TooPrecise)?;
    let significant = digits.trim_start_matches('0');
    if significant.len() > 29 {
        return Err(
            if scale > 0 && significant.len() <= 29_usize.saturating_add(scale as usize) {
                DecimalError::TooPrecise
            } else {
                DecimalError::TooLarge
            },
        );
    }
    let mantissa: i128 = if significant.is_empty() {
        0
    } else {
        significant.parse().map_err(|_| DecimalError::Syntax)?
    };
    // At most 29 digits: negating cannot overflow an i128.
    let mantissa = if negative {
        mantissa.saturating_neg()
    } else {
        mantissa
    };
    Decimal::try_from_i128_with_scale(mantissa, scale).map_err(|_| {
        if scale > 0 {
            DecimalError::TooPrecise
        } else {
            DecimalError::TooLarge
        }
    })
}

/// The leading ASCII digits of `s`, and the rest.
fn split_digits(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s.split_at_checked(end).unwrap_or((s, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        parse_decimal(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_plain_decimals_exactly_keeping_scale() {
        assert_eq!(d("12.5").to_string(), "12.5");
        assert_eq!(d("12.50").to_string(), "12.50");
        assert_eq!(d("-3").to_string(), "-3");
        assert_eq!(d("+3").to_string(), "3");
        assert_eq!(d("0.1") + d("0.2"), d("0.3"));
        assert_eq!(
            d("12345678901234567890.12345678").to_string(),
            "12345678901234567890.12345678"
        );
        assert_eq!(
            d("0.0000000000000000000000000001").to_string(),
            "0.0000000000000000000000000001"
        );
        assert_eq!(d("007").to_string(), "7");
        assert_eq!(d("79228162514264337593543950335"), Decimal::MAX);
    }

    #[test]
    fn parses_scientific_notation_exactly() {
        assert_eq!(d("1e3").to_string(), "1000");
        assert_eq!(d("1.5E+3").to_string(), "1500");
        assert_eq!(d("1.25e-2").to_string(), "0.0125");
        assert_eq!(d("0e5"), Decimal::ZERO);
        assert_eq!(d("120e-1").to_string(), "12.0");
        assert_eq!(d("1e-28").to_string(), "0.0000000000000000000000000001");
        assert_eq!(d("10e-29").to_string(), "0.0000000000000000000000000001");
    }

    #[test]
    fn refuses_what_it_cannot_represent_exactly() {
        for s in [
            "", "-", "+", "abc", "NaN", "nan", "inf", "-inf", "Infinity", "1_000", "0x10", ".5",
            "5.", " 5", "5 ", "1e", "1e+", "--1", "1.2.3", "1,5", "١",
        ] {
            assert_eq!(parse_decimal(s), Err(DecimalError::Syntax), "{s:?}");
        }
        assert_eq!(parse_decimal("1e-29"), Err(DecimalError::TooPrecise));
        assert_eq!(
            parse_decimal("0.00000000000000000000000000001"),
            Err(DecimalError::TooPrecise)
        );
        assert_eq!(parse_decimal("1e29"), Err(DecimalError::TooLarge));
        assert_eq!(parse_decimal("1e99999"), Err(DecimalError::TooLarge));
        assert_eq!(parse_decimal("1e-99999"), Err(DecimalError::TooPrecise));
        assert_eq!(
            parse_decimal("79228162514264337593543950336"),
            Err(DecimalError::TooLarge)
        );
        assert_eq!(
            parse_decimal("1.00000000000000000000000000001"),
            Err(DecimalError::TooPrecise)
        );
    }
}

//! Money as integer minor units (paise, kobo), and the strict decimal syntax
//! every wire amount is parsed from.

use std::fmt;

/// An amount of money in minor units (1/100 of the major unit).
///
/// Balances may be negative (a system account that issues money runs a
/// negative balance); amounts parsed from the wire never are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

/// Why a wire amount was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount must be digits with an optional '.' and at most two decimals")]
    Syntax,
    #[error("amount has more than two decimals")]
    TooPrecise,
    #[error("amount exceeds the maximum of {}", Money::MAX)]
    TooLarge,
    #[error("a percentage is at most 100")]
    PercentOver100,
}

impl Money {
    /// The largest amount any single wire value may carry: 9,999,999,999.99.
    ///
    /// Far above any wallet or card limit, and small enough that the sum of a
    /// million such balances still fits in an `i64`.
    pub const MAX: Money = Money(999_999_999_999);
    pub const ZERO: Money = Money(0);

    pub const fn from_minor(minor: i64) -> Money {
        Money(minor)
    }

    pub const fn minor(self) -> i64 {
        self.0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    /// Strictly parses a non-negative decimal such as `150.50`, `150.5` or `200`.
    ///
    /// Refused: signs, exponents, whitespace, a bare `.`, `.5`, `5.`, more than
    /// two decimals, non-ASCII digits and anything above [`Money::MAX`].
    pub fn parse(text: &str) -> Result<Money, AmountError> {
        let minor = parse_two_decimals(text)?;
        if minor > Money::MAX.0 {
            return Err(AmountError::TooLarge);
        }
        Ok(Money(minor))
    }

    /// `floor(self × percent)`, to the minor unit. Used for cashback.
    pub fn percent_floor(self, percent: Percent) -> Money {
        let product = i128::from(self.0) * i128::from(percent.basis_points());
        // Floor division: the cashback never exceeds the exact value.
        Money(product.div_euclid(10_000) as i64)
    }

    /// `floor(self × numerator / denominator)`; used to split a refund in the
    /// same proportion as the original payment. `denominator` must be positive.
    pub fn mul_div_floor(self, numerator: Money, denominator: Money) -> Money {
        assert!(denominator.0 > 0, "mul_div_floor by a non-positive amount");
        let product = i128::from(self.0) * i128::from(numerator.0);
        Money(product.div_euclid(i128::from(denominator.0)) as i64)
    }
}

/// Parses `digits[.d[d]]` into hundredths. The caller applies the bound.
fn parse_two_decimals(text: &str) -> Result<i64, AmountError> {
    if text.is_empty() {
        return Err(AmountError::Empty);
    }
    let (int_part, frac_part) = match text.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int_part) || frac_part.is_some_and(|f| !digits(f)) {
        return Err(AmountError::Syntax);
    }
    let frac = frac_part.unwrap_or("");
    if frac.len() > 2 {
        return Err(AmountError::TooPrecise);
    }
    // 13 integer digits are already far above any bound we apply; refusing
    // more before the arithmetic keeps it overflow-free. Leading zeros add
    // nothing, so they do not count.
    if int_part.trim_start_matches('0').len() > 13 {
        return Err(AmountError::TooLarge);
    }
    let mut minor: i64 = 0;
    for b in int_part.bytes() {
        minor = minor * 10 + i64::from(b - b'0');
    }
    let mut cents = 0;
    for b in frac.bytes() {
        cents = cents * 10 + i64::from(b - b'0');
    }
    if frac.len() == 1 {
        cents *= 10;
    }
    Ok(minor * 100 + cents)
}

impl fmt::Display for Money {
    /// Always two decimals: `150.50`, `-3.05`, `0.00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

/// A percentage with two decimals (`20`, `12.5`), held in basis points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Percent(u32);

impl Percent {
    pub const HUNDRED: Percent = Percent(10_000);

    /// Parses `0` to `100` with up to two decimals.
    pub fn parse(text: &str) -> Result<Percent, AmountError> {
        match parse_two_decimals(text) {
            Ok(bp) if bp <= 10_000 => Ok(Percent(bp as u32)),
            Ok(_) | Err(AmountError::TooLarge) => Err(AmountError::PercentOver100),
            Err(e) => Err(e),
        }
    }

    pub fn from_basis_points(bp: u32) -> Option<Percent> {
        (bp <= 10_000).then_some(Percent(bp))
    }

    pub fn basis_points(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Money(i64::from(self.0)), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(Money::parse("150.50"), Ok(Money(15050)));
        assert_eq!(Money::parse("150.5"), Ok(Money(15050)));
        assert_eq!(Money::parse("200"), Ok(Money(20000)));
        assert_eq!(Money::parse("0.01"), Ok(Money(1)));
        assert_eq!(Money::parse("0"), Ok(Money(0)));
        assert_eq!(Money::parse("9999999999.99"), Ok(Money::MAX));
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "", "-1", "+1", "1e3", "1E3", "1.234", ".5", "5.", ".", " 1", "1 ", "1,00", "0x10",
            "١٢", "１", "1.2.3", "NaN", "inf", "1_000",
        ] {
            assert!(Money::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(Money::parse("1.234"), Err(AmountError::TooPrecise));
        assert_eq!(Money::parse("10000000000"), Err(AmountError::TooLarge));
        assert_eq!(
            Money::parse("99999999999999999999"),
            Err(AmountError::TooLarge)
        );
        assert_eq!(Money::parse(""), Err(AmountError::Empty));
    }

    #[test]
    fn formats_with_two_decimals() {
        assert_eq!(Money(15050).to_string(), "150.50");
        assert_eq!(Money(5).to_string(), "0.05");
        assert_eq!(Money(0).to_string(), "0.00");
        assert_eq!(Money(-305).to_string(), "-3.05");
        assert_eq!(Money(i64::MIN).to_string(), "-92233720368547758.08");
    }

    #[test]
    fn cashback_rounds_down_to_the_paisa() {
        let p20 = Percent::parse("20").unwrap();
        assert_eq!(Money(15050).percent_floor(p20), Money(3010));
        assert_eq!(Money(1).percent_floor(p20), Money(0));
        let p12_5 = Percent::parse("12.5").unwrap();
        assert_eq!(Money(999).percent_floor(p12_5), Money(124)); // 124.875
        assert_eq!(Money(999).percent_floor(Percent::HUNDRED), Money(999));
        assert_eq!(Percent::parse("100.01"), Err(AmountError::PercentOver100));
        assert_eq!(
            Percent::parse("99999999999999999999"),
            Err(AmountError::PercentOver100)
        );
        assert_eq!(Percent::parse("1e2"), Err(AmountError::Syntax));
        // Long input is judged by what it is, not by its length.
        assert_eq!(
            Percent::parse("12.50000000000000"),
            Err(AmountError::TooPrecise)
        );
        assert_eq!(
            Percent::parse("abcdefghijklmnopq"),
            Err(AmountError::Syntax)
        );
        assert_eq!(
            Percent::parse("000000000000000012.5").map(Percent::basis_points),
            Ok(1_250)
        );
        assert_eq!(Percent::parse("100").map(Percent::basis_points), Ok(10_000));
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(minor in 0i64..=Money::MAX.minor()) {
            let m = Money::from_minor(minor);
            prop_assert_eq!(Money::parse(&m.to_string()), Ok(m));
        }

        #[test]
        fn parse_then_format_is_canonical(int in 0u64..10_000_000_000u64, frac in proptest::option::of(0u8..100)) {
            let text = match frac {
                Some(f) => format!("{int}.{f:02}"),
                None => int.to_string(),
            };
            let m = Money::parse(&text).unwrap();
            let expected = match frac { Some(f) => format!("{int}.{f:02}"), None => format!("{int}.00") };
            prop_assert_eq!(m.to_string(), expected);
        }

        #[test]
        fn parse_never_panics_and_accepts_only_the_grammar(text in "\\PC{0,20}") {
            if let Ok(m) = Money::parse(&text) {
                prop_assert!(m.minor() >= 0 && m <= Money::MAX);
                let (i, f) = text.split_once('.').unwrap_or((&text, "00"));
                prop_assert!(!i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
                prop_assert!((1..=2).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()));
            }
        }

        #[test]
        fn leading_zeros_change_nothing(zeros in 0usize..40, minor in 0i64..=Money::MAX.minor()) {
            let m = Money::from_minor(minor);
            prop_assert_eq!(Money::parse(&format!("{}{m}", "0".repeat(zeros))), Ok(m));
        }

        #[test]
        fn long_digit_strings_are_refused_without_overflow(text in "[0-9]{0,40}(\\.[0-9]{0,4})?") {
            // Debug builds panic on overflow: reaching the end is the check.
            if let Ok(m) = Money::parse(&text) {
                prop_assert!(m <= Money::MAX);
            }
        }

        #[test]
        fn one_decimal_means_tens_of_minor_units(int in 0u32..1_000_000, d in 0u8..10) {
            let m = Money::parse(&format!("{int}.{d}")).unwrap();
            prop_assert_eq!(m.minor(), i64::from(int) * 100 + i64::from(d) * 10);
        }

        #[test]
        fn cashback_never_exceeds_the_amount(minor in 0i64..=Money::MAX.minor(), bp in 0u32..=10_000) {
            let p = Percent::from_basis_points(bp).unwrap();
            let c = Money::from_minor(minor).percent_floor(p);
            prop_assert!(c.minor() >= 0 && c.minor() <= minor);
            // floor: the next paisa would exceed the exact product
            prop_assert!(i128::from(c.minor()) * 10_000 <= i128::from(minor) * i128::from(bp));
            prop_assert!(i128::from(c.minor() + 1) * 10_000 > i128::from(minor) * i128::from(bp));
        }
    }
}

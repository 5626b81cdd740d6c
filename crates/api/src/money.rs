//! Money as integer minor units plus an ISO 4217 code, and order pricing.
//!
//! Floats never touch money: every amount is an `i64` count of the currency's
//! minor unit (cents for EUR, yen for JPY) and arithmetic is checked.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An amount of money in a currency's minor units.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Money {
    /// Amount in minor units of `currency` (for example cents); never a float.
    #[schemars(range(min = 0))]
    pub amount: i64,
    /// ISO 4217 currency code, upper case (for example `EUR`).
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
    /// Human-readable rendering (for example `24.50 EUR`), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Money {
    /// A money value with its display string filled in.
    pub fn new(amount: i64, currency: impl Into<String>) -> Self {
        let currency = currency.into();
        let display = Some(format_amount(amount, &currency));
        Self {
            amount,
            currency,
            display,
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_amount(self.amount, &self.currency))
    }
}

/// Number of decimal places of a currency's minor unit (ISO 4217 exponent).
/// Currencies not listed use two, which is true of most of the world's.
pub fn minor_unit_exponent(currency: &str) -> u32 {
    match currency {
        // Zero-decimal currencies.
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        // Three-decimal currencies.
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// Formats minor units as `major.minor CUR`, for example `1250 EUR` → `12.50 EUR`.
pub fn format_amount(amount: i64, currency: &str) -> String {
    let exp = minor_unit_exponent(currency);
    if exp == 0 {
        return format!("{amount} {currency}");
    }
    let unit = 10_i64.pow(exp);
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    let unit = unit.unsigned_abs();
    format!(
        "{sign}{}.{:0width$} {currency}",
        abs / unit,
        abs % unit,
        width = exp as usize
    )
}

/// Why an order could not be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("menu item {0:?} is not on the menu")]
    UnknownItem(String),
    #[error("the order total overflows")]
    Overflow,
}

/// A line to price: a unit price in minor units and a quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceLine {
    pub unit_price: i64,
    pub quantity: i64,
}

/// Sums `unit_price × quantity` over the lines with checked arithmetic.
pub fn total(lines: impl IntoIterator<Item = PriceLine>) -> Result<i64, PricingError> {
    lines.into_iter().try_fold(0_i64, |acc, line| {
        line.unit_price
            .checked_mul(line.quantity)
            .and_then(|sub| acc.checked_add(sub))
            .ok_or(PricingError::Overflow)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_by_currency_exponent() {
        assert_eq!(format_amount(1250, "EUR"), "12.50 EUR");
        assert_eq!(format_amount(5, "USD"), "0.05 USD");
        assert_eq!(format_amount(1250, "JPY"), "1250 JPY");
        assert_eq!(format_amount(1250, "KWD"), "1.250 KWD");
        assert_eq!(format_amount(-1250, "EUR"), "-12.50 EUR");
        assert_eq!(Money::new(990, "GBP").to_string(), "9.90 GBP");
    }

    #[test]
    fn total_overflow_is_an_error_not_a_wrap() {
        let lines = [
            PriceLine {
                unit_price: i64::MAX / 2,
                quantity: 2,
            },
            PriceLine {
                unit_price: 1,
                quantity: 2,
            },
        ];
        assert_eq!(total(lines), Err(PricingError::Overflow));
    }

    proptest! {
        #[test]
        fn total_is_sum_of_lines(lines in prop::collection::vec((0_i64..10_000_000, 1_i64..100), 0..50)) {
            let priced: Vec<_> = lines.iter().map(|&(unit_price, quantity)| PriceLine { unit_price, quantity }).collect();
            let expected: i128 = lines.iter().map(|&(p, q)| i128::from(p) * i128::from(q)).sum();
            prop_assert_eq!(i128::from(total(priced.clone()).unwrap()), expected);
            // Order of lines never changes the total.
            let mut reversed = priced;
            reversed.reverse();
            prop_assert_eq!(i128::from(total(reversed).unwrap()), expected);
        }

        #[test]
        fn display_round_trips_to_minor_units(amount in 0_i64..1_000_000_000, cur in prop::sample::select(vec!["EUR", "JPY", "KWD"])) {
            let shown = format_amount(amount, cur);
            let number = shown.split(' ').next().unwrap().replace('.', "");
            prop_assert_eq!(number.parse::<i64>().unwrap(), amount);
        }
    }
}

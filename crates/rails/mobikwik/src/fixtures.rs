//! Sandbox fixtures: with them, the seed documents' sample requests, signed,
//! succeed as written. Loading them again (every sandbox start) changes
//! nothing: each goes through an idempotent admin operation.

use payrail_core::{Money, Percent};
use payrail_railkit::admin::AdminError;

use crate::admin::{self, NewMerchant};
use crate::flows::Rail;

pub const MID: &str = "MBK9006";
pub const MERCHANT_NAME: &str = "TestMerchant";
pub const SECRET: &str = "ju6tygh7u7tdg554k098ujd5468o";
pub const AGGREGATED_ID: &str = "AGG123";
pub const WALLETS: [(&str, &str); 2] = [("9311032820", "10000.00"), ("9910057241", "1000.00")];
pub const TOKEN: &str = "MBK_TOKEN_123456789";
pub const TOKEN_CELL: &str = "9311032820";
pub const TOKEN_CAP: &str = "200.00";
pub const COUPON: &str = "SAVE20";
pub const COUPON_PERCENT: &str = "20";

pub(crate) async fn load(rail: &Rail) -> Result<(), AdminError> {
    admin::create_merchant(
        rail,
        NewMerchant {
            mid: MID.into(),
            name: MERCHANT_NAME.into(),
            secret: SECRET.into(),
            regen_secret: None,
            aggregated_merchant_ids: vec![AGGREGATED_ID.into()],
        },
    )
    .await?;
    let amount = |text: &str| Money::parse(text).expect("a valid literal");
    for (cell, balance) in WALLETS {
        admin::create_wallet(rail, cell.into(), amount(balance)).await?;
    }
    admin::create_token(
        rail,
        MID.into(),
        TOKEN_CELL.into(),
        amount(TOKEN_CAP),
        admin::IssuedToken::Fixed(TOKEN.into()),
    )
    .await?;
    let percent = Percent::parse(COUPON_PERCENT).expect("a valid literal");
    admin::create_coupon(rail, COUPON.into(), percent).await?;
    Ok(())
}

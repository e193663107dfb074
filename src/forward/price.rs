//! Current prices for the guard, to value market orders given in base size: the public,
//! unsigned price endpoint of the family of the host the order goes to, through cbgate's own
//! upstream client and that same host (so a price never comes from another family's market):
//!
//! | family          | endpoint                                   | field                      |
//! |-----------------|--------------------------------------------|----------------------------|
//! | Advanced Trade  | `GET /api/v3/brokerage/market/products/{id}` | `price`                  |
//! | Exchange        | `GET /products/{id}/ticker`                | `price` (last trade)       |
//! | INTX            | `GET /api/v1/instruments/{id}/quote`       | `trade_price`, else `mark_price` |
//! | Prime           | none public: such an order is refused as undetermined |                 |

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::config::KeyKind;
use crate::forward::upstream::{OwnCall, UpstreamClient};
use crate::gate::guard::PriceSource;
use crate::gate::route::Upstream;

/// Advanced Trade's public product endpoint's path prefix.
pub const PRODUCT_PATH: &str = "/api/v3/brokerage/market/products/";

/// The whole price fetch, answer included, at most; an order waits on it.
pub const PRICE_TIMEOUT: Duration = Duration::from_secs(5);

/// Prices from the upstream host an order goes to.
pub struct ProductPrices<'a> {
    pub client: &'a UpstreamClient,
    pub upstream: &'a Upstream,
}

/// The price path of `product` on `family`'s hosts and the answer's price fields, in order
/// of preference; `None` where the family has no public price.
pub fn price_endpoint(family: KeyKind, product: &str) -> Option<(String, &'static [&'static str])> {
    const LAST: &[&str] = &["price"];
    const INTX_QUOTE: &[&str] = &["trade_price", "mark_price"];
    // The guard has checked the id is [A-Za-z0-9-]: safe in a path as it is.
    match family {
        KeyKind::Cdp => Some((format!("{PRODUCT_PATH}{product}"), LAST)),
        KeyKind::Exchange => Some((format!("/products/{product}/ticker"), LAST)),
        KeyKind::Intx => Some((format!("/api/v1/instruments/{product}/quote"), INTX_QUOTE)),
        KeyKind::Prime => None,
    }
}

impl PriceSource for ProductPrices<'_> {
    fn origin(&self) -> &str {
        self.upstream.authority.as_str()
    }

    fn price<'a>(
        &'a self,
        product: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Decimal, String>> + Send + 'a>> {
        Box::pin(async move {
            tokio::time::timeout(PRICE_TIMEOUT, self.fetch(product))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} s", PRICE_TIMEOUT.as_secs())))
        })
    }
}

impl ProductPrices<'_> {
    async fn fetch(&self, product: &str) -> Result<Decimal, String> {
        let upstream = self.upstream;
        let (path, fields) = price_endpoint(upstream.family, product).ok_or_else(|| {
            format!(
                "Coinbase {} has no public price endpoint",
                match upstream.family {
                    KeyKind::Prime => "Prime",
                    other => other.as_str(),
                }
            )
        })?;
        let (status, _, body) = self
            .client
            .call(
                OwnCall {
                    method: http::Method::GET,
                    host: &upstream.host,
                    authority: &upstream.authority,
                    path: &path,
                    token: None,
                    body: None,
                },
                256 * 1024,
            )
            .await?;
        if !status.is_success() {
            return Err(format!("{path} answered {status}"));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))?;
        let price = fields
            .iter()
            .find_map(|f| v.get(*f).and_then(|p| p.as_str()).filter(|p| !p.is_empty()))
            .ok_or_else(|| format!("{path} has no {}", fields.join(" or ")))?;
        price
            .parse::<Decimal>()
            .map_err(|_| format!("{path} price {price:?} is not a decimal"))
    }
}

//! Product prices for the guard: `GET /api/v3/brokerage/market/products/{id}` (public, so
//! unsigned) through cbgate's own upstream client, to value market orders given in base size.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::forward::upstream::{OwnCall, UpstreamClient};
use crate::gate::guard::PriceSource;
use crate::gate::route::Router;

/// The public product endpoint's path prefix.
pub const PRODUCT_PATH: &str = "/api/v3/brokerage/market/products/";

/// The whole price fetch, answer included, at most; an order waits on it.
pub const PRICE_TIMEOUT: Duration = Duration::from_secs(5);

/// Prices from Coinbase through the route that serves [`PRODUCT_PATH`].
pub struct ProductPrices<'a> {
    pub client: &'a UpstreamClient,
    pub router: &'a Router,
}

impl PriceSource for ProductPrices<'_> {
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
        // The guard has checked the id is [A-Za-z0-9-]: safe in a path as it is.
        let path = format!("{PRODUCT_PATH}{product}");
        let route = self
            .router
            .find(&path)
            .ok_or_else(|| format!("no route for {path}"))?;
        let upstream = &route.upstream;
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
        let price = v
            .get("price")
            .and_then(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("{path} has no price"))?;
        price
            .parse::<Decimal>()
            .map_err(|_| format!("{path} price {price:?} is not a decimal"))
    }
}

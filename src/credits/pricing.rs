//! What a request costs: the hold before the call, the charge after it.

use std::{collections::HashMap, fmt, sync::Arc};

use crate::{inspect::LlmRequest, usage::Usage};

/// The default `max_tokens` assumed for the hold when a request names none: 4096.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The most tokens one call is believed to have used when its price sets no
/// [`usage_ceiling`](Price::usage_ceiling): 2,000,000 (above the largest context windows).
pub const DEFAULT_USAGE_CEILING: u64 = 2_000_000;

/// The price of one call: a flat part and per-token rates, in credits.
///
/// The cost of a call with `p` prompt tokens and `c` completion tokens is
///
/// ```text
/// per_request + ceil((p × per_1k_prompt + c × per_1k_completion) / 1000)
/// ```
///
/// in integer arithmetic: the token part is rounded **up** once, on the sum, so a call is never
/// charged less than its tokens are worth and never more than one credit above. Tokens in
/// `total_tokens` beyond `prompt_tokens + completion_tokens` are priced at the completion rate.
///
/// # Example
///
/// ```
/// use tollgate::{credits::Price, usage::Usage};
///
/// let price = Price::flat(1).per_1k_tokens(2);
/// let usage = Usage { prompt_tokens: 300, completion_tokens: 201, total_tokens: 501 };
/// // 1 + ceil(501 × 2 / 1000) = 1 + ceil(1.002) = 3
/// assert_eq!(price.cost(&usage), 3);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Price {
    /// Credits per call.
    pub per_request: u64,
    /// Credits per 1000 prompt tokens.
    pub per_1k_prompt: u64,
    /// Credits per 1000 completion tokens.
    pub per_1k_completion: u64,
    /// The most tokens (prompt and completion) one call can use (`None`:
    /// [`DEFAULT_USAGE_CEILING`]). See [`Price::usage_ceiling`].
    pub usage_ceiling: Option<u64>,
}

impl Price {
    /// Nothing.
    pub const FREE: Price = Price::flat(0);

    /// `credits` per call, no token rate.
    pub const fn flat(credits: u64) -> Self {
        Price {
            per_request: credits,
            per_1k_prompt: 0,
            per_1k_completion: 0,
            usage_ceiling: None,
        }
    }

    /// The most tokens one call of this model can use, prompt and completion together (its
    /// context window). A reported usage above what the request could have produced is clamped
    /// before it is charged: completion tokens to the request's `max_tokens` (or
    /// `max_completion_tokens`) when it names one, everything to this ceiling, and the anomaly is
    /// logged (`usage above what the request could produce`). One absurd report from an
    /// upstream cannot take a whole balance.
    ///
    /// ```
    /// use tollgate::{credits::Price, usage::Usage};
    ///
    /// let price = Price::flat(0).per_1k_tokens(1000).usage_ceiling(128_000);
    /// let absurd = Usage { prompt_tokens: 10, completion_tokens: u64::MAX, total_tokens: u64::MAX };
    /// let (usage, clamped) = price.clamp_usage(absurd, Some(100));
    /// assert!(clamped);
    /// assert_eq!(usage, Usage { prompt_tokens: 10, completion_tokens: 100, total_tokens: 110 });
    /// assert_eq!(price.cost(&usage), 110);
    /// ```
    pub const fn usage_ceiling(mut self, tokens: u64) -> Self {
        self.usage_ceiling = Some(tokens);
        self
    }

    /// `usage` bounded by what a request asking for `max_tokens` could have produced (see
    /// [`usage_ceiling`](Self::usage_ceiling)), and whether it had to be.
    pub fn clamp_usage(&self, usage: Usage, max_tokens: Option<u64>) -> (Usage, bool) {
        let ceiling = self.usage_ceiling.unwrap_or(DEFAULT_USAGE_CEILING);
        let completion = usage
            .completion_tokens
            .min(max_tokens.unwrap_or(u64::MAX))
            .min(ceiling);
        let prompt = usage.prompt_tokens.min(ceiling - completion);
        let counted = prompt + completion;
        // Tokens beyond prompt + completion (priced at the completion rate) are completion
        // tokens too: bounded by the same `max_tokens`.
        let extra_bound = max_tokens.map_or(ceiling, |m| m.saturating_sub(completion));
        let total = usage
            .total_tokens
            .min(counted.saturating_add(extra_bound))
            .min(ceiling)
            .max(counted);
        let clamped = Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
        };
        (clamped, clamped != usage)
    }

    /// One rate for prompt and completion tokens, credits per 1000 tokens.
    pub const fn per_1k_tokens(mut self, credits: u64) -> Self {
        self.per_1k_prompt = credits;
        self.per_1k_completion = credits;
        self
    }

    /// The prompt-token rate, credits per 1000 tokens.
    pub const fn per_1k_prompt_tokens(mut self, credits: u64) -> Self {
        self.per_1k_prompt = credits;
        self
    }

    /// The completion-token rate, credits per 1000 tokens.
    pub const fn per_1k_completion_tokens(mut self, credits: u64) -> Self {
        self.per_1k_completion = credits;
        self
    }

    /// Whether the price depends on tokens.
    pub const fn is_metered(&self) -> bool {
        self.per_1k_prompt > 0 || self.per_1k_completion > 0
    }

    /// The cost of a call that used `prompt` and `completion` tokens (see the type's docs).
    pub fn tokens_cost(&self, prompt: u64, completion: u64) -> u64 {
        let milli = u128::from(prompt) * u128::from(self.per_1k_prompt)
            + u128::from(completion) * u128::from(self.per_1k_completion);
        let tokens = u64::try_from(milli.div_ceil(1000)).unwrap_or(u64::MAX);
        self.per_request.saturating_add(tokens)
    }

    /// The cost of a call with this usage.
    pub fn cost(&self, usage: &Usage) -> u64 {
        let counted = usage.prompt_tokens.saturating_add(usage.completion_tokens);
        let extra = usage.total_tokens.saturating_sub(counted);
        self.tokens_cost(
            usage.prompt_tokens,
            usage.completion_tokens.saturating_add(extra),
        )
    }
}

/// How [`Credits`](super::Credits) prices a request: which [`Price`] applies, how much to hold
/// before the call, what to charge after it.
///
/// - **Which price**: the request's `model` (from the JSON body) if it has one; else the route
///   (the exact request path); else the default price (free unless set).
/// - **The hold** (before the call): `price.tokens_cost(estimated prompt tokens, max_tokens)`,
///   where the prompt estimate is one token per four characters of prompt text (rounded up) and
///   `max_tokens` (or `max_completion_tokens`) defaults to [`default_max_tokens`]; capped at
///   [`max_hold`]. A flat price holds exactly the flat price.
/// - **The charge** (after the call): `price.cost(usage)` from the response's `usage` object; a
///   response without one is charged the hold.
///
/// [`default_max_tokens`]: Pricing::default_max_tokens
/// [`max_hold`]: Pricing::max_hold
///
/// # Example
///
/// ```
/// use tollgate::credits::{Price, Pricing};
///
/// let pricing = Pricing::new()
///     .default_price(Price::flat(1))
///     .route("/v1/images/generations", Price::flat(40))
///     .model("gpt-4o", Price::flat(1).per_1k_prompt_tokens(3).per_1k_completion_tokens(10))
///     .max_hold(500);
///
/// assert_eq!(pricing.price_for("/v1/images/generations", None), Price::flat(40));
/// let gpt = pricing.price_for("/v1/chat/completions", Some("gpt-4o"));
/// assert_eq!(gpt.per_1k_completion, 10);
/// assert_eq!(pricing.price_for("/v1/chat/completions", Some("other")), Price::flat(1));
/// ```
#[derive(Clone, Default)]
pub struct Pricing {
    default: Price,
    models: HashMap<Arc<str>, Price>,
    routes: HashMap<Arc<str>, Price>,
    max_hold: Option<u64>,
    default_max_tokens: Option<u64>,
}

impl Pricing {
    /// Everything free until priced.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every request costs `credits`.
    pub fn flat(credits: u64) -> Self {
        Self::new().default_price(Price::flat(credits))
    }

    /// The price of requests that match no model and no route.
    #[must_use]
    pub fn default_price(mut self, price: Price) -> Self {
        self.default = price;
        self
    }

    /// The price of requests whose JSON body names `model`.
    #[must_use]
    pub fn model(mut self, model: impl Into<Arc<str>>, price: Price) -> Self {
        self.models.insert(model.into(), price);
        self
    }

    /// The price of requests to exactly this path (when their model has no price).
    #[must_use]
    pub fn route(mut self, path: impl Into<Arc<str>>, price: Price) -> Self {
        self.routes.insert(path.into(), price);
        self
    }

    /// The most a hold may be, whatever the estimate (default: no cap).
    #[must_use]
    pub fn max_hold(mut self, credits: u64) -> Self {
        self.max_hold = Some(credits);
        self
    }

    /// The completion tokens assumed for the hold when a request names no `max_tokens`
    /// (default [`DEFAULT_MAX_TOKENS`]).
    #[must_use]
    pub fn default_max_tokens(mut self, tokens: u64) -> Self {
        self.default_max_tokens = Some(tokens);
        self
    }

    /// Prices from configuration (`[[models]]` entries).
    #[must_use]
    pub fn models<'a>(mut self, models: impl IntoIterator<Item = &'a ModelPricing>) -> Self {
        for m in models {
            self = self.model(m.id.as_str(), m.price());
        }
        self
    }

    /// The price that applies to a request for `path` naming `model`.
    pub fn price_for(&self, path: &str, model: Option<&str>) -> Price {
        model
            .and_then(|m| self.models.get(m))
            .or_else(|| self.routes.get(path))
            .copied()
            .unwrap_or(self.default)
    }

    /// Whether requests to exactly this path have a route price (so their price does not
    /// depend on their body).
    pub(crate) fn prices_route(&self, path: &str) -> bool {
        self.routes.contains_key(path)
    }

    /// The hold for a request priced `price` that asks for `llm` (`None`: not a JSON request).
    pub fn hold_for(&self, price: &Price, llm: Option<&LlmRequest>) -> u64 {
        let hold = if price.is_metered() {
            let prompt = llm.map_or(0, LlmRequest::estimated_prompt_tokens);
            let completion = llm
                .and_then(|l| l.max_tokens)
                .unwrap_or(self.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS))
                // `n` / `best_of` completions, each up to max_tokens.
                .saturating_mul(llm.map_or(1, |l| l.choices.max(1)));
            price.tokens_cost(prompt, completion)
        } else {
            price.per_request
        };
        self.max_hold
            .map_or(hold, |max| hold.min(max))
            .min(super::ledger::MAX_CREDITS)
    }

    /// Whether pricing a request can depend on its body (a model price or a token rate).
    pub(crate) fn reads_body(&self) -> bool {
        !self.models.is_empty()
            || self.default.is_metered()
            || self.routes.values().any(Price::is_metered)
    }
}

impl fmt::Debug for Pricing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pricing")
            .field("default", &self.default)
            .field("models", &self.models)
            .field("routes", &self.routes)
            .field("max_hold", &self.max_hold)
            .field("default_max_tokens", &self.default_max_tokens)
            .finish()
    }
}

/// One `[[models]]` entry of a configuration file.
///
/// ```toml
/// [[models]]
/// id = "gpt-4o"
/// credits_per_request = 1
/// credits_per_1k_tokens = 5
/// ```
///
/// `credits_per_1k_tokens` prices prompt and completion tokens alike;
/// `credits_per_1k_prompt_tokens` / `credits_per_1k_completion_tokens`, when given, override it
/// for one side.
///
/// # Example
///
/// ```
/// use tollgate::credits::{ModelPricing, Price, Pricing};
///
/// let models = [ModelPricing::new("gpt-4o", 1, 5)];
/// let pricing = Pricing::new().models(&models);
/// assert_eq!(pricing.price_for("/", Some("gpt-4o")), Price::flat(1).per_1k_tokens(5));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModelPricing {
    /// The model id, as requests name it.
    pub id: String,
    /// Credits per call.
    pub credits_per_request: u64,
    /// Credits per 1000 tokens, prompt and completion.
    pub credits_per_1k_tokens: u64,
    /// Credits per 1000 prompt tokens, overriding `credits_per_1k_tokens`.
    pub credits_per_1k_prompt_tokens: Option<u64>,
    /// Credits per 1000 completion tokens, overriding `credits_per_1k_tokens`.
    pub credits_per_1k_completion_tokens: Option<u64>,
    /// The most tokens one call can use, prompt and completion together (see
    /// [`Price::usage_ceiling`]); `None`: [`DEFAULT_USAGE_CEILING`].
    pub usage_ceiling: Option<u64>,
}

impl ModelPricing {
    /// An entry with a flat price and one token rate.
    pub fn new(
        id: impl Into<String>,
        credits_per_request: u64,
        credits_per_1k_tokens: u64,
    ) -> Self {
        ModelPricing {
            id: id.into(),
            credits_per_request,
            credits_per_1k_tokens,
            credits_per_1k_prompt_tokens: None,
            credits_per_1k_completion_tokens: None,
            usage_ceiling: None,
        }
    }

    /// The entry's price.
    pub fn price(&self) -> Price {
        let price = Price::flat(self.credits_per_request);
        let price = match self.usage_ceiling {
            Some(tokens) => price.usage_ceiling(tokens),
            None => price,
        };
        price
            .per_1k_prompt_tokens(
                self.credits_per_1k_prompt_tokens
                    .unwrap_or(self.credits_per_1k_tokens),
            )
            .per_1k_completion_tokens(
                self.credits_per_1k_completion_tokens
                    .unwrap_or(self.credits_per_1k_tokens),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_cost_rounds_up_once() {
        let price = Price::FREE
            .per_1k_prompt_tokens(1)
            .per_1k_completion_tokens(1);
        assert_eq!(price.tokens_cost(0, 0), 0);
        assert_eq!(price.tokens_cost(1, 0), 1);
        assert_eq!(price.tokens_cost(500, 500), 1);
        assert_eq!(price.tokens_cost(500, 501), 2);
        assert_eq!(
            Price::flat(u64::MAX).tokens_cost(u64::MAX, u64::MAX),
            u64::MAX
        );
    }

    #[test]
    fn hold_is_estimate_capped() {
        let price = Price::flat(2).per_1k_tokens(10);
        let pricing = Pricing::new().max_hold(30);
        let llm = LlmRequest::from_json(br#"{"max_tokens":1000,"prompt":"abcdefgh"}"#).unwrap();
        // 2 + ceil((2 + 1000) × 10 / 1000) = 2 + 11 = 13
        assert_eq!(pricing.hold_for(&price, Some(&llm)), 13);
        // no max_tokens: 4096 assumed, capped
        assert_eq!(pricing.hold_for(&price, None), 30);
        assert_eq!(pricing.hold_for(&Price::flat(7), None), 7);
    }
}

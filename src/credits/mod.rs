//! Credit gating: prepaid balances charged on real usage.

//! Client-IP resolution behind trusted proxies, and CIDR allow and deny lists.

mod set;

use std::net::IpAddr;

pub use set::{parse_network, InvalidCidr, IpSet};

/// The client's IP address as resolved by the IP layer, in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

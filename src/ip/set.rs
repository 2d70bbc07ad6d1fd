use std::{fmt, net::IpAddr, str::FromStr, sync::Arc};

use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;

/// A set of CIDR networks (v4 and v6), matched in time that does not grow with its size.
///
/// Backed by a prefix trie (`ip_network_table`). Bare addresses are single-host networks;
/// host bits after the prefix are ignored (`10.1.2.3/8` is `10.0.0.0/8`). IPv4-mapped IPv6
/// addresses match the IPv4 networks.
///
/// # Example
///
/// ```
/// use tollgate::ip::IpSet;
///
/// let set: IpSet = "10.0.0.0/8, 2001:db8::/32, 192.0.2.7".parse().unwrap();
/// assert!(set.contains("10.20.30.40".parse().unwrap()));
/// assert!(set.contains("::ffff:10.0.0.1".parse().unwrap()));
/// assert!(set.contains("2001:db8::1".parse().unwrap()));
/// assert!(!set.contains("192.0.2.8".parse().unwrap()));
/// ```
#[derive(Clone, Default)]
pub struct IpSet {
    table: Arc<IpNetworkTable<()>>,
    len: usize,
}

impl IpSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse CIDRs (or bare addresses) into a set.
    pub fn parse<I, S>(cidrs: I) -> Result<Self, InvalidCidr>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut table = IpNetworkTable::new();
        let mut len = 0;
        for cidr in cidrs {
            let network = parse_network(cidr.as_ref())?;
            if table.insert(network, ()).is_none() {
                len += 1;
            }
        }
        Ok(IpSet {
            table: Arc::new(table),
            len,
        })
    }

    /// Whether `ip` falls in one of the networks.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.len != 0 && self.table.longest_match(ip.to_canonical()).is_some()
    }

    /// The number of networks.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set has no network.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl FromStr for IpSet {
    type Err = InvalidCidr;

    /// Comma- or whitespace-separated CIDRs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IpSet::parse(
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|p| !p.is_empty()),
        )
    }
}

impl IpSet {
    /// The networks, IPv4 first.
    pub fn networks(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.table.iter().map(|(network, _)| network)
    }
}

impl fmt::Debug for IpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for network in self.networks() {
            list.entry(&format_args!("{network}"));
        }
        list.finish()
    }
}

/// The networks, comma-separated: what [`FromStr`] parses back.
///
/// ```
/// use tollgate::ip::IpSet;
///
/// let set: IpSet = "10.0.0.0/8, 2001:db8::/32".parse().unwrap();
/// assert_eq!(set.to_string(), "10.0.0.0/8, 2001:db8::/32");
/// assert_eq!(set.to_string().parse::<IpSet>().unwrap().len(), 2);
/// ```
impl fmt::Display for IpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, network) in self.networks().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{network}")?;
        }
        Ok(())
    }
}

/// A string that is not a CIDR or an IP address.
///
/// ```
/// use tollgate::ip::IpSet;
///
/// let error = "10.0.0.0/33".parse::<IpSet>().unwrap_err();
/// assert_eq!(error.to_string(), "`10.0.0.0/33` is not a CIDR network or an IP address");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidCidr(pub String);

impl fmt::Display for InvalidCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a CIDR network or an IP address", self.0)
    }
}

impl std::error::Error for InvalidCidr {}

/// Parse one CIDR or bare address.
///
/// ```
/// use tollgate::ip::parse_network;
///
/// assert_eq!(parse_network("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
/// assert_eq!(parse_network("::ffff:192.0.2.0/120").unwrap().to_string(), "192.0.2.0/24");
/// assert_eq!(parse_network("2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
/// ```
pub fn parse_network(s: &str) -> Result<IpNetwork, InvalidCidr> {
    let s = s.trim();
    let invalid = || InvalidCidr(s.chars().take(64).collect());
    match s.split_once('/') {
        None => {
            let ip: IpAddr = s.parse().map_err(|_| invalid())?;
            let ip = ip.to_canonical();
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            IpNetwork::new_truncate(ip, bits).map_err(|_| invalid())
        }
        Some((addr, bits)) => {
            let ip: IpAddr = addr.parse().map_err(|_| invalid())?;
            let bits: u8 = bits.parse().map_err(|_| invalid())?;
            // An IPv4-mapped IPv6 network is the IPv4 network it maps.
            let (ip, bits) = match ip {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && bits >= 96 => {
                    (IpAddr::V4(v6.to_ipv4_mapped().expect("checked")), bits - 96)
                }
                other => (other, bits),
            };
            IpNetwork::new_truncate(ip, bits).map_err(|_| invalid())
        }
    }
}

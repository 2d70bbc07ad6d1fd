//! Property tests: random interleavings of ledger operations keep the books exact and never
//! negative; random header bytes never panic the key and client-IP parsers, and valid inputs
//! round-trip; the fuzz targets in `fuzz/targets.rs` run over their seeds and generated inputs.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tollgate::{
    auth::{AccountRecord, AuthLayer, KeyRecord, MemoryKeyStore},
    credits::{
        ledger::{
            Balance, Clock, EntryKind, Fingerprint, Hold, JournalQuery, Reservation, ReserveError,
            ReserveRequest, TopUpError,
        },
        Ledger, LedgerAdmin, ManualClock, MemoryLedger,
    },
    inspect::LlmRequest,
    ip::{ClientIpResolver, ForwardedHeader, IpSet},
    keys,
    usage::{Usage, UsageScanner},
    Caller,
};
use tower::{Layer, Service, ServiceExt};

#[path = "../fuzz/targets.rs"]
mod targets;

// ---------------------------------------------------------------------------------------------
// The ledger
// ---------------------------------------------------------------------------------------------

const ACCOUNTS: [&str; 3] = ["acct_a", "acct_b", "acct_c"];
const HOLD_TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
enum Op {
    TopUp {
        account: usize,
        amount: u64,
        key: u8,
    },
    Reserve {
        account: usize,
        amount: u64,
        /// An idempotency key and a fingerprint, both from small pools so that they collide.
        idempotency: Option<(u8, u8)>,
    },
    Settle {
        hold: usize,
        actual: u64,
    },
    Release {
        hold: usize,
    },
    Advance {
        secs: u64,
    },
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    let account = 0..ACCOUNTS.len();
    prop_oneof![
        2 => (account.clone(), 0..200u64, 0..6u8)
            .prop_map(|(account, amount, key)| Op::TopUp { account, amount, key }),
        4 => (account, 0..120u64, proptest::option::of((0..4u8, 0..2u8)))
            .prop_map(|(account, amount, idempotency)| Op::Reserve { account, amount, idempotency }),
        3 => (any::<usize>(), prop_oneof![0..150u64, Just(u64::MAX)])
            .prop_map(|(hold, actual)| Op::Settle { hold, actual }),
        2 => any::<usize>().prop_map(|hold| Op::Release { hold }),
        1 => (0..40u64).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Expire),
    ]
}

struct OpenHold {
    account: usize,
    amount: u64,
    expires_at: SystemTime,
}

/// What the books must say, from the journal alone, and that it agrees with the balance. With a
/// journal limit the books are checked from the first entry kept (its balance and holds after).
fn check_books(ledger: &MemoryLedger, account: &str, journal_limit: Option<usize>) -> Balance {
    let balance = ledger.balance(account).into_inner().unwrap();
    let journal = ledger
        .journal(account, JournalQuery::new())
        .into_inner()
        .unwrap();
    if let Some(limit) = journal_limit {
        assert!(
            journal.len() <= limit,
            "{} entries kept, limit {limit}",
            journal.len()
        );
    }
    let mut entries = journal.iter();
    let (mut balance_now, mut held_now) = (0i128, 0i128);
    if let Some(first) = journal.first() {
        if first.seq > 1 {
            assert!(journal_limit.is_some(), "entries dropped without a limit");
            balance_now = i128::from(first.balance_after);
            held_now = i128::from(first.held_after);
            entries.next();
        }
    }
    for (i, entry) in journal.iter().enumerate() {
        assert_eq!(
            entry.seq,
            journal[0].seq + i as u64,
            "journal sequence without gaps"
        );
        assert!(
            entry.held_after <= entry.balance_after,
            "held beyond the balance after {entry:?}"
        );
    }
    for entry in entries {
        let (amount, hold) = (i128::from(entry.amount), i128::from(entry.hold));
        match entry.kind {
            EntryKind::TopUp => balance_now += amount,
            EntryKind::Reserve => held_now += hold,
            EntryKind::Settle | EntryKind::Expire => {
                balance_now -= amount;
                held_now -= hold;
                assert!(entry.kind != EntryKind::Expire || entry.amount == entry.hold);
            }
            EntryKind::Release => {
                assert_eq!(entry.amount, 0, "a release charges nothing");
                held_now -= hold;
            }
            _ => unreachable!("unknown entry kind"),
        }
        assert!(balance_now >= 0, "charged beyond top-ups");
        assert_eq!(i128::from(entry.balance_after), balance_now);
        assert_eq!(i128::from(entry.held_after), held_now);
    }
    if !journal.is_empty() {
        assert_eq!(i128::from(balance.balance), balance_now);
        assert_eq!(i128::from(balance.held), held_now);
    }
    assert!(
        balance.held <= balance.balance,
        "never negative: {balance:?}"
    );
    assert_eq!(balance.available, balance.balance - balance.held);
    balance
}

fn run_ledger_ops(ops: &[Op], journal_limit: Option<usize>) {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let clock = ManualClock::new(start);
    let mut builder = MemoryLedger::builder()
        .clock(clock.clone())
        .hold_ttl(HOLD_TTL)
        .idempotency_window(Duration::from_secs(86_400))
        .shards(2);
    if let Some(limit) = journal_limit {
        builder = builder.journal_limit(limit);
    }
    let ledger = builder.build();
    let mut holds: Vec<Hold> = Vec::new();
    let mut open: HashMap<u64, OpenHold> = HashMap::new();
    let mut top_ups: HashMap<(usize, u8), u64> = HashMap::new();
    let mut balances = [Balance::default(); ACCOUNTS.len()];

    for op in ops {
        match *op {
            Op::TopUp {
                account,
                amount,
                key,
            } => {
                let before = balances[account];
                let result = ledger
                    .top_up(ACCOUNTS[account], amount, &format!("topup-{key}"))
                    .into_inner();
                match (top_ups.get(&(account, key)), result) {
                    (None, Ok(t)) => {
                        assert!(t.applied);
                        assert_eq!(t.balance.balance, before.balance + amount);
                        top_ups.insert((account, key), amount);
                    }
                    (Some(&previous), Ok(t)) => {
                        assert_eq!(previous, amount, "a reused key with another amount");
                        assert!(!t.applied, "a top-up key is applied once");
                        assert_eq!(t.balance.balance, before.balance);
                    }
                    (Some(&previous), Err(TopUpError::KeyReused { amount: was })) => {
                        assert_ne!(previous, amount);
                        assert_eq!(was, previous);
                    }
                    (expected, other) => panic!("top-up: {expected:?} → {other:?}"),
                }
            }
            Op::Reserve {
                account,
                amount,
                idempotency,
            } => {
                let before = balances[account];
                let mut request = ReserveRequest::new(ACCOUNTS[account], amount);
                if let Some((key, fp)) = idempotency {
                    request = request.idempotency(Some((
                        format!("idem-{key}").into(),
                        Fingerprint::of(&[&[fp]]),
                    )));
                }
                match ledger.reserve(request).into_inner() {
                    Ok(Reservation::Held(hold)) => {
                        assert!(amount <= before.available, "held beyond what is available");
                        assert_eq!(hold.amount(), amount);
                        assert_eq!(hold.available_after(), before.available - amount);
                        open.insert(
                            hold.id(),
                            OpenHold {
                                account,
                                amount,
                                expires_at: clock.now() + HOLD_TTL,
                            },
                        );
                        holds.push(hold);
                    }
                    Ok(Reservation::Replayed) => assert!(idempotency.is_some()),
                    Err(ReserveError::Insufficient {
                        required,
                        available,
                    }) => {
                        assert_eq!(required, amount);
                        assert_eq!(available, before.available);
                        assert!(amount > available);
                    }
                    Err(ReserveError::KeyInUse | ReserveError::KeyReused) => {
                        assert!(idempotency.is_some())
                    }
                    Err(other) => panic!("reserve: {other:?}"),
                }
            }
            Op::Settle { hold, .. } | Op::Release { hold } if !holds.is_empty() => {
                let actual = match *op {
                    Op::Settle { actual, .. } => Some(actual),
                    _ => None,
                };
                let hold = &holds[hold % holds.len()];
                let account = ACCOUNTS.iter().position(|a| *a == hold.account()).unwrap();
                let before = balances[account];
                let settlement = match actual {
                    Some(actual) => ledger.settle(hold, actual).into_inner().unwrap(),
                    None => ledger.release(hold).into_inner().unwrap(),
                };
                match open.remove(&hold.id()) {
                    Some(o) => {
                        assert!(settlement.was_open);
                        let expected = actual.map_or(0, |a| a.min(before.available + o.amount));
                        assert_eq!(settlement.charged, expected);
                        assert_eq!(settlement.balance, before.balance - expected);
                    }
                    None => {
                        assert!(!settlement.was_open, "a hold is closed once");
                        assert_eq!(settlement.charged, 0);
                    }
                }
            }
            Op::Settle { .. } | Op::Release { .. } => {}
            Op::Advance { secs } => clock.advance(Duration::from_secs(secs)),
            Op::Expire => {
                let now = clock.now();
                let due: Vec<u64> = open
                    .iter()
                    .filter(|(_, h)| h.expires_at <= now)
                    .map(|(id, _)| *id)
                    .collect();
                let expected_charge: u64 = due.iter().map(|id| open[id].amount).sum();
                let expired = ledger.expire_holds(now).into_inner().unwrap();
                assert_eq!(expired.holds, due.len() as u64);
                assert_eq!(expired.charged, expected_charge);
                for id in due {
                    open.remove(&id);
                }
            }
        }
        for (i, account) in ACCOUNTS.iter().enumerate() {
            balances[i] = check_books(&ledger, account, journal_limit);
            let open_here = open.values().filter(|h| h.account == i);
            assert_eq!(balances[i].holds, open_here.clone().count() as u64);
            assert_eq!(balances[i].held, open_here.map(|h| h.amount).sum::<u64>());
        }
    }

    // A charge is never applied twice for one idempotency key (within its window).
    for account in ACCOUNTS {
        let journal = ledger
            .journal(account, JournalQuery::new())
            .into_inner()
            .unwrap();
        let mut charged_keys = HashSet::new();
        for entry in &journal {
            if matches!(entry.kind, EntryKind::Settle | EntryKind::Expire) {
                if let Some(key) = &entry.idempotency_key {
                    assert!(
                        charged_keys.insert(key.clone()),
                        "idempotency key {key} charged twice"
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ledger_books_stay_exact_and_never_negative(ops in proptest::collection::vec(op(), 1..80)) {
        run_ledger_ops(&ops, None);
    }

    /// The same with a bounded journal: balances unaffected, the entries kept still add up.
    #[test]
    fn ledger_books_stay_exact_with_a_journal_limit(ops in proptest::collection::vec(op(), 1..80), limit in 1..6usize) {
        run_ledger_ops(&ops, Some(limit));
    }
}

/// Threads racing on the same accounts: the books still add up, nothing goes negative.
#[test]
fn ledger_concurrent_interleavings_keep_the_books() {
    let ledger = MemoryLedger::builder().shards(1).build();
    for account in ACCOUNTS {
        ledger.top_up(account, 1_000, "seed").into_inner().unwrap();
    }
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                // A small deterministic generator: the same interleaving pressure every run.
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut holds = Vec::new();
                for i in 0..3_000u64 {
                    let account = ACCOUNTS[(next() % 3) as usize];
                    match next() % 5 {
                        0 | 1 => {
                            if let Ok(Reservation::Held(h)) = ledger
                                .reserve(ReserveRequest::new(account, next() % 50))
                                .into_inner()
                            {
                                holds.push(h);
                            }
                        }
                        2 if !holds.is_empty() => {
                            let h: Hold = holds.swap_remove((next() as usize) % holds.len());
                            ledger.settle(&h, next() % 100).into_inner().unwrap();
                        }
                        3 if !holds.is_empty() => {
                            let h: Hold = holds.swap_remove((next() as usize) % holds.len());
                            ledger.release(&h).into_inner().unwrap();
                        }
                        _ => {
                            let key = format!("t{t}-{i}");
                            ledger
                                .top_up(account, next() % 20, &key)
                                .into_inner()
                                .unwrap();
                        }
                    }
                }
                for h in holds {
                    ledger.settle(&h, u64::MAX).into_inner().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for account in ACCOUNTS {
        let balance = check_books(&ledger, account, None);
        assert_eq!(balance.holds, 0);
        assert_eq!(balance.held, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// One request through an `AuthLayer` (x-api-key and `?api_key=` enabled) in front of a service
/// that answers with the caller's key id: status, every response header value, body.
async fn through_auth(
    store: MemoryKeyStore,
    request: Request<Full<Bytes>>,
) -> (StatusCode, Vec<Vec<u8>>, String) {
    let inner = tower::service_fn(|request: Request<_>| async move {
        let id = request
            .extensions()
            .get::<Caller>()
            .map_or_else(String::new, |c| c.key_id().to_owned());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(id))))
    });
    let mut service = AuthLayer::new(store)
        .allow_x_api_key()
        .allow_query_param("api_key")
        .no_shield()
        .layer(inner);
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    let status = response.status();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| [name.as_str().as_bytes(), b": ", value.as_bytes()].concat())
        .collect();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn store_with(key: &str) -> MemoryKeyStore {
    MemoryKeyStore::new()
        .with_account(AccountRecord::new("acct_1", "free"))
        .with_key(keys::digest(key), KeyRecord::new("key_1", "acct_1"))
}

/// The ways a key can be presented wrongly; each one is a 401 that never echoes the key.
#[derive(Clone, Copy, Debug)]
enum Malformed {
    Duplicated,
    WrongScheme,
    NoScheme,
    DoubleSpace,
    Trailing,
    InnerTab,
    Disagreeing,
    QueryAndHeaderDisagree,
    Unknown,
    LowercaseSchemeUnknown,
}

fn malformed() -> impl Strategy<Value = Malformed> {
    use Malformed::*;
    prop_oneof![
        Just(Duplicated),
        Just(WrongScheme),
        Just(NoScheme),
        Just(DoubleSpace),
        Just(Trailing),
        Just(InnerTab),
        Just(Disagreeing),
        Just(QueryAndHeaderDisagree),
        Just(Unknown),
        Just(LowercaseSchemeUnknown),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any generated key, with any prefix, authenticates in every valid form.
    #[test]
    fn valid_keys_round_trip(prefix in "[a-z]{0,4}(-[a-z]{1,5}-)?", form in 0..4u8, scheme in "[bB][eE][aA][rR][eE][rR]") {
        let key = keys::generate(&prefix);
        prop_assert_eq!(keys::digest(key.as_str()), key.digest());
        prop_assert_eq!(key.digest().to_hex().parse::<keys::KeyDigest>().ok(), Some(key.digest()));
        let request = match form {
            0 => Request::post("/v1/x").header("authorization", format!("{scheme} {}", key.as_str())),
            1 => Request::post("/v1/x").header("x-api-key", key.as_str()),
            2 => Request::post(format!("/v1/x?api_key={}", key.as_str())),
            _ => Request::post(format!("/v1/x?a=1&api_key={}", key.as_str()))
                .header("authorization", format!("Bearer {}", key.as_str()))
                .header("x-api-key", key.as_str()),
        };
        let request = request.body(Full::new(Bytes::new())).unwrap();
        let (status, _, body) = runtime().block_on(through_auth(store_with(key.as_str()), request));
        prop_assert_eq!(status, StatusCode::OK);
        prop_assert_eq!(body, "key_1");
    }

    /// Every malformed presentation is a 401 with a key-refusal code, and the key's text is in
    /// no header and not in the body.
    #[test]
    fn malformed_keys_are_401_and_never_echoed(token in "sk-[A-Za-z0-9]{20,40}", how in malformed()) {
        use Malformed::*;
        let other = format!("{token}X");
        let builder = Request::post("/v1/x");
        let builder = match how {
            Duplicated => builder
                .header("authorization", format!("Bearer {token}"))
                .header("authorization", format!("Bearer {token}")),
            WrongScheme => builder.header("authorization", format!("Basic {token}")),
            NoScheme => builder.header("authorization", token.clone()),
            DoubleSpace => builder.header("authorization", format!("Bearer  {token}")),
            Trailing => builder.header("authorization", format!("Bearer {token} ")),
            InnerTab => builder.header("authorization", format!("Bearer {}\t{}", &token[..10], &token[10..])),
            Disagreeing => builder
                .header("authorization", format!("Bearer {token}"))
                .header("x-api-key", other.clone()),
            QueryAndHeaderDisagree => Request::post(format!("/v1/x?api_key={other}"))
                .header("authorization", format!("Bearer {token}")),
            Unknown => builder.header("authorization", format!("Bearer {token}")),
            LowercaseSchemeUnknown => builder.header("authorization", format!("bearer {token}")),
        };
        let request = builder.body(Full::new(Bytes::new())).unwrap();
        // The store knows a different key: even a well-formed token is unknown.
        let (status, headers, body) = runtime().block_on(through_auth(store_with("sk-the-real-one"), request));
        prop_assert_eq!(status, StatusCode::UNAUTHORIZED);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let code = json["error"]["code"].as_str().unwrap().to_owned();
        prop_assert!(["malformed_api_key", "api_key_whitespace", "invalid_api_key"].contains(&code.as_str()), "{}", code);
        let secret = &token[3..];
        prop_assert!(!body.contains(secret), "the key is echoed in the body: {}", body);
        for header in headers {
            prop_assert!(!String::from_utf8_lossy(&header).contains(secret));
        }
    }

    /// Arbitrary bytes in every key source: the fuzz target's assertions, on stable.
    #[test]
    fn arbitrary_key_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        targets::auth_header(&data);
    }

    /// Mostly printable bytes with the known key spliced in, to reach the accepting paths.
    #[test]
    fn key_bytes_near_the_known_key(layout in any::<u8>(), noise in "[ -~\t]{0,12}", at in 0..3usize) {
        let mut values = [format!("Bearer {}", targets::KNOWN_KEY), targets::KNOWN_KEY.to_owned(), targets::KNOWN_KEY.to_owned()];
        let middle = values[at].len() / 2;
        values[at].insert_str(middle, &noise);
        let data = [&[layout][..], values.join("\n").as_bytes()].concat();
        targets::auth_header(&data);
    }
}

// ---------------------------------------------------------------------------------------------
// Client IPs
// ---------------------------------------------------------------------------------------------

fn hop() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        // Trusted (10/8, 2001:db8::/32) and untrusted, v4 and v6, and v4-mapped v6.
        any::<[u8; 3]>().prop_map(|[a, b, c]| IpAddr::V4(Ipv4Addr::new(10, a, b, c))),
        any::<[u8; 4]>()
            .prop_filter("not trusted", |o| o[0] != 10 && o[0] != 127)
            .prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u16; 6]>().prop_map(|s| IpAddr::V6(Ipv6Addr::new(
            0x2001, 0xdb8, s[0], s[1], s[2], s[3], s[4], s[5]
        ))),
        any::<[u16; 7]>().prop_map(|s| IpAddr::V6(Ipv6Addr::new(
            0x2a00, s[0], s[1], s[2], s[3], s[4], s[5], s[6]
        ))),
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
}

/// How a proxy might write an address: bare, with a port, bracketed, padded.
fn render(ip: IpAddr, style: u8, header: ForwardedHeader) -> String {
    let bare = match (style % 3, ip) {
        (0, ip) => ip.to_string(),
        (1, ip) => SocketAddr::new(ip, 4711).to_string(),
        (_, IpAddr::V6(v6)) => format!("[{v6}]"),
        (_, ip) => ip.to_string(),
    };
    match header {
        ForwardedHeader::Forwarded => {
            let quoted = if matches!(ip, IpAddr::V6(_)) || style % 3 == 1 {
                format!("\"{bare}\"")
            } else {
                bare
            };
            if style & 4 != 0 {
                format!("proto=https;for={quoted}")
            } else {
                format!("for={quoted};by=10.0.0.1")
            }
        }
        _ if style & 8 != 0 => format!("  {bare} "),
        _ => bare,
    }
}

/// The client the walk from the right must find.
fn expected_client(peer: IpAddr, hops: &[IpAddr], trusted: &IpSet) -> IpAddr {
    let mut client = peer;
    for hop in hops.iter().rev() {
        client = hop.to_canonical();
        if !trusted.contains(client) {
            break;
        }
    }
    client
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    /// Valid forwarding headers round-trip: the client is the rightmost untrusted hop, however
    /// the hops are written and split over several header lines.
    #[test]
    fn forwarding_headers_round_trip(
        hops in proptest::collection::vec((hop(), any::<u8>()), 0..6),
        split_at in any::<usize>(),
        forwarded in any::<bool>(),
        peer_trusted in any::<bool>(),
    ) {
        let header = if forwarded { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
        let trusted = targets::trusted_proxies();
        let peer: IpAddr = if peer_trusted { "10.9.9.9".parse().unwrap() } else { "198.51.100.1".parse().unwrap() };
        let rendered: Vec<String> = hops.iter().map(|(ip, style)| render(*ip, *style, header)).collect();
        let mut headers = HeaderMap::new();
        let name = if forwarded { "forwarded" } else { "x-forwarded-for" };
        if !rendered.is_empty() {
            let cut = split_at % (rendered.len() + 1);
            for part in [&rendered[..cut], &rendered[cut..]] {
                if !part.is_empty() {
                    headers.append(name, HeaderValue::from_str(&part.join(",")).unwrap());
                }
            }
        }
        // A header of the other kind is never read.
        headers.insert(if forwarded { "x-forwarded-for" } else { "forwarded" }, HeaderValue::from_static("1.2.3.4"));
        let resolver = ClientIpResolver::new().trust_proxies(trusted.clone()).header(header);
        let ips: Vec<IpAddr> = hops.iter().map(|(ip, _)| *ip).collect();
        let expected = if peer_trusted { expected_client(peer, &ips, &trusted) } else { peer };
        prop_assert_eq!(resolver.resolve_from(peer, &headers), expected, "{:?}", headers);
    }

    /// `X-Real-IP`: one address, believed from a trusted peer only.
    #[test]
    fn x_real_ip_round_trips(ip in hop(), style in any::<u8>(), peer_trusted in any::<bool>()) {
        let peer: IpAddr = if peer_trusted { "10.0.0.1".parse().unwrap() } else { "2001:470::1".parse().unwrap() };
        let mut headers = HeaderMap::new();
        headers.insert("x-real-ip", HeaderValue::from_str(&render(ip, style, ForwardedHeader::XRealIp)).unwrap());
        let resolver = ClientIpResolver::new().trust_proxies(targets::trusted_proxies()).header(ForwardedHeader::XRealIp);
        let expected = if peer_trusted { ip.to_canonical() } else { peer };
        prop_assert_eq!(resolver.resolve_from(peer, &headers), expected);
    }

    /// Arbitrary header bytes: the fuzz target's assertions, on stable.
    #[test]
    fn arbitrary_forwarding_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        targets::client_ip(&data);
    }

    /// Almost-addresses: the characters addresses are made of, in any order.
    #[test]
    fn address_like_text_never_panics(layout in any::<u8>(), text in "[0-9a-fA-F:.\\[\\]\"=;, \n_forunkw]{0,80}") {
        targets::client_ip(&[&[layout][..], text.as_bytes()].concat());
    }
}

// ---------------------------------------------------------------------------------------------
// Usage, request bodies, config
// ---------------------------------------------------------------------------------------------

/// Text a model might write, full of the scanner's special characters.
fn tricky_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("\"usage\"".to_owned()),
            Just("{\"usage\":{\"prompt_tokens\":1}}".to_owned()),
            Just("}".to_owned()),
            Just("{".to_owned()),
            Just("\\".to_owned()),
            Just("data: ".to_owned()),
            Just("\n\n".to_owned()),
            "\\PC{0,8}",
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// An SSE stream whose content says anything finds exactly its final usage, whatever the
    /// chunk boundaries.
    #[test]
    fn sse_usage_round_trips(
        deltas in proptest::collection::vec(tricky_text(), 0..6),
        usage in (any::<u32>(), any::<u32>()),
        cuts in proptest::collection::vec(1..64usize, 1..8),
        json_body in any::<bool>(),
    ) {
        let (prompt, completion) = (u64::from(usage.0), u64::from(usage.1));
        let usage_json = serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
        let mut body = String::new();
        if json_body {
            let content: String = deltas.concat();
            body = serde_json::json!({"choices": [{"message": {"content": content}}], "usage": usage_json}).to_string();
        } else {
            for delta in &deltas {
                body.push_str(&format!("data: {}\n\n", serde_json::json!({"choices": [{"delta": {"content": delta}}], "usage": null})));
            }
            body.push_str(&format!("data: {}\n\ndata: [DONE]\n\n", serde_json::json!({"choices": [], "usage": usage_json})));
        }
        let mut scanner = UsageScanner::new();
        let mut rest = body.as_bytes();
        let mut i = 0;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(cuts[i % cuts.len()].min(rest.len()));
            scanner.feed(chunk);
            rest = tail;
            i += 1;
        }
        prop_assert_eq!(scanner.usage(), Some(Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }));
        targets::sse_usage(&[&[cuts[0] as u8][..], body.as_bytes()].concat());
    }

    /// Arbitrary bytes to the scanner: the fuzz target's assertions, on stable.
    #[test]
    fn arbitrary_usage_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        targets::sse_usage(&data);
    }

    /// A valid chat request body round-trips through the inspector.
    #[test]
    fn llm_request_round_trips(
        model in proptest::option::of("\\PC{0,20}"),
        max_tokens in proptest::option::of(any::<u64>()),
        stream in proptest::option::of(any::<bool>()),
        contents in proptest::collection::vec("\\PC{0,30}", 0..4),
    ) {
        let mut body = serde_json::json!({
            "messages": contents.iter().map(|c| serde_json::json!({"role": "user", "content": c})).collect::<Vec<_>>(),
        });
        if let Some(m) = &model { body["model"] = m.clone().into(); }
        if let Some(n) = max_tokens { body["max_tokens"] = n.into(); }
        if let Some(s) = stream { body["stream"] = s.into(); }
        let bytes = serde_json::to_vec(&body).unwrap();
        let parsed = LlmRequest::from_json(&bytes).unwrap();
        prop_assert_eq!(parsed.model.as_deref(), model.as_deref());
        prop_assert_eq!(parsed.max_tokens, max_tokens);
        prop_assert_eq!(parsed.stream, stream.unwrap_or(false));
        prop_assert_eq!(parsed.prompt_chars, contents.iter().map(|c| c.chars().count() as u64).sum::<u64>());
        prop_assert_eq!(parsed.body_len, bytes.len() as u64);
    }

    /// Arbitrary bytes and wrongly typed fields: described or a 400.
    #[test]
    fn arbitrary_bodies_are_described_or_400(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        targets::llm_request(&data);
    }

    #[test]
    fn wrong_json_types_are_400(field in prop_oneof![Just("model"), Just("max_tokens"), Just("max_completion_tokens"), Just("stream")], value in prop_oneof![Just("[]"), Just("{}"), Just("-1"), Just("1.5"), Just("\"x\""), Just("true"), Just("99999999999999999999999")]) {
        let body = format!("{{\"{field}\":{value}}}");
        let ok = match field {
            "model" => value == "\"x\"",
            "stream" => value == "true",
            _ => false,
        };
        match LlmRequest::from_json(body.as_bytes()) {
            Ok(_) => prop_assert!(ok, "{} accepted", body),
            Err(rejection) => {
                prop_assert!(!ok, "{} refused", body);
                prop_assert_eq!(rejection.status(), StatusCode::BAD_REQUEST);
                prop_assert_eq!(rejection.code(), "bad_request");
            }
        }
    }
}

/// Every seed of every fuzz target passes the target's assertions: the corpus cargo-fuzz starts
/// from, checked on stable in CI.
#[test]
fn fuzz_seeds_pass() {
    type Target = (&'static str, fn(&[u8]));
    let targets: [Target; 4] = [
        ("auth_header", targets::auth_header),
        ("client_ip", targets::client_ip),
        ("sse_usage", targets::sse_usage),
        ("llm_request", targets::llm_request),
    ];
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds");
    for (name, target) in targets {
        let mut seeds = 0;
        for entry in std::fs::read_dir(format!("{root}/{name}")).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| target(&data));
            assert!(result.is_ok(), "{name}: seed {} fails", path.display());
            seeds += 1;
        }
        assert!(seeds >= 5, "{name} has {seeds} seeds");
    }
}

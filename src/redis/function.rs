//! The tollgate Lua library (Redis Functions): the hot scripts loaded once with
//! `FUNCTION LOAD REPLACE` and called with `FCALL`, so their shared code runs once, at load.
//!
//! The library's name is versioned (`tollgate_<crate version>_<hash of its code>`), and so is
//! every function's (`<library>_reserve`, ...): two versions of tollgate can share a Redis. It
//! is loaded at connect (on a cluster: on every primary; primaries replicate it to their
//! replicas) and again whenever Redis answers `Function not found` (a Redis restarted empty, a
//! failover to a node without it): that answer proves the function did not run, so the call
//! is sent again, once, after the load.

use std::sync::LazyLock;

use redis::{aio::ConnectionLike, FromRedisValue, RedisError, RedisResult, ToRedisArgs, Value};

const GCRA_LIB: &str = include_str!("lua/gcra_lib.lua");
const PRELUDE: &str = include_str!("lua/ledger_prelude.lua");

/// The ledger's functions (each starts with the prelude's `begin`), then the others.
const LEDGER: [(&str, &str); 6] = [
    ("reserve", include_str!("lua/reserve.lua")),
    ("close", include_str!("lua/close.lua")),
    ("top_up", include_str!("lua/top_up.lua")),
    ("balance", include_str!("lua/balance.lua")),
    ("expire", include_str!("lua/expire.lua")),
    ("extend", include_str!("lua/extend.lua")),
];
const OTHERS: [(&str, &str); 2] = [
    ("gcra", include_str!("lua/gcra.lua")),
    ("journal", include_str!("lua/journal.lua")),
];

/// The library: its name and its code (`#!lua name=...`).
pub(crate) struct Library {
    name: String,
    code: String,
}

/// The one library of this build.
pub(crate) static LIBRARY: LazyLock<Library> = LazyLock::new(Library::build);

impl Library {
    fn build() -> Library {
        let mut body = format!("{GCRA_LIB}\n{PRELUDE}\n");
        for (name, code) in LEDGER {
            body.push_str(&format!(
                "redis.register_function('@_{name}', function(KEYS, ARGV)\nbegin(KEYS, ARGV)\n{code}\nend)\n"
            ));
        }
        for (name, code) in OTHERS {
            body.push_str(&format!(
                "redis.register_function('@_{name}', function(KEYS, ARGV)\n{code}\nend)\n"
            ));
        }
        // FNV-1a of the code: the name changes with it.
        let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let name = format!(
            "tollgate_{}_{:08x}",
            env!("CARGO_PKG_VERSION").replace(['.', '-', '+'], "_"),
            hash >> 32
        );
        let code = format!(
            "#!lua name={name}\n{}",
            body.replace("'@_", &format!("'{name}_"))
        );
        Library { name, code }
    }

    /// The library's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `FUNCTION LOAD REPLACE` (on a cluster redis-rs sends it to every primary).
    pub(crate) async fn load<C: ConnectionLike + Send>(&self, conn: &mut C) -> RedisResult<()> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.code)
            .query_async::<Value>(conn)
            .await
            .map(drop)
    }
}

/// Whether Redis answered that the function does not exist (so it did not run).
pub(crate) fn function_missing(error: &RedisError) -> bool {
    let text = error.to_string();
    text.contains("Function not found") || text.contains("no such function")
}

/// One `FCALL` of a function of [`LIBRARY`]: its keys and arguments.
pub(crate) struct FnCall {
    function: &'static str,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl FnCall {
    /// A call of the library's function `function` (`reserve`, `close`, ...).
    pub(crate) fn new(function: &'static str) -> Self {
        FnCall {
            function,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds a key.
    pub(crate) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    /// Adds an argument.
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// Sends the call; on `Function not found`, loads the library and sends it once more.
    pub(crate) async fn invoke<T, C>(&self, conn: &mut C) -> RedisResult<T>
    where
        T: FromRedisValue,
        C: ConnectionLike + Send,
    {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(format!("{}_{}", LIBRARY.name(), self.function))
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        match cmd.query_async::<T>(conn).await {
            Err(error) if function_missing(&error) => {
                tracing::info!(
                    library = LIBRARY.name(),
                    "redis: loading the tollgate library again"
                );
                LIBRARY.load(conn).await?;
                cmd.query_async::<T>(conn).await
            }
            answer => answer,
        }
    }
}

//! What the API's tests share: a fixed seat table and one call through `Api::handle`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;
use vdd::config::Mac;
use vdd::http::api::{Api, SeatLookup};

/// Seats by address, instead of the server's neighbour table.
pub struct Table(pub HashMap<IpAddr, Mac>);

impl SeatLookup for Table {
    fn seat_of(&self, ip: IpAddr) -> Option<Mac> {
        self.0.get(&ip).copied()
    }
}

/// 10.77.0.`n`, an address of the lab's LAN.
pub fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, n))
}

/// One request; `key` is shown in `X-Vdd-Session-Key`. The status and the JSON body.
pub async fn call_key(
    a: &Api,
    method: &str,
    path: &str,
    from: IpAddr,
    auth: Option<&str>,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let r = a
        .handle(method, path, from, auth, key, body.as_bytes())
        .await
        .expect("an API path");
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&r.body)))
    };
    (r.status, v)
}
